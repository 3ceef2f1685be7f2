"""Guidance benchmark on the shipped digits teacher: CFG vs APG across scales; AG and LinearAG savings.

    python eval/guidance.py --out outputs/guidance [--num_samples 500] [--steps 20]
    python eval/guidance.py --only adaptive --seeds 0 1 2 --num_samples 500 --out outputs/guidance_ag  # AG vs CFG
    python eval/guidance.py --only adaptive --ag_settings step:12 --seeds 0 1 2 --linear_ag "" \\
        --out outputs/guidance_step_ag                                                             # Step AG

AG specs (``--ag_settings``): ``default`` (AdaptiveGuidance's defaults: x0-space cosine 0.999, frozen eps offset
refreshed every 4th step), ``criterion[:gamma_bar[:min_steps[:after_switch[:refresh_every]]]]`` (the paper's rule:
``eps_cosine:0.999:0:cond:0``), or ``step:N[:after_switch[:refresh_every]]`` (Step AG: CFG on the first N steps).
The work is done by ``gen.evaluation.guidance``: writes ``results.json``, ``rows.md`` and ``guidance.png``.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.guidance import GuidanceSettings, run


def main(argv=None) -> dict:
    return run_benchmark(GuidanceSettings, run, lambda result: result["markdown"], argv, __doc__)


if __name__ == "__main__":
    run_main(main)
