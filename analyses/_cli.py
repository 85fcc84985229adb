"""What the commands share: options generated from a config dataclass, in the same argument groups on every command,
and an expected failure turned into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from contextlib import nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from interp.core.executors import make_executor
from interp.core.runs import user_message
from interp.core.runtime import library_progress_bars
from interp.methods import REGISTRY, load_plugin
from interp.studies.compare_config import field_type

#: The glossary every command's help points to for its terms (J, anchor, UNet rows, alpha, LDS, ...).
GLOSSARY = "docs/concepts.md"

#: The option groups of every command's --help, in order: (title, description, config fields in the group). A
#: field of a config that no group names goes to "other options", so a new field still shows. The options a command
#: adds itself (--out, --threads, --plan, ...) are the last group, OUTPUTS.
GROUPS = (
    ("model and device", "which model, where its passes run and in what precision; a UNet row is one image at one "
     "timestep through the UNet",
     ("model", "device", "dtype", "precision", "max_batch")),
    ("concepts and objective", "what is localized, and J, the objective every method explains: erase (how "
     "differently the model denoises with and without the concept; the anchor is the prompt without it), amplify "
     "(how well it denoises images of the concept) or classifier (an image judge's probability of the concept on "
     "generated images)",
     ("concepts", "objective", "anchor", "judge", "alternatives", "n_images", "timesteps", "gen_steps", "guidance",
      "attr_images", "attr_steps")),
    ("components", "the parts of the model that are scored, addressed by module path: a family (ff: feed-forward, "
     "attn1: self-attention, attn2: cross-attention, resnet, block, text_attn, text_mlp, text_layer), a module kind "
     "within it, and a UNet stage",
     ("granularity", "sae", "families", "kinds", "blocks", "components")),
    ("methods and budgets", "which methods or edits run, and how many masks or steps each may spend; alpha is the "
     "share of the components a random mask ablates",
     ("methods", "edits", "k", "ratios", "compare", "rankings", "contrast", "ablation", "random_rankings")),
    ("held-out sets and statistics", "what the estimates are checked on: the LDS (linear datamodeling score) is the "
     "Spearman correlation between J predicted from summed scores and J measured under held-out random joint "
     "ablations at each rate alpha; held-out images are prompts and seeds no attribution saw, judged by the image "
     "judge",
     ("lds_alphas", "heldout_masks", "erasure_k", "erasure_images", "erasure_steps", "images", "steps", "n_boot",
      "seed", "random_masks", "mask_rates")),
)
OUTPUTS = ("outputs and execution", "where results go and how the run executes")
#: Options that commands without a config dataclass (erasure_curves, text_restoration) add by hand, by destination:
#: :func:`group_options` files them into the same groups.
COMMAND_OPTIONS = {
    "model and device": ("model", "device", "precision", "max_batch"),
    "concepts and objective": ("concepts", "judge", "alternatives", "attr_images", "timesteps", "gen_steps",
                               "guidance"),
    "components": ("granularity", "families", "kinds", "blocks"),
    "methods and budgets": ("methods", "compare", "rankings", "contrast", "ablation", "k", "random_rankings",
                            "noise", "noise_scale", "plugin"),
    "held-out sets and statistics": ("random_masks", "mask_rates", "images", "steps", "n_boot", "seed"),
    OUTPUTS[0]: ("help", "out", "store", "threads", "no_progress"),
}


#: The most torch threads a command accepts: beyond it torch's thread pool fails to allocate (a MemoryError).
MAX_THREADS = 1024


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``, the same on every command: not given, torch keeps its own default (the machine's physical
    cores); results differ between thread counts only by rounding."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, 1 to 1024 (default: torch's own, one per physical core)")


def apply_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Check ``--threads`` (exit 2 with one line when unusable) and set torch's thread count when given."""
    if threads is None:
        return
    if threads_error(threads):
        parser.exit(2, f"error: {threads_error(threads)}\n")

    torch.set_num_threads(threads)


