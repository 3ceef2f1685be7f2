"""f-distill benchmarks of issue 15: network passes and iteration time against a bare loop, network copies held,
peak memory of the shared base against separate copies and full fine-tuning.

    python eval/bench_fdistill.py --out outputs/bench_fdistill [--only passes copies memory] [--iterations 40]

The work is done by ``gen.evaluation.bench_fdistill``: writes ``bench_fdistill.json`` and ``rows.md`` (rows for
BENCHMARKS.md) under ``--out``.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.bench_fdistill import BenchFDistillSettings, markdown, run


def main(argv=None) -> dict:
    return run_benchmark(BenchFDistillSettings, run, markdown, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
