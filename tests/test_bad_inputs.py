"""Every bad input of the suite in ``tests/bad_inputs.py`` gets a clear error from `gen` (never silence, never a raw
library traceback), and ``tests/bad_inputs.md`` lists the current cases (rewrite it with ``python -m
tests.bad_inputs``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.bad_inputs import all_cases, classify, tmp

CASES = all_cases()
TABLE = Path(__file__).with_name("bad_inputs.md")


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(tmp(), ignore_errors=True)


def _id(case) -> str:
    return re.sub(r"0x[0-9a-fA-F]+", "0x", f"{case.group}: {case.what}")


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c), marks=[pytest.mark.xfail(
    strict=True, reason=f"pending: {c.pending}")] if c.pending else []) for c in CASES])
def test_bad_input_gets_a_clear_error(case):
    out = classify(case)
    assert out.status == "clear", (f"{case.group}: {case.what} -> {out.status} ({out.kind} from {out.origin}): "
                                   f"{out.message[:300]!r}; expected a ValueError/TypeError from gen matching "
                                   f"{case.match!r}")


def test_the_suite_is_large_and_the_table_is_current():
    assert len(CASES) >= 300
    groups = {c.group.split(":")[0].split(" (")[0] for c in CASES}
    assert {"ClassConditionalPipeline", "GBMPipeline", "InterpolantPipeline", "OneStepPipeline", "RedDiffPipeline",
            "LatentRedDiffPipeline", "GuidedStableDiffusionPipeline", "guiders", "operators", "loaders"} <= groups
    text = TABLE.read_text()
    listed = re.findall(r"^\| `(.*)` \| ", text, flags=re.M)
    want = [re.sub(r"0x[0-9a-fA-F]+", "0x...", c.what.replace("|", "\\|")) for c in CASES]
    assert listed == want, "tests/bad_inputs.md is stale: rewrite it with python -m tests.bad_inputs"
    assert re.search(rf"\*\*{len(CASES)} cases: ", text)
