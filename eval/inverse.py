"""Inverse-problem benchmark on the shipped digits teacher: RED-Diff vs DPS vs the pseudo-inverse.

    python eval/inverse.py --out outputs/inverse/inverse.json          # 4 tasks x sigma_y {0, 0.05} x 3 methods
    python eval/inverse.py --task inpaint_box --method reddiff --num_images 300 --out outputs/inverse/box.json
    python eval/inverse.py --tune --out outputs/inverse/tune.json       # the coordinate search, 50 *train* images
    python eval/inverse.py --tune --tune_only optimizer=sgd weighting=linear,const --out outputs/inverse/sgd.json
    python eval/inverse.py --timing_repeats 3 --out outputs/inverse/timing.json   # interleaved RED-Diff / DPS timing

Settings (tasks, steps, the tuned RED-Diff / DPS settings, the tuning grids) come from
``configs/inverse_digits.yaml``; ``--tune --write_config`` writes the best settings back into it. The work is done
by ``gen.evaluation.inverse`` (its docstring lists the tasks, metrics and outputs).
"""

from __future__ import annotations

from gen.cli import run_benchmark, run_main
from gen.evaluation.inverse import InverseSettings, run


def main(argv=None) -> dict:
    return run_benchmark(InverseSettings, run, lambda result: result["markdown"], argv, __doc__)


if __name__ == "__main__":
    run_main(main)
