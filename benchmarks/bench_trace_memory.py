"""The process's resident memory over many nnsight traces (moved here from ``tests/test_interventions.py``, which
counts live tensors and nnsight objects instead: RSS moves with the allocator's pools and the machine's other work).

    .venv/bin/python benchmarks/bench_trace_memory.py [--traces 500] [--every 100]

Traces of one row through the shipped concept world's UNet, each with a three-unit ablation plan and one saved
output, as ``run_unet`` runs them; printed: RSS every ``--every`` traces and its growth after the first block.
"""

from __future__ import annotations

import argparse
import gc
import resource


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = int(f.read().split("VmRSS:")[1].split()[0])
    return kib / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=int, default=500)
    p.add_argument("--every", type=int, default=100)
    a = p.parse_args(argv)
    import torch

    import interp
    from interp.core.interventions import compile_plan, run_unet
    from interp.core.objectives import Objective, ObjectiveConfig

    torch.set_num_threads(1)
    m = interp.load_model("concept-world", device="cpu")
    obj = Objective(m, "red", ObjectiveConfig(n_images=1, timesteps=(500,)))
    mid = "unet.mid_block.attentions.0.transformer_blocks.0"
    plan = compile_plan(m, [f"{mid}.ff.net.0[1]", "unet.down_blocks.1.resnets.0.conv1[0]", f"{mid}.attn2[0]"])
    x, t, ctx = obj.x_t[:1], obj.t[:1], obj.ctx_target[obj.image_index][:1]
    first = None
    for i in range(1, a.traces + 1):
        with torch.no_grad():
            run_unet(m, x, t, ctx, plan, torch.rand(1, 3), saves=[f"{mid}.ff.net.2"])
        if i % a.every == 0:
            gc.collect()
            now = rss_mib()
            first = now if first is None else first
            print(f"{i:6d} traces: RSS {now:8.1f} MiB (+{now - first:.1f} since {a.every}); "
                  f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
