"""f-distill benchmarks of issue 15: network passes and iteration time against a bare loop, network copies held,
peak memory of the shared base against separate copies and full fine-tuning.

    python eval/bench_fdistill.py --out outputs/bench_fdistill [--only passes copies memory] [--iterations 40]

The work is done by ``gen.evaluation.bench_fdistill``: writes ``bench_fdistill.json`` and ``rows.md`` (rows for
BENCHMARKS.md) under ``--out``.
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings, run_main
from gen.evaluation.bench_fdistill import BenchFDistillSettings, markdown, run


def main(argv=None) -> dict:
    settings = parse_settings(BenchFDistillSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(settings, command=" ".join(["python", *sys.argv]))
    print(markdown(result))
    return result


if __name__ == "__main__":
    run_main(main)
