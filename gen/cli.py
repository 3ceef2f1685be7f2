"""What every script's ``__main__`` does: run ``main()``; bad input (a ``ValueError``) is one line and exit code 2."""

from __future__ import annotations

import sys


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; a ``ValueError`` prints ``error: <message>`` to stderr and exits with status 2."""
    try:
        main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
