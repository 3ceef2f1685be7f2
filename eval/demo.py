"""`make demo`: what `gen` does, on the models it ships, on a CPU in a few minutes.

    python eval/demo.py --out outputs [--only teacher guidance] [--num_fid_samples 500]

The sections live in ``gen.evaluation.demo`` (teacher, guidance, families, inverse, gbm, interpolants, fdistill,
alignprop; most are the ``demo_section`` of their benchmark module).
"""

from __future__ import annotations

import logging

from gen.cli import parse_settings, run_main
from gen.evaluation.demo import DemoSettings, run


def main(argv=None) -> dict:
    settings = parse_settings(DemoSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(settings)


if __name__ == "__main__":
    run_main(main)
