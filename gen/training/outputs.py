"""Output folders owned by one run: checked before any work, never mixed with another run, never silently deleted.

- an ``output_dir`` that is a file, or that cannot be written, is a ``ValueError`` naming it;
- a non-empty ``output_dir`` without ``--resume`` is a ``ValueError`` that offers ``--resume latest`` (continue the
  run there) and ``--overwrite_output_dir true`` (start fresh; the old contents move to
  ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` beside it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def check_output_dir(output_dir, resume: str | None, overwrite: bool) -> None:
    """Raise ``ValueError`` when ``output_dir`` cannot take this run (see the module docstring). Changes nothing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file, not a folder; pass another --output_dir")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output_dir {str(out)!r} cannot be created: {str(probe)!r} is a file")
    try:  # an actual write: os.access says yes to root on read-only folders and knows nothing of read-only mounts
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".gen-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"output_dir {str(out)!r} is not writable ({str(probe)!r}: {err.strerror}); pass a folder "
                         "you can write to") from None
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise ValueError(f"output_dir {str(out)!r} is not empty (it holds {shown}): another run's files. Pass "
                         "--resume latest to continue that run, --overwrite_output_dir true to start fresh (the old "
                         "contents are moved aside, not deleted), or another --output_dir")


def move_aside(output_dir) -> Path | None:
    """Rename a non-empty ``output_dir`` to ``<output_dir>.old-<time>`` (unique); returns the new path."""
    out = Path(output_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    i = 1
    while target.exists():
        target = out.with_name(f"{out.name}.old-{stamp}-{i}")
        i += 1
    os.replace(out, target)
    logger.warning("--overwrite_output_dir: the previous contents of %s are now in %s", out, target)
    return target
