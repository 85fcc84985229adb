"""Results cached on disk under a hash of their configuration, checked on reuse, resumable.

Layout: ``<root>/<name>-<hash>/`` holds ``result.parquet`` + ``meta.json`` once a computation is complete, and
``chunks/`` while it runs. Long computations are split into chunks; each finished chunk is written atomically, so a
killed run resumes from the chunks it finished. The final table is written last, atomically: a folder without
``result.parquet`` is never a complete result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def config_hash(config: dict) -> str:
    """A stable short hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleCacheError(RuntimeError):
    """A cached result whose metadata does not match the configuration that asked for it."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class Entry:
    """One cached computation."""

    def __init__(self, root: Path, name: str, config: dict):
        self.config = config
        self.hash = config_hash(config)
        self.dir = Path(root) / f"{name}-{self.hash}"

    @property
    def complete(self) -> bool:
        return (self.dir / "result.parquet").exists() and (self.dir / "meta.json").exists()

    def load(self) -> pd.DataFrame:
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta.get("config") != json.loads(json.dumps(self.config, sort_keys=True, default=str)):
            raise StaleCacheError(
                f"cached result in {self.dir} was made with another configuration; delete the folder to recompute"
            )
        df = pd.read_parquet(self.dir / "result.parquet")
        df.attrs["meta"] = meta
        return df

    def save(self, df: pd.DataFrame, meta: dict) -> pd.DataFrame:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "config": json.loads(json.dumps(self.config, sort_keys=True, default=str))}
        tmp = self.dir / f"result.parquet.tmp{os.getpid()}"
        df.to_parquet(tmp, index=False)
        _atomic_write_bytes(self.dir / "meta.json", json.dumps(meta, indent=1, default=str).encode())
        tmp.replace(self.dir / "result.parquet")
        df.attrs["meta"] = meta
        return df

    # -- chunks ------------------------------------------------------------------------------------------
    def chunk(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Return chunk ``key`` from disk, or compute and store it atomically."""
        path = self.dir / "chunks" / f"{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        out = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(out, tmp)
        tmp.replace(path)
        return out

    def finished_chunks(self) -> int:
        d = self.dir / "chunks"
        return len(list(d.glob("*.pt"))) if d.exists() else 0


class Store:
    """A folder of cached results. ``Store(None)`` caches nothing (every call computes, chunks stay in memory)."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def entry(self, name: str, config: dict) -> "Entry | MemoryEntry":
        return MemoryEntry(config) if self.root is None else Entry(self.root, name, config)


class MemoryEntry:
    """An entry that never touches disk."""

    complete = False

    def __init__(self, config: dict):
        self.config = config
        self.hash = config_hash(config)

    def chunk(self, key, compute):
        return compute()

    def save(self, df, meta):
        df.attrs["meta"] = {**meta, "config": self.config}
        return df

    def finished_chunks(self) -> int:
        return 0


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
