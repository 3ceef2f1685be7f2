"""RED-Diff and DPS with the digits interpolant (a flow prior) against the DDPM teacher, on the same test images.

    python eval/inverse_priors.py --out outputs/inverse_priors                  # 4 tasks at sigma_y 0.05, 300 images
    python eval/inverse_priors.py --tasks inpaint_box sr2 --num_images 100 --out outputs/inverse_priors_small
    python eval/inverse_priors.py --out eval/results/inverse_priors --update_shipped   # the shipped results

The work is done by ``gen.evaluation.inverse_priors`` (its docstring gives the set-up and the tuning).
"""

from __future__ import annotations

import logging

from gen.cli import parse_settings, run_main
from gen.evaluation.inverse_priors import InversePriorsSettings, run


def main(argv=None) -> dict:
    settings = parse_settings(InversePriorsSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run(settings)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    run_main(main)
