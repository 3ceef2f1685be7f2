"""Sampling overhead of `gen`'s pipelines against Diffusers' own on the same network calls, and APG against CFG.

    python eval/bench_sampling.py --out outputs/bench_sampling.json [--sections ddim sdxl sd3 dit apg]
        [--sizes small medium] [--repeats 11] [--demo_out DIR] [--device cuda --dtype bfloat16]

The work is done by ``gen.evaluation.bench_sampling`` (see its docstring for what each section compares): writes
JSON and prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.bench_sampling import BenchSamplingSettings, markdown, run


def main(argv=None) -> dict:
    settings = parse_settings(BenchSamplingSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(settings, command=" ".join(["python", *sys.argv]))
    print(markdown(result))
    return result


if __name__ == "__main__":
    run_main(main)