def threads_error(threads: int | None) -> str | None:
    """The one-line complaint about a ``--threads`` value, or None when it is usable (None: torch's default)."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        return (f"--threads must be between 1 and {MAX_THREADS}, got {threads} (this machine has {os.cpu_count()} "
                f"CPU cores: use at most that many)")
    return None


def run_or_exit(parser, out: Path | None, fn):
    """``fn()``; an expected failure (:func:`interp.core.runs.user_message` knows it) becomes one ``error:`` line naming
    the cause, and the traceback's file in the run folder, with exit code 2. A bug still shows its traceback."""

    try:
        return fn()
    except Exception as err:
        msg = user_message(err)
        if msg is None:
            raise
        where = f" (traceback: {out / 'traceback.txt'})" if out is not None and (out / "traceback.txt").exists() else ""
        parser.exit(2, f"error: {msg}{where}\n")


def option_group(parser: argparse.ArgumentParser, title: str, description: str | None = None):
    """The argument group ``title`` of ``parser``, created (with ``description``) on first use. "outputs and
    execution" is the parser's own optional group, where ``parser.add_argument`` puts an option."""
    if title == OUTPUTS[0]:
        return parser._optionals
    for g in parser._action_groups:
        if g.title == title:
            return g
    # wrapped here: the commands' formatter keeps descriptions as written (their module docstrings are laid out)
    return parser.add_argument_group(title, description and textwrap.fill(description, 100))


