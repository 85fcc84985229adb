"""Memory and time of a gradient through generation (the classifier objective), with every UNet call's activations
kept until the backward pass against each call re-run in the backward pass
(``interp.core.objectives.checkpoints_generation``, chosen when keeping them would exceed ``max_batch`` rows).

    .venv/bin/python benchmarks/bench_generation_grad.py [--model concept-world] [--images 8] [--steps 10]
        [--max-batch 256 8] [--rounds 2] [--threads 2]

CAD over every ``ff.net.2`` neuron on the classifier objective, once per ``--max-batch`` value and round, interleaved.
Printed per run: wall time, the bytes autograd saved for backward outside re-run calls (summed over the run's
gradient groups; what a run without re-running holds at its peak is one group's share), the UNet rows re-run, and
the largest score difference against the first ``--max-batch`` value's scores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept-world")
    p.add_argument("--concept", default="red")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, nargs="+", default=[256, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import interp
    from interp.core.objectives import Objective, ObjectiveConfig

    model = interp.load_model(args.model)
    comps = model.components("neuron", kind="ff.net.2")
    objs = {b: Objective(model, args.concept, ObjectiveConfig(kind="classifier", n_images=args.images,
                                                               gen_steps=args.steps, max_batch=b))
            for b in args.max_batch}
    times: dict[int, list[float]] = {b: [] for b in objs}
    first = None
    for r in range(args.rounds):
        for b, obj in objs.items():
            saved, rows = [0], []

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            hook = model.unet.conv_in.register_forward_hook(lambda mod, a, out: rows.append(out.shape[0]))
            counted = obj.model.counters["unet_rows"]
            t0 = time.perf_counter()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    df = interp.attribute("cad", model, args.concept, comps, objective=obj)
            finally:
                hook.remove()
            times[b].append(time.perf_counter() - t0)
            again = sum(rows) - (obj.model.counters["unet_rows"] - counted)
            score = torch.tensor(df["score"].to_numpy(float))
            first = score if first is None else first
            diff = float((score - first).abs().max() / first.abs().max())
            print(f"round {r + 1} --max-batch {b}: {times[b][-1]:.2f} s, saved for backward {saved[0] / 2**20:.1f} MiB, "
                  f"{again} UNet rows re-run, largest score difference {diff:.1e} of the largest score")
    for b in objs:
        print(f"--max-batch {b}: median {statistics.median(times[b]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
