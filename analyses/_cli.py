"""What the commands share: turning an expected failure into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


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
