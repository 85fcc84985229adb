"""Page faults per UNet pass with and without the allocator tuning ``interp.load_model`` applies on Linux (moved
here from ``tests/test_runtime.py``, which keeps a wide bound; the factor itself depends on the heap's layout and on
the machine).

    .venv/bin/python benchmarks/bench_allocator_faults.py [--rounds 3] [--batch 16] [--passes 9]

Each measurement runs in a fresh interpreter (the allocator's settings are per process): the shipped concept world,
``--passes`` no-grad passes of ``--batch`` rows, minor faults per pass. Rounds alternate tuned and untuned runs;
printed: each run's faults per pass and the median of its last two thirds (the steady state), then the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, interp
torch.set_num_threads(1)
B, passes = int(sys.argv[1]), int(sys.argv[2])
m = interp.load_model("concept-world", device="cpu")
g = torch.Generator().manual_seed(0)
x = torch.randn(B, m.unet.config.in_channels, 16, 16, generator=g)
ctx = torch.randn(B, m.tokenizer.model_max_length, m.unet.config.cross_attention_dim, generator=g)
t = torch.full((B,), 500)
faults = []
with torch.no_grad():
    m.unet(x, t, ctx)
    for _ in range(passes):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        m.unet(x, t, ctx)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""


def run(tuned: bool, batch: int, passes: int) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("INTERP_TUNE_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    env["INTERP_TUNE_MALLOC"] = "1" if tuned else "0"
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(passes)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--passes", type=int, default=9)
    a = p.parse_args(argv)
    steady = {True: [], False: []}
    for r in range(a.rounds):
        for tuned in (True, False):
            faults = run(tuned, a.batch, a.passes)
            s = statistics.median(faults[a.passes // 3:])
            steady[tuned].append(s)
            print(f"round {r} {'tuned  ' if tuned else 'untuned'} faults per pass {faults} steady {s:g}")
    t, u = statistics.median(steady[True]), statistics.median(steady[False])
    print(f"steady state: untuned {u:g} pages a pass, tuned {t:g}; ratio {u / max(t, 1):.1f}")


if __name__ == "__main__":
    main()
