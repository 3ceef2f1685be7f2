"""Benchmark f-distill: mode coverage on a 2-D mixture, and one-step digits students against their teacher.

    python eval/fdistill.py --toy --divergences rkl fkl js alpha:0.5 alpha:1.5 --out outputs/fdistill/toy.json
    python eval/fdistill.py --digits --student checkpoints/digits-fdistill-js --out outputs/fdistill/digits.json
    python eval/fdistill.py --students run=runs/digits-fdistill-js/checkpoints/checkpoint-2000 \\
        shipped=checkpoints/digits-fdistill-js --eval_seeds 0 1 2 --out outputs/fdistill/ablation.json
    python eval/fdistill.py --curve runs/digits-fdistill-js --teacher_ref outputs/fdistill/digits.json \\
        --out outputs/fdistill/curve.json

A student is a ``OneStepPipeline`` folder or a training checkpoint ``RUN/checkpoints/checkpoint-N`` of
``train/fdistill.py`` (its EMA weights; ``--no-ema`` for the raw ones). The work is done by
``gen.evaluation.fdistill`` (its docstring describes each mode): writes the JSON, plots next to it, and prints
markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.fdistill import FDistillEvalSettings, run


def main(argv=None) -> dict:
    return run_benchmark(FDistillEvalSettings, run, lambda result: result["markdown"], argv, __doc__)


if __name__ == "__main__":
    run_main(main)