def add_no_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``, in the "outputs and execution" group. Every command adds it last, so a command built by
    hand has all its options by now: they are filed into the common groups (:func:`group_options`)."""
    option_group(parser, OUTPUTS[0]).add_argument(
        "--no-progress", action="store_true", help="no progress bars (the libraries' model-loading bars included)")
    if not getattr(parser, "_interp_grouped", False):
        group_options(parser)


def group_options(parser: argparse.ArgumentParser) -> bool:
    """File the options of a parser built by hand into the groups of :data:`GROUPS` and :data:`OUTPUTS`, by
    destination (:data:`COMMAND_OPTIONS`), when every option has a group there; returns whether it did (a command
    with options of its own kind, such as the trainers, keeps its layout)."""
    where = {dest: title for title, dests in COMMAND_OPTIONS.items() for dest in dests}
    actions = [(g, a) for g in parser._action_groups for a in g._group_actions if a.dest != argparse.SUPPRESS]
    if not actions or any(a.dest not in where for _, a in actions):
        return False
    described = {title: description for title, description, _ in GROUPS}
    for title, _, _ in GROUPS:  # in their order, those that will hold an option
        if any(where[a.dest] == title for _, a in actions):
            option_group(parser, title, described[title])
    for group, action in actions:
        target = option_group(parser, where[action.dest])
        if target is not group:
            group._group_actions.remove(action)
            target._group_actions.append(action)
    _finish(parser)
    return True


def _finish(parser: argparse.ArgumentParser) -> None:
    """The parser's own group (-h, --out, --threads, ...) is "outputs and execution", listed last; empty groups go;
    the help ends by pointing at the glossary."""
    parser._interp_grouped = True
    parser._optionals.title, parser._optionals.description = OUTPUTS
    parser._action_groups[:] = [g for g in parser._action_groups if g._group_actions and g is not parser._optionals]
    parser._action_groups.append(parser._optionals)
    glossary = f"Terms (J, anchor, UNet rows, alpha, LDS, forward-pass equivalents) are defined in {GLOSSARY}."
    if glossary not in (parser.epilog or ""):
        parser.epilog = f"{parser.epilog}\n\n{glossary}" if parser.epilog else glossary


def quiet_if_asked(args: argparse.Namespace):
    """A context in which ``--no-progress`` hides the libraries' loading bars too, restored after it (the suite's own
    bars follow each call's ``progress``)."""

    if not args.no_progress:
        return nullcontext()

    return library_progress_bars(False)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of dataclass ``cls``, typed and documented from the field (its default in the help), in
    the argument groups of :data:`GROUPS`.

    The options a command adds itself with ``parser.add_argument`` (``--out``, ``--threads``, ...) land in the last
    group, "outputs and execution", and the help ends by pointing at the glossary. A field's metadata may give
    ``help``, ``flags`` (the first is the option's name, the others aliases shown with it), ``hidden_flags`` (old
    names still accepted, not shown), ``choices``, ``nargs`` and ``metavar``.
    """
    where = {name: title for title, _, names in GROUPS for name in names}
    where.update({name: OUTPUTS[0] for name in COMMAND_OPTIONS[OUTPUTS[0]]})  # e.g. a cache folder (--store)
    described = {title: description for title, description, _ in GROUPS}
    for title, description, _ in GROUPS:  # the groups in their order, whatever the order of the fields
        if any(where.get(f.name) == title for f in fields(cls)):
            option_group(parser, title, description)
    for f in fields(cls):
        kind, tp = field_type(f)
        if kind == "dict":  # the methods' options: add_method_arguments makes their flags
            continue
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        default = f.default if f.default is not MISSING else f.default_factory()
        if kind == "tuple" and default is not None:
            default = list(default)
        suffix = "" if default is None else " (default: %(default)s)"  # a None default: its help explains it
        if "cli_default" in f.metadata:  # the config resolves it (from the registry): shown here, not passed
            suffix, default = f" (default: {f.metadata['cli_default']()})", None
        kw = {"dest": f.name, "type": tp, "default": default, "help": f.metadata.get("help", "") + suffix}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if kind == "tuple":
            kw["nargs"] = f.metadata.get("nargs", "+")
            kw["metavar"] = f.metadata.get("metavar") or (f.name.upper()[:-1] if tp is str else tp.__name__.upper())
        title = where.get(f.name, "other options")
        group = option_group(parser, title, described.get(title))
        group.add_argument(*flags, **kw)
        hidden = tuple(f.metadata.get("hidden_flags", ()))
        if hidden:  # an old name that keeps working: the same destination, no line in --help
            group.add_argument(*hidden, **{**kw, "help": argparse.SUPPRESS})
    _finish(parser)


def config_parser(name: str, doc: str, cls, out_help: str, *, out_required: bool = False,
                  methods: bool = False, plan: bool = False) -> argparse.ArgumentParser:
    """THE parser of a command whose options are the frozen config dataclass ``cls``: its fields (grouped, typed and
    documented from the field), with ``methods`` the registered methods' options and ``--plugin``, then ``--out``
    (``out_help``; required or not), ``--threads`` and ``--no-progress``.

    Args:
        name: the command's module name under ``analyses`` (``erasure_curves``).
        doc: its module docstring, the description.
        cls: the config dataclass.
        out_help: the help of ``--out``.
        out_required: whether ``--out`` must be given.
        methods: add ``--plugin`` and every registered method's ``--<method>-<option>`` flags.
        plan: add ``--plan`` (print the run's cost plan and exit).

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog=f"python -m analyses.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, cls)
    if methods:
        add_plugin_argument(p)
        add_method_arguments(p)
    p.add_argument("--out", type=Path, default=None, required=out_required, help=out_help)
    if plan:
        p.add_argument("--plan", action="store_true",
                       help="print the run's cost plan (counts and projected time) and exit without running it")
    add_threads_argument(p)
    add_no_progress_argument(p)
    return p


def parse_config(parser: argparse.ArgumentParser, cls, argv=None):
    """``(args, config)``: the command line parsed, ``--threads`` checked, the config ``cls`` built from it (checked
    on construction) and ``--out`` checked not to be a file; any of them wrong exits with one line and code 2
    before anything loads."""
    args = parser.parse_args(argv)
    if threads_error(getattr(args, "threads", None)):
        parser.exit(2, f"error: {threads_error(args.threads)}\n")
    try:
        cfg = config_from_args(cls, args)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"error: {err}\n")
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        parser.exit(2, f"error: --out {out} is an existing file, not a folder: pass a folder path\n")
    return args, cfg


def config_from_args(cls, args: argparse.Namespace):
    """An instance of config dataclass ``cls`` from parsed options (lists become tuples; None keeps the default);
    a dict field ``options`` gathers the methods' flags (:func:`add_method_arguments`) given on the command line."""
    values = {f.name: (tuple(v) if isinstance(v, list) else v)
              for f in fields(cls) if field_type(f)[0] != "dict" and (v := getattr(args, f.name)) is not None}
    if "options" in {f.name for f in fields(cls)}:
        values["options"] = method_options_from_args(args)
    return cls(**values)


