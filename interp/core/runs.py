"""The run layer: one folder per run, written atomically, with its status, metadata and, on failure, its traceback.

A run folder holds exactly one run's outputs. :class:`Run` (a context manager) clears the outputs of any earlier run
in the folder when it starts (its content-addressed cache in ``cache/`` stays: nothing in it can be mistaken for
another configuration's), writes ``status.json`` = ``running``, and ends with ``complete`` or, if the body raised,
``failed`` with the error, the full traceback in ``traceback.txt``. Every file goes through
:func:`interp.core.store.atomic_write_bytes`, so a killed run never leaves a half-written file, and a folder whose
status is not ``complete`` never holds a report (``index.html``, ``results.parquet``): those are written last.

:func:`user_message` turns the failures a user can act on (bad values, missing or corrupt files, a read-only or full
disk, too little memory, non-finite weights) into one line naming the file or option and the fix; the CLIs print it
and exit with code 2.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from interp.core.store import (
    atomic_write_bytes,
    atomic_write_text,
    canonical,
    config_hash,
    frame_to_parquet_bytes,
)

STATUS = "status.json"
#: Everything a run writes besides its cache; removed when a run starts, so no earlier run's output survives.
OUTPUTS = ("index.html", "results.parquet", "meta.json", "edits.json", "traceback.txt", "tables", "figures")


class RunFolderError(ValueError):
    """The run folder cannot be used (a file, or a non-empty folder that no run of this suite wrote)."""


class InsufficientMemoryError(MemoryError):
    """A configuration's estimated memory exceeds what the machine has."""


class Run:
    """One run's folder. Use as ``with Run(out, config, "compare") as run: ... run.complete()``."""

    def __init__(self, out: str | Path, config: dict, job: str):
        self.out = Path(out)
        self.config = canonical(config)
        self.job = job
        self.t0 = time.perf_counter()
        self.status = "new"

    @property
    def cache(self) -> Path:
        """The run folder's result store (``<out>/cache``), reused by every rerun of the same configuration."""
        return self.out / "cache"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "Run":
        """Claim the folder for this run: clear a previous run's outputs and write ``status.json`` = running.

        Returns:
            This run.

        Raises:
            RunFolderError: ``out`` is a file, or a non-empty folder that no run of this suite wrote.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is an existing file, not a folder: pass a folder path (created if "
                                 f"missing)")
        if out.is_dir() and any(out.iterdir()) and not (out / STATUS).exists():
            raise RunFolderError(f"--out {out} is a non-empty folder that no run of this suite wrote (no {STATUS}): "
                                 f"pass a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        self._status("running")
        return self

    def complete(self) -> None:
        """Mark the run complete (``status.json`` = complete)."""
        self._status("complete")

    def fail(self, err: BaseException) -> None:
        """Record a failure: ``traceback.txt`` and ``status.json`` = failed (best effort: the disk may be the cause)."""
        try:
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            atomic_write_text(self.out / "traceback.txt", text)
            self._status("failed", error=f"{type(err).__name__}: {err}")
        except OSError:
            pass

    def __enter__(self) -> "Run":
        return self.start()

    def __exit__(self, kind, err, tb) -> bool:
        if err is not None and self.status == "running":
            self.fail(err)
        return False

    def _status(self, status: str, **extra) -> None:
        self.status = status
        body = {"status": status, "job": self.job, "config": self.config, "config_hash": config_hash(self.config),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        atomic_write_text(self.out / STATUS, json.dumps(body, indent=1))

    # -- writing ---------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``data`` to ``rel`` under the run folder, atomically; returns the path."""
        path = self.out / rel
        atomic_write_bytes(path, data)
        return path

    def write_text(self, rel: str, text: str) -> Path:
        """Write ``text`` (UTF-8) to ``rel`` under the run folder, atomically; returns the path."""
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj) -> Path:
        """Write ``obj`` as indented JSON to ``rel`` under the run folder, atomically; returns the path."""
        return self.write_text(rel, json.dumps(obj, indent=1, default=str))

    def write_csv(self, rel: str, df) -> Path:
        """Write the frame ``df`` as CSV (no index) to ``rel`` under the run folder, atomically; returns the path."""
        return self.write_text(rel, df.to_csv(index=False))

    def write_parquet(self, rel: str, df) -> Path:
        """Write the frame ``df`` as Parquet to ``rel`` under the run folder, atomically; returns the path."""

        return self.write_bytes(rel, frame_to_parquet_bytes(df))

    def metadata(self, **extra) -> dict:
        """What every run records: its config and hash, library versions, machine, wall time so far."""
        import torch

        return {"job": self.job, "config": self.config, "config_hash": config_hash(self.config),
                "versions": versions(),
                "machine": {"platform": platform.platform(), "processor": platform.machine(),
                            "threads": torch.get_num_threads()},
                "wall_seconds": time.perf_counter() - self.t0, **extra}


