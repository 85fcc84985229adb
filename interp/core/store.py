"""One content-addressed cache for every computed item, checked on reuse, resumable.

Every item is keyed by a hash of everything it depends on, given by the caller as a JSON-able ``config`` (for a
method: the model's weight fingerprint, the full component list, the objective and its evaluation set, the method's
config), plus :data:`FORMAT_VERSION`, the version of the on-disk format and of the code that reads it. Layout:
``<root>/<name>-<hash>/`` holds the item's files and ``meta.json``, a manifest with the item's metadata, its config
and the sha256 of every file. The manifest is written last, atomically: a folder without a valid manifest is not a
finished item. Long computations are split into chunks (``chunks/<key>.pt``), each written atomically with a digest
of its values and the cost (model evaluations) it took, so a killed run resumes from its finished chunks and still
reports the cost of an uninterrupted run.

A missing, truncated, unreadable, stale or checksum-failing item or chunk is never used: it is recomputed, with a
:class:`CacheWarning` naming the file (content addressing and checksums follow the usual build-cache design, e.g.
Bazel's content-addressable storage; atomic replace is POSIX ``rename``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

#: Bump when the layout of cached items or the meaning of their contents changes: older items are then not reused.
FORMAT_VERSION = 3  # 3: stochastic schedulers draw step noise per image (interp.core.generation.step_generators)


class CacheWarning(UserWarning):
    """A cached item could not be used (missing, truncated, unreadable, stale or corrupted) and is recomputed."""


class StaleCacheError(RuntimeError):
    """Kept for callers of earlier versions: stale items are now recomputed with a :class:`CacheWarning`."""


def canonical(config) -> object:
    """``config`` as plain JSON values (tuples become lists, unknown objects their ``str``)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_hash(config: dict) -> str:
    """A stable short hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk fails here, before the old file is replaced
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def frame_to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def tensor_digest(obj, h=None) -> str:
    """A digest of a nest of dicts, lists, tensors and plain values (dtype, shape and bytes of every tensor)."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            tensor_digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


def _warn(path: Path, problem: str) -> None:
    warnings.warn(f"cached item {path} {problem}; recomputing it", CacheWarning, stacklevel=3)


