"""Benchmark the shipped digits teacher and the pipeline's sampling overhead against Diffusers' DDIMPipeline.

    python eval/bench_teacher.py --out outputs/bench_teacher.json [--num_samples 1000] [--steps 10 25 50]

The work is done by ``gen.evaluation.bench_teacher``: writes JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.bench_teacher import BenchTeacherSettings, markdown, run


def main(argv=None) -> dict:
    return run_benchmark(BenchTeacherSettings, run, markdown, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