#: Destination prefix of a method's option on the command line: ``method:<name>:<field>``.
METHOD_DEST = "method:"


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The options each registered method declares (:func:`interp.methods.option`): ``--<method>-<flag>``, one
    argument group per method after "methods and budgets". A plugin's methods show once it is loaded
    (:func:`load_plugins`). An option not given keeps the method's comparison default."""

    for name, cls in REGISTRY.items():
        options = cls.command_options()
        if not options:
            continue
        group = parser.add_argument_group(f"options of {cls.label or name} ({name})")
        for f in options:
            kind, tp = field_type(f)
            shown = f.metadata.get("compare", f.default if f.default is not MISSING else f.default_factory())
            kw = {"dest": f"{METHOD_DEST}{name}:{f.name}", "type": tp, "default": None,
                  "help": f"{f.metadata['help']} (default: {' '.join(map(str, shown)) if kind == 'tuple' else shown})"}
            kw["metavar"] = (f.metadata.get("flag") or f.name).upper()
            if kind == "tuple":
                kw["nargs"] = "*"
            if "choices" in f.metadata:
                kw["choices"] = list(f.metadata["choices"])
            group.add_argument(cls.flag(f), **kw)
    # after "methods and budgets", before the held-out sets: in the order the help reads
    groups = parser._action_groups
    mine = [g for g in groups if (g.title or "").startswith("options of ")]
    rest = [g for g in groups if g not in mine]
    at = next((i + 1 for i, g in enumerate(rest) if g.title == "methods and budgets"), len(rest))
    groups[:] = rest[:at] + mine + rest[at:]


def method_options_from_args(args: argparse.Namespace) -> dict:
    """``{method: {option: value}}`` of the method flags given (lists as tuples)."""
    out: dict = {}
    for dest, v in vars(args).items():
        if dest.startswith(METHOD_DEST) and v is not None:
            method, name = dest[len(METHOD_DEST):].split(":")
            out.setdefault(method, {})[name] = tuple(v) if isinstance(v, list) else v
    return out


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    """``--plugin`` (repeatable), read before the parser is built (:func:`load_plugins`); here it is documented."""
    option_group(parser, "methods and budgets").add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="a .py file or module that registers attribution methods (interp.methods.register); "
                             "their options and results then appear like the shipped methods' (repeatable)")


def load_plugins(argv, prog: str) -> None:
    """Load the ``--plugin`` files and modules of ``argv`` before the parser is built, so their methods' options
    are options of the command; a missing one exits with one line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)

    for spec in known.plugin:
        try:
            load_plugin(spec)
        except ValueError as err:  # as parser.exit would: one line, exit 2
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the sweeps run (:mod:`interp.core.executors`), in the "outputs and execution" group: results and caches do
    not depend on it, so a run started on one executor resumes on the other."""
    g = option_group(parser, OUTPUTS[0])
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the sweeps run: local (this process) or ray (Ray workers that each load the model "
                        "once; pip install -e '.[ray]'); the results are the same (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto', 'host:6379', 'ray://host:10001'); default: start a local one")
    g.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: the cluster's CPUs / --ray-cpus-per-worker, or its GPUs / "
                        "--ray-gpus-per-worker)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=None, help="CPUs (torch threads) per worker (default 1)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="GPUs per worker, e.g. 1 (with --device cuda) or 0.5 to share one (default 0)")
    g.add_argument("--ray-connect-timeout", type=float, default=None,
                   help="seconds to wait for the cluster at --ray-address to answer before failing (default 10)")


def executor_from_args(parser, args):
    """The executor the options name; a bad combination or a missing Ray exits with one line."""

    options = {"address": args.ray_address, "workers": args.ray_workers, "cpus_per_worker": args.ray_cpus_per_worker,
               "gpus_per_worker": args.ray_gpus_per_worker, "connect_timeout": args.ray_connect_timeout}
    try:
        return make_executor(args.executor, **options)
    except (ValueError, ImportError, ConnectionError) as err:
        parser.exit(2, f"error: {err}\n")
