"""Distil a diffusion teacher into a one-step generator with f-distill (Xu, Nie & Vahdat 2025) and save it.

    accelerate launch train/fdistill.py --config configs/fdistill_digits.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/fdistill.py --config configs/fdistill_digits.yaml \
        --divergence js --max_train_steps 10 --output_dir OUT

The objective (critic every iteration, student every ``student_update_freq``) is
``gen.distill.training.FDistillObjective``; the loop is ``gen.training``.
"""

from gen.cli import run_main
from gen.training import train


def main(argv=None):
    return train("fdistill", argv)


if __name__ == "__main__":
    run_main(main)
