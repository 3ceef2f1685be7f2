"""Train the digits classifier used for class accuracy and "FID-digits" features, and save it.

    accelerate launch train/classifier.py --config configs/digits_classifier.yaml [--key value ...]

Cross-entropy on digits16-train with random shifts (``gen.training.objectives.ClassifierObjective``); test accuracy
is written to ``<output_dir>/metrics.json``.
"""

from gen.cli import run_main
from gen.training import train


def main(argv=None):
    return train("classifier", argv)


if __name__ == "__main__":
    run_main(main)
