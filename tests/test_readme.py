"""README.md runs as written: every ```python block is executed from the repository root (lines ending in
``# hub`` load from the Hugging Face hub and are skipped: no downloads in tests), and every command of its ```bash
blocks writes only where git does not look (``outputs/``, ``OUT/``, ``runs/``) unless it says ``--update_shipped``."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB = "# hub"
BLOCK_BUDGET_S = 60.0  # one block on a loaded 2-core CI box; the README's sizes keep each far below


def blocks(kind: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block of ``kind``."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(rf"```{kind}\n(.*?)```", text, re.S)]


PYTHON = blocks("python")


def hub_block(code: str) -> bool:
    """A block whose first line starts with ``# hub`` loads from the hub throughout (the quickstarts): not run."""
    lines = code.splitlines()
    return bool(lines) and lines[0].lstrip().startswith(HUB)


def runnable(code: str) -> str:
    """The block without its hub lines (a hub line's continuation lines would be marked too); a hub block is empty."""
    if hub_block(code):
        return ""
    return "\n".join(line for line in code.splitlines() if not line.rstrip().endswith(HUB))


def test_the_readme_has_python_blocks_and_marks_its_hub_lines():
    assert len(PYTHON) >= 8
    hub_lines = [line for _, code in PYTHON for line in code.splitlines() if line.rstrip().endswith(HUB)]
    assert hub_lines, "the SD example should stay in the README, marked # hub"
    # every from_pretrained of something that is not a local path is marked
    for _, code in PYTHON:
        if hub_block(code):
            continue
        for line in code.splitlines():
            for arg in re.findall(r"from_pretrained\(\"([^\"]+)\"", line):
                if not (ROOT / arg).exists():
                    assert line.rstrip().endswith(HUB), f"hub id {arg!r} not marked {HUB!r}: {line.strip()}"


@pytest.mark.parametrize("start,code", PYTHON, ids=[f"README.md:{n}" for n, _ in PYTHON])
def test_readme_python_block_runs(start, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    exec(compile(runnable(code), f"README.md:{start}", "exec"), {"__name__": "__readme__"})
    took = time.perf_counter() - t0
    assert took < BLOCK_BUDGET_S, f"README.md:{start} took {took:.0f} s; make the block's sizes smaller"


WRITE_FLAGS = ("--out", "--output_dir", "--write_ref", "--save_samples")
IGNORED = ("outputs/", "OUT", "runs/", "/tmp/")


def commands() -> list[tuple[int, list[str]]]:
    out = []
    for start, code in blocks("bash"):
        joined = code.replace("\\\n", " ")
        for i, line in enumerate(joined.splitlines()):
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append((start + i, shlex.split(line)))
    return out


def test_readme_commands_write_only_where_git_does_not_look():
    checked = 0
    for line, argv in commands():
        for flag, value in zip(argv, argv[1:]):
            if flag in WRITE_FLAGS:
                checked += 1
                ok = value.startswith(IGNORED) or "--update_shipped" in argv
                assert ok, f"README.md:{line}: {flag} {value} writes into the repository (use outputs/)"
    assert checked >= 10


def test_eval_defaults_write_under_outputs():
    import dataclasses

    from gen.evaluation import alignprop, bench_teacher, demo, fdistill, fid, gbm, interpolants, linear_ag  # noqa: F401
    from gen.evaluation.bench_teacher import BenchTeacherSettings
    from gen.evaluation.demo import DemoSettings
    from gen.evaluation.gbm import GBMEvalSettings
    from gen.evaluation.guidance import GuidanceSettings
    from gen.evaluation.interpolants import InterpolantEvalSettings
    from gen.evaluation.inverse import InverseSettings
    from gen.evaluation.linear_ag import CalibrationSettings

    for cls in (BenchTeacherSettings, DemoSettings, GBMEvalSettings, InterpolantEvalSettings, CalibrationSettings,
                GuidanceSettings, InverseSettings):
        out = {f.name: f.default for f in dataclasses.fields(cls)}["out"]
        assert out.startswith("outputs"), (cls.__name__, out)
    text = (ROOT / "eval" / "alignprop.py").read_text()
    assert 'p.add_argument("--out", default="outputs/alignprop")' in text


def test_eval_scripts_import_the_package_and_load_no_script_by_path():
    scripts = sorted([*(ROOT / "eval").glob("*.py"), *(ROOT / "train").glob("*.py")])
    assert {"demo.py", "fdistill.py", "guidance.py", "inverse.py"} <= {p.name for p in scripts}
    for path in scripts:
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        assert "sys.path" not in text, name
        assert "tests.conftest" not in text, name
        assert "spec_from_file_location" not in text, name
        compile(text, name, "exec")
