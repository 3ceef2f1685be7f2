"""Checksum manifests of model folders: ``SHA256SUMS`` beside the files, in ``sha256sum`` format.

Every folder in ``checkpoints/`` ships one; ``tests/test_checkpoints.py`` verifies them, and pipelines verify the
weight files a manifest lists when they load a folder (:func:`gen.sampling.loading.guarded_from_pretrained`), so a
corrupted shipped file is named before it can produce an image.

    python -m gen.checkpoints --write-manifests     # (re)write checkpoints/*/SHA256SUMS after changing a folder
    python -m gen.checkpoints --verify              # check every shipped folder
    cd checkpoints/digits-teacher && sha256sum -c SHA256SUMS     # the same check with coreutils
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

MANIFEST_NAME = "SHA256SUMS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and "__pycache__" not in p.parts
                  and not p.name.startswith("."))


def read_manifest(folder: str | Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of ``folder/SHA256SUMS``, or None when there is none.

    Raises:
        ValueError: a line that is not ``<64 hex digits>  <path>``, naming the manifest and the line.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    entries = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise ValueError(f"{path}:{i} is not a sha256sum line ('<64 hex digits>  <path>'): {line[:80]!r}")
        entries[name.removeprefix("*")] = digest
    return entries


def write_manifest(folder: str | Path) -> Path:
    """Write ``folder/SHA256SUMS`` listing every file under ``folder`` (sorted; hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    lines = [f"{sha256(folder / name)}  {name}\n" for name in _files(folder)]
    out = folder / MANIFEST_NAME
    out.write_text("".join(lines))
    return out


def verify_manifest(folder: str | Path, weights_only: bool = False, required: bool = True) -> int:
    """Check ``folder`` against its ``SHA256SUMS``; returns the number of files checked.

    Args:
        weights_only: check only the listed weight files (``WEIGHT_SUFFIXES``), and ignore files the manifest does
            not list (what loading does); otherwise every file must be listed and match.
        required: a missing manifest is an error (else 0 files are checked).
    Raises:
        ValueError: naming every corrupt (sha256 differs), missing or unlisted file with its path, and how to
            rewrite the manifest after an intended change.
    """
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        if required:
            raise ValueError(f"{folder} has no {MANIFEST_NAME}; write it with python -m gen.checkpoints "
                             "--write-manifests")
        return 0
    names = [n for n in entries if n.endswith(WEIGHT_SUFFIXES)] if weights_only else list(entries)
    problems = []
    for name in names:
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != entries[name]:
            problems.append(f"{path} is corrupt or changed (its sha256 differs from {MANIFEST_NAME})")
    if not weights_only:
        problems += [f"{folder / n} is not listed in {MANIFEST_NAME}" for n in _files(folder) if n not in entries]
    if problems:
        raise ValueError("; ".join(problems) + ". Restore the files (git checkout, re-download), or after an intended"
                                               " change rewrite the manifest: python -m gen.checkpoints "
                                               "--write-manifests")
    return len(names)


def shipped_folders(root: str | Path = CHECKPOINTS) -> list[Path]:
    """Every model folder under ``root`` (its direct subfolders)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gen.checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-manifests", action="store_true", help="(re)write SHA256SUMS in every folder")
    mode.add_argument("--verify", action="store_true", help="verify every folder against its SHA256SUMS")
    p.add_argument("--root", default=str(CHECKPOINTS), help="folder of model folders (default: checkpoints/)")
    p.add_argument("folders", nargs="*", help="only these folders (default: every folder under --root)")
    args = p.parse_args(argv)
    folders = [Path(f) for f in args.folders] or shipped_folders(args.root)
    if not folders:
        print(f"error: no model folders under {args.root}", file=sys.stderr)
        return 2
    status = 0
    for folder in folders:
        try:
            if args.write_manifests:
                print(f"wrote {write_manifest(folder)}")
            else:
                print(f"ok {folder} ({verify_manifest(folder)} files)")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
