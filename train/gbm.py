"""Train a multiplicative ("Dale meets Langevin") diffusion model and save a `GBMPipeline` folder.

    accelerate launch train/gbm.py --config configs/gbm_digits.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/gbm.py --config configs/gbm_digits.yaml \
        --max_train_steps 20 --output_dir OUT

The objective (multiplicative denoising score matching, Shetty et al. 2025) is ``gen.gbm.training.GBMObjective``;
the loop is ``gen.training``.
"""

from gen.cli import run_main
from gen.training import train


def main(argv=None):
    return train("gbm", argv)


if __name__ == "__main__":
    run_main(main)