# -- checks before work ------------------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes of memory available to a new allocation (psutil's estimate, else the physical memory)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needed: float, what: str, fix: str, limit: float | None = None) -> None:
    """Refuse a configuration whose estimated ``needed`` bytes exceed the memory available (or ``limit``)."""
    have = available_memory() if limit is None else limit
    if needed > have:
        raise InsufficientMemoryError(f"{what} needs about {_gb(needed)} of memory and {_gb(have)} is available: "
                                      f"{fix}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_finite_weights(model, spec: str) -> None:
    """Refuse a model with NaN or infinite weights before any method runs, naming the first such weight."""
    import torch

    for name, p in model.parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"model {spec!r}: weight {name} has {bad} non-finite (NaN/inf) values: the checkpoint is "
                             f"corrupt; retrain or re-save it")


# -- errors a user can act on -------------------------------------------------------------------------------------
#: What torch's allocators say when a tensor does not fit: CUDA's ``torch.OutOfMemoryError``, MPS, the CPU allocator.
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")
EXPECTED = (ValueError, KeyError, LookupError, OSError, MemoryError, FloatingPointError, TypeError)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch saying a tensor did not fit (CUDA's ``torch.OutOfMemoryError``, MPS's or the CPU
    allocator's error, all RuntimeErrors)."""
    return isinstance(err, RuntimeError) and any(s in str(err).lower() for s in OUT_OF_MEMORY)


def user_message(err: BaseException) -> str | None:
    """One line for a failure the user can act on, or None for an unexpected one (a bug: keep its traceback)."""
    if type(err).__name__ == "SafetensorError":  # safetensors' Rust error: not a subclass of anything useful
        return f"a safetensors file is corrupt ({_one_line(err)}): re-save or re-download the model"
    if isinstance(err, RunFolderError):
        return str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is not None:
        where = err.filename or "the run folder"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where}: {err.strerror} (read-only or no permission): choose a writable --out"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot write {where}: the disk is full: free space or choose --out on another disk"
        return f"{where}: {err.strerror}"
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "KeyError"
    if isinstance(err, MemoryError):
        return _one_line(err) or "out of memory: make the configuration smaller (fewer masks, images or components)"
    if is_out_of_memory(err):
        text = re.sub(r"^\[enforce fail[^\]]*\][^.]*\.\s*", "", _one_line(err))  # the CPU allocator's C++ check
        first = text.split(". ")[0][:160]
        return (f"out of memory ({first}): run fewer UNet rows per pass (--max-batch, ObjectiveConfig.max_batch: halve "
                f"it until a pass fits; --plan measures one pass's peak memory) or a lower --precision")
    if isinstance(err, EXPECTED):
        return _one_line(err)
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def versions() -> dict:
    """The versions of the libraries a result depends on, recorded with every run."""
    import diffusers  # deferred: a second of import time that only a run needs
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "nnsight": version("nnsight"), "python": platform.python_version()}
