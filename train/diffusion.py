"""Train a (class-conditional) diffusion model and save a `ClassConditionalPipeline` folder.

    accelerate launch train/diffusion.py --config configs/digits_teacher.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/diffusion.py --config configs/digits_teacher.yaml \
        --max_train_steps 20 --output_dir OUT

The objective (DDPM's simple loss with label dropout for classifier-free guidance) is
``gen.training.objectives.DiffusionObjective``; the loop is ``gen.training``.
"""

from gen.cli import run_main
from gen.training import train


def main(argv=None):
    return train("diffusion", argv)


if __name__ == "__main__":
    run_main(main)
