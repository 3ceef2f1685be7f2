"""Sampling overhead of `gen`'s pipelines against Diffusers' own on the same network calls, and APG against CFG.

    python eval/bench_sampling.py --out outputs/bench_sampling.json [--sections ddim sdxl sd3 dit apg]
        [--sizes small medium] [--repeats 11] [--demo_out DIR] [--device cuda --dtype bfloat16]

The work is done by ``gen.evaluation.bench_sampling`` (see its docstring for what each section compares): writes
JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.bench_sampling import BenchSamplingSettings, markdown, run


def main(argv=None) -> dict:
    return run_benchmark(BenchSamplingSettings, run, markdown, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
