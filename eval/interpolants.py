"""Stochastic-interpolant benchmarks: 2-D side by side with torchcfm, digits FID against NFE, the digits bridge.

    python eval/interpolants.py --out outputs/interpolants [--only toys digits bridge] [--threads 1]

The work is done by ``gen.evaluation.interpolants`` (its docstring describes the three sections). Updating the
shipped ``eval/results/interpolants`` takes ``--out eval/results/interpolants --update_shipped``.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.interpolants import InterpolantEvalSettings, run


def main(argv=None) -> dict:
    settings = parse_settings(InterpolantEvalSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(settings, command="python eval/interpolants.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_main(main)
