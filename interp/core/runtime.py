"""Process settings: glibc's allocator for fast passes on a CPU, and the loading bars of the libraries underneath.

A UNet pass over a batch of rows allocates activations of megabytes each and frees them before the next pass. glibc's
``malloc`` serves an allocation above its mmap threshold with fresh pages from the kernel and gives the freed top of
its heap back to the kernel above its trim threshold; both thresholds start at 128 KiB (the mmap threshold rises
with the chunks freed, the trim threshold with it, but not past a mix of sizes such as a UNet's). So every pass
faults in and zeroes its activations' pages again, in the kernel and on the critical path (the README's
"Benchmarks" has the measured share). Raising the mmap threshold to glibc's maximum (32 MiB on
64-bit) and the trim threshold to 1 GiB keeps those pages in the process: the allocator reuses them, as jemalloc
or tcmalloc (the allocators PyTorch's CPU tuning guides preload) would. Results are bitwise the same; only memory
that was freed stays mapped (up to the trim threshold) for the next pass. ``benchmarks/bench_ablation.py`` measures
the effect (``--allocator default`` against the tuned default).

:func:`tune_cpu_allocator` is called by :func:`interp.load_model` for a model on the CPU. It does nothing on a
non-glibc system, when ``INTERP_TUNE_MALLOC=0``, or when the process was started with glibc's own
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (the user's choice wins).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2); mallopt refuses more.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_tuned: bool | None = None  # None: not tried yet in this process


def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the process (see the module docstring); once per process, idempotent.
    Returns whether glibc's allocator runs with the tuned thresholds."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if (not sys.platform.startswith("linux") or os.environ.get("INTERP_TUNE_MALLOC", "1") == "0"
            or any(k in os.environ for k in _ENV)):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def hide_library_progress_bars() -> None:
    """Turn off diffusers' and transformers' own bars ("Loading pipeline components", "Loading weights") in this
    process, for good (a notebook's setup); the suite's bars are switched by each call's ``progress`` argument.
    :func:`library_progress_bars` does the same for one block and then restores them."""
    _set_library_bars((False, False))


def _library_bars() -> tuple[bool, bool]:
    import diffusers
    import transformers

    return diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()


def _set_library_bars(enabled: tuple[bool, bool]) -> None:
    import diffusers
    import transformers

    for lib, on in zip((diffusers, transformers), enabled):
        (lib.utils.logging.enable_progress_bar if on else lib.utils.logging.disable_progress_bar)()


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Within the block, diffusers' and transformers' bars are on or off; after it (also when it raises) they are
    as before. Both libraries have only a process-wide switch, so a command run from a notebook with
    ``--no-progress`` would otherwise leave them off for the rest of the kernel."""
    before = _library_bars()
    _set_library_bars((enabled, enabled))
    try:
        yield
    finally:
        _set_library_bars(before)
