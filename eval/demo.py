"""`make demo`: what `gen` does, on the models it ships, on a CPU in a few minutes.

    python eval/demo.py --out outputs [--only teacher guidance] [--num_fid_samples 500]

The sections live in ``gen.evaluation.demo`` (teacher, guidance, families, gbm, interpolants, alignprop); the
inverse-problem and f-distill sections are still the ``demo_section`` of ``eval/inverse.py`` and ``eval/fdistill.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gen.cli import parse_settings, run_main
from gen.evaluation import REPO_ROOT
from gen.evaluation.demo import SECTIONS, DemoSettings, run


def _script_section(relpath: str):
    """TEMPORARY: the ``demo_section(out, settings)`` of another eval script, loaded by path, until it moves to
    ``gen.evaluation.<method>`` like the others (eval/inverse.py and eval/fdistill.py are being edited elsewhere)."""

    def section(out: Path, settings) -> dict:
        import importlib.util

        spec = importlib.util.spec_from_file_location("demo_" + Path(relpath).stem, REPO_ROOT / relpath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.demo_section(out, settings)

    return section


ALL_SECTIONS = {"teacher": SECTIONS["teacher"], "guidance": SECTIONS["guidance"], "families": SECTIONS["families"],
                "inverse": _script_section("eval/inverse.py"), "gbm": SECTIONS["gbm"],
                "interpolants": SECTIONS["interpolants"], "fdistill": _script_section("eval/fdistill.py"),
                "alignprop": SECTIONS["alignprop"]}


def main(argv=None) -> dict:
    settings = parse_settings(DemoSettings, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(settings, ALL_SECTIONS)


if __name__ == "__main__":
    run_main(main)
