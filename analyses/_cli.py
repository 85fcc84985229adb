"""What the commands share: options generated from a config dataclass, and an expected failure turned into one line
and exit code 2."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from interp.compare_config import field_type


def run_or_exit(parser, out: Path | None, fn):
    """``fn()``; an expected failure (:func:`interp.runs.user_message` knows it) becomes one ``error:`` line naming the
    cause, and the traceback's file in the run folder, with exit code 2. A bug still shows its traceback."""
    from interp.runs import user_message

    try:
        return fn()
    except Exception as err:
        msg = user_message(err)
        if msg is None:
            raise
        where = f" (traceback: {out / 'traceback.txt'})" if out is not None and (out / "traceback.txt").exists() else ""
        parser.exit(2, f"error: {msg}{where}\n")


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of dataclass ``cls``, typed and documented from the field (its default in the help)."""
    for f in fields(cls):
        kind, tp = field_type(f)
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"dest": f.name, "type": tp, "default": list(default) if kind == "tuple" else default,
              "help": f.metadata.get("help", "") + " (default: %(default)s)"}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if kind == "tuple":
            kw["nargs"] = f.metadata.get("nargs", "+")
            kw["metavar"] = f.metadata.get("metavar") or (f.name.upper()[:-1] if tp is str else tp.__name__.upper())
        parser.add_argument(*flags, **kw)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: (tuple(v) if isinstance(v, list) else v)
                  for f in fields(cls) if (v := getattr(args, f.name)) is not None})
