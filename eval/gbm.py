"""Benchmark multiplicative (GBM) diffusion against the additive DDPM teacher trained with the same network and budget.

    python eval/gbm.py --out outputs/gbm                                   # every part (about 40 min on 1 CPU thread)
    python eval/gbm.py --out outputs/gbm --only gbm_stochastic             # one part (parts merge into results.json)
    python eval/gbm.py --out outputs/gbm --report                          # rebuild plot + markdown from results.json

The work is done by ``gen.evaluation.gbm`` (its docstring lists the parts).
"""

from __future__ import annotations

import logging

from gen.cli import parse_settings, run_main
from gen.evaluation.gbm import GBMEvalSettings, run


def main(argv=None) -> dict:
    settings = parse_settings(GBMEvalSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run(settings)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    run_main(main)