class Entry:
    """One cached item: a result frame and/or named files, plus the chunks of its computation."""

    def __init__(self, root: Path, name: str, config: dict):
        self.config = config
        self.key = canonical({"format": FORMAT_VERSION, "config": config})
        self.hash = config_hash(self.key)
        self.dir = Path(root) / f"{name}-{self.hash}"
        self._manifest: dict | None | bool = False  # False: not checked yet
        #: Cost recorded by the chunks loaded from disk (work a killed run did): added to the cost of this run.
        self.replayed: Counter = Counter()

    # -- the finished item ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        """The item's ``meta.json``: the files it holds with their checksums, its key and metadata."""
        return self.dir / "meta.json"

    def _check(self) -> dict | None:
        """The manifest if every file it lists is present and intact, else None (with a warning if it is broken)."""
        path = self.manifest_path
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            _warn(path, f"is unreadable ({type(err).__name__})")
            return None
        if manifest.get("key") != self.key:
            _warn(path, "was made for another configuration or format")
            return None
        for rel, digest in files.items():
            f = self.dir / rel
            try:
                data = f.read_bytes()
            except OSError:
                _warn(f, "is missing or unreadable")
                return None
            if sha256_bytes(data) != digest:
                _warn(f, "fails its checksum (truncated or changed)")
                return None
        return manifest

    def manifest(self) -> dict | None:
        """The manifest if every file it lists is present and intact, else None (a broken one warns once)."""
        if self._manifest is False:
            self._manifest = self._check()
        return self._manifest

    @property
    def complete(self) -> bool:
        """Whether the finished result is stored and intact."""
        return self.manifest() is not None and "result.parquet" in self.manifest()["files"]

    def load(self) -> pd.DataFrame:
        """The stored result frame, with its metadata in ``df.attrs["meta"]``.

        Raises:
            FileNotFoundError: no intact result is stored (check :attr:`complete` first).
        """
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"no intact cached result in {self.dir}")
        df = pd.read_parquet(self.dir / "result.parquet")
        df.attrs["meta"] = manifest["meta"]
        return df

    def load_maps(self) -> pd.DataFrame | None:
        """The maps saved with the result (None if it has none)."""
        if self.manifest() is None or "maps.parquet" not in self.manifest()["files"]:
            return None
        return pd.read_parquet(self.dir / "maps.parquet")

    def save(self, df: pd.DataFrame, meta: dict, maps: pd.DataFrame | None = None) -> pd.DataFrame:
        """Save a result frame, and the maps made with it; returns the frame with its metadata attached."""
        meta = {**canonical(meta), "config": canonical(self.config)}
        files = {"result.parquet": frame_to_parquet_bytes(df)}
        if maps is not None:
            files["maps.parquet"] = frame_to_parquet_bytes(maps)
        self.save_files(files, meta)
        df.attrs["meta"] = meta
        return df

    def save_files(self, files: dict[str, bytes], meta: dict | None = None) -> None:
        """Write named files (relative paths) and then the manifest that makes them a finished item."""
        for rel, data in files.items():
            atomic_write_bytes(self.dir / rel, data)
        manifest = {"key": self.key, "meta": canonical(meta or {}),
                    "files": {rel: sha256_bytes(data) for rel, data in files.items()}}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        self._manifest = manifest

    def load_files(self) -> dict[str, bytes] | None:
        """The item's files if it is finished and intact, else None."""
        manifest = self.manifest()
        if manifest is None:
            return None
        return {rel: (self.dir / rel).read_bytes() for rel in manifest["files"]}

    # -- chunks --------------------------------------------------------------------------------------------
    def cached_chunk(self, key: str) -> dict[str, torch.Tensor] | None:
        """Chunk ``key``'s values if it is on disk and intact (its recorded cost is added to :attr:`replayed`)."""
        path = self.dir / "chunks" / f"{key}.pt"
        if path.exists():
            got = self._read_chunk(path, key)
            if got is not None:
                self.replayed.update(got["counters"])
                return got["data"]
        return None

    def put_chunk(self, key: str, out: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Store chunk ``key`` atomically, with the cost (model passes) it took."""
        record = {"format": FORMAT_VERSION, "item": self.hash, "key": key, "data": out, "counters": dict(counters)}
        record["digest"] = tensor_digest({k: v for k, v in record.items()})
        buf = io.BytesIO()
        torch.save(record, buf)
        atomic_write_bytes(self.dir / "chunks" / f"{key}.pt", buf.getvalue())

    def _read_chunk(self, path: Path, key: str) -> dict | None:
        try:
            record = torch.load(path, weights_only=True)
        except Exception as err:  # truncated or foreign bytes: torch and zipfile raise many types
            _warn(path, f"is unreadable ({type(err).__name__})")
            return None
        if not isinstance(record, dict) or "digest" not in record:
            _warn(path, "has an old or foreign format")
            return None
        digest = record.pop("digest")
        if record.get("item") != self.hash or record.get("key") != key or tensor_digest(record) != digest:
            _warn(path, "fails its checksum (its values were changed)")
            return None
        return record


class Store:
    """A folder of cached results, content-addressed: every item is keyed by everything it depends on.

    ``interp.attribute(..., store="cache/")`` and every command's run folder use one. Items are written atomically
    with checksums; a missing, truncated or corrupted item is recomputed with a warning naming the file.

    Args:
        root: the folder (created on first write); None caches nothing (every call computes, chunks stay in memory).
    """

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def entry(self, name: str, config: dict) -> "Entry | MemoryEntry":
        """The cached item ``name`` for ``config`` (read it if complete, or fill it chunk by chunk).

        Args:
            name: a readable prefix of the item's folder (the method and concept, for attributions).
            config: everything the item depends on (JSON-serializable); its hash names the folder.

        Returns:
            An :class:`Entry` under ``root``, or an in-memory entry when ``root`` is None.
        """
        return MemoryEntry(config) if self.root is None else Entry(self.root, name, config)


class MemoryEntry:
    """An entry that never touches disk."""

    complete = False

    def __init__(self, config: dict):
        self.config = config
        self.hash = config_hash(canonical({"format": FORMAT_VERSION, "config": config}))
        self.replayed: Counter = Counter()

    def cached_chunk(self, key):
        return None

    def put_chunk(self, key, out, counters) -> None:
        pass

    def save(self, df, meta, maps=None):
        df.attrs["meta"] = {**meta, "config": self.config}
        return df

    def save_files(self, files, meta=None) -> None:
        pass

    def load_files(self):
        return None

