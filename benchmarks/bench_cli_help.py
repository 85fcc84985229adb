"""Wall time of ``python -m analyses.<command> --help`` in a fresh interpreter: the commands import the library at
the top of their modules, so this is mostly the import of torch, diffusers and the suite.

    .venv/bin/python benchmarks/bench_cli_help.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("compare_methods", "erasure_curves", "edit_concepts", "text_restoration", "end_to_end", "train_sae")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    for command in COMMANDS:
        seconds = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"analyses.{command}", "--help"], cwd=root, check=True,
                           capture_output=True)
            seconds.append(time.perf_counter() - t0)
        print(f"{command:18s} --help: median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s "
              f"over {a.rounds} runs")


if __name__ == "__main__":
    main()
