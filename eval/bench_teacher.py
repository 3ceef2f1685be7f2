"""Benchmark the shipped digits teacher and the pipeline's sampling overhead against Diffusers' DDIMPipeline.

    python eval/bench_teacher.py --out outputs/bench_teacher.json [--num_samples 1000] [--steps 10 25 50]

The work is done by ``gen.evaluation.bench_teacher``: writes JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.bench_teacher import BenchTeacherSettings, markdown, run


def main(argv=None) -> dict:
    settings = parse_settings(BenchTeacherSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(settings, command=" ".join(["python", *sys.argv]))
    print(markdown(result))
    return result


if __name__ == "__main__":
    run_main(main)
