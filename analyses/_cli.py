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


def add_no_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the libraries' model-loading bars included)")


def quiet_if_asked(args: argparse.Namespace):
    """A context in which ``--no-progress`` hides the libraries' loading bars too, restored after it (the suite's own
    bars follow each call's ``progress``)."""
    from contextlib import nullcontext

    if not args.no_progress:
        return nullcontext()
    from interp.runtime import library_progress_bars

    return library_progress_bars(False)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of dataclass ``cls``, typed and documented from the field (its default in the help)."""
    for f in fields(cls):
        kind, tp = field_type(f)
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        default = f.default if f.default is not MISSING else f.default_factory()
        if kind == "tuple" and default is not None:
            default = list(default)
        kw = {"dest": f.name, "type": tp, "default": default,
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


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the sweeps run (:mod:`interp.executors`): results and caches do not depend on it."""
    g = parser.add_argument_group("executor", "where the sweeps run; the results are the same, so a run started on "
                                              "one executor resumes on the other")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process; ray: Ray workers that each load the model once (pip install -e "
                        "'.[ray]') (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto', 'host:6379', 'ray://host:10001'); default: start a local one")
    g.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: the cluster's CPUs / --ray-cpus-per-worker, or its GPUs / "
                        "--ray-gpus-per-worker)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=None, help="CPUs (torch threads) per worker (default 1)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="GPUs per worker, e.g. 1 (with --device cuda) or 0.5 to share one (default 0)")


def executor_from_args(parser, args):
    """The executor the options name; a bad combination or a missing Ray exits with one line."""
    from interp.executors import make_executor

    options = {"address": args.ray_address, "workers": args.ray_workers, "cpus_per_worker": args.ray_cpus_per_worker,
               "gpus_per_worker": args.ray_gpus_per_worker}
    try:
        return make_executor(args.executor, **options)
    except (ValueError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
