"""What every script shares: ``run_main`` (bad input, a ``ValueError``, is one line and exit code 2),
``parse_settings`` (a settings dataclass from ``gen.evaluation`` as command-line options) and ``run_benchmark``
(the whole body of a thin ``eval/`` script)."""

from __future__ import annotations

import sys


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; a ``ValueError`` prints ``error: <message>`` to stderr and exits with status 2."""
    try:
        main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_benchmark(settings_cls, run, report, argv=None, description: str | None = None) -> dict:
    """What a thin ``eval/`` script does: parse ``argv`` into ``settings_cls``, log at INFO, call
    ``run(settings, command=...)`` with the command line as typed, print ``report(result)`` (markdown rows) and
    return the result."""
    import logging

    settings = parse_settings(settings_cls, argv, description)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(settings, command=" ".join(["python", *sys.argv]))
    print(report(result))
    return result


def parse_settings(cls, argv=None, description: str | None = None, prog: str | None = None):
    """Parse ``--field value`` command-line arguments into the settings dataclass ``cls`` (what every eval script
    does): one option per field, its default and the ``help`` of the field's metadata shown by ``--help``.

    ``bool`` fields are flags (``--name`` / ``--no-name``), ``list[X]`` fields take one or more values
    (``--steps 10 25``, or the option repeated), ``X | None`` fields take an ``X``; ``choices`` in the metadata
    restrict the values. An option not given keeps the dataclass default.
    The dataclass's ``__post_init__`` validates the result (a ``ValueError`` naming the field).
    """
    import argparse
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
            tp = next(a for a in args if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw = {"default": default, "help": f"{f.metadata.get('help', '')} (default: {default})".strip()}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        name = "--" + f.name
        if tp is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:  # --x a b and --x a --x b both give [a, b]; absent: the default
            parser.add_argument(name, nargs="+", action="extend", type=typing.get_args(tp)[0],
                                **{**kw, "default": None})
        else:
            parser.add_argument(name, type=tp, **kw)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return cls(**given)
