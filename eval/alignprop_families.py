"""AlignProp on SDXL, SD3-style flow models and class-conditional DiT: seconds per training step and peak memory
(RSS) on tiny random components, K = 1 with checkpointing against full backpropagation, each configuration in a fresh
process.

    python eval/alignprop_families.py --out outputs/alignprop_families/results.json [--families sdxl sd3 dit] \
        [--steps 10]

The work is done by ``gen.evaluation.alignprop_families``: writes JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.alignprop_families import AlignPropFamiliesSettings, markdown, run


def main(argv=None) -> dict:
    settings = parse_settings(AlignPropFamiliesSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(settings, command=" ".join(["python", *sys.argv]))
    print(markdown(result))
    return result


if __name__ == "__main__":
    run_main(main)
