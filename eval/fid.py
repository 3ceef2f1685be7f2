"""FID / KID (and class accuracy) of a pipeline, a folder of images or a digits split against reference statistics.

Examples (from the repository root):

    # 1000 balanced samples of a pipeline, 25 DDIM steps, against the test split (about 1 min on a CPU)
    python eval/fid.py --pipeline checkpoints/digits-teacher --steps 25 --ref test --out outputs/fid.json
    # a folder of PNGs, Inception features (reference computed and cached on first use)
    python eval/fid.py --samples outputs/samples --features inception --ref train
    # the shipped reference statistics of the digits test split (rewrites a shipped file: --update_shipped)
    python eval/fid.py --dataset digits16-test --features digits \
        --write_ref checkpoints/fid-refs/digits16-test-digits.npz --update_shipped

The work is done by ``gen.evaluation.fid`` (KID is reported with Inception features only; see its docstring).
"""

from __future__ import annotations

import logging
import sys

from gen.cli import parse_settings
from gen.evaluation.fid import FIDSettings, run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(parse_settings(FIDSettings, argv, __doc__))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
