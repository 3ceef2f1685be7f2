"""Train a stochastic-interpolant model (Albergo, Boffi & Vanden-Eijnden, arXiv 2303.08797).

    accelerate launch train/interpolant.py --config configs/interpolant_digits.yaml [--key value ...]
    accelerate launch train/interpolant.py --config configs/interpolant_checkerboard.yaml
    accelerate launch train/interpolant.py --config configs/interpolant_bridge_digits.yaml
    accelerate launch --multi_gpu --num_processes 2 train/interpolant.py --config ... --max_train_steps 20

The objective (digits generation, 2-D toys, the digits bridge) is ``gen.interpolants.training.InterpolantObjective``;
the loop is ``gen.training``.
"""

from gen.cli import run_main
from gen.training import train


def main(argv=None):
    return train("interpolant", argv)


if __name__ == "__main__":
    run_main(main)
