"""AlignProp on SDXL, SD3-style flow models and class-conditional DiT: seconds per training step and peak memory
(RSS) on tiny random components, K = 1 with checkpointing against full backpropagation, each configuration in a fresh
process.

    python eval/alignprop_families.py --out outputs/alignprop_families/results.json [--families sdxl sd3 dit] \
        [--steps 10]

The work is done by ``gen.evaluation.alignprop_families``: writes JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.alignprop_families import AlignPropFamiliesSettings, markdown, run


def main(argv=None) -> dict:
    return run_benchmark(AlignPropFamiliesSettings, run, markdown, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
