"""Fit LinearAG coefficients on recorded CFG trajectories and save the guider (coefficients in its config).

    python eval/calibrate_linear_ag.py --steps 20 --out outputs/linear_ag     # about 1 min on a CPU
    python eval/calibrate_linear_ag.py --steps 20 --update_shipped            # rewrites the shipped linear_ag/

The work is done by ``gen.evaluation.linear_ag``; the saved folder loads with ``LinearAG.from_pretrained(out)``.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.linear_ag import CalibrationSettings, run


def main(argv=None):
    settings = parse_settings(CalibrationSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(settings, command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    run_main(main)
