"""A flow teacher on real data: the one-step f-distill student of the digits interpolant against the interpolant's
ODE at 4 / 8 / 16 network evaluations (FID-digits with its seed spread, class accuracy, images per second).

    python eval/fdistill_flow.py --student checkpoints/digits-interpolant-fdistill --out outputs/fdistill_flow
    python eval/fdistill_flow.py --checkpoint runs/digits-interpolant-fdistill/checkpoints/checkpoint-2000 \
        --seeds 0 --nfe 8 --samplers ode-heun          # follow a run from its training checkpoints

The work is done by ``gen.evaluation.fdistill_flow``: writes ``results.json``, ``rows.md`` and ``samples.png``.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.fdistill_flow import FDistillFlowSettings, markdown, run


def main(argv=None) -> dict:
    return run_benchmark(FDistillFlowSettings, run, markdown, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
