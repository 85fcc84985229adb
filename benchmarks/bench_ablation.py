"""True ablation of N feed-forward output neurons, three ways, measured in one interleaved run (issue 15, item 4):

naive
    the loop a researcher writes: deep-copy the UNet, zero the neuron's row and bias of ``ff.net.2``, run the text
    encoder and the UNet on the evaluation set.
careful
    in place: zero the row and bias, run the text encoder and the UNet, restore the row and bias.
engine, full passes
    ``interp.attribute("ablation", ...)`` with prefix replay off: multipliers on the neurons' outputs through
    nnsight, many one-hot masks per batched pass, text states computed once per evaluation set.
engine
    the same with prefix replay (:mod:`interp.core.prefix`, the default): a batch of masks replays the intact UNet
    upstream of its earliest ablated unit instead of running it, where the FLOPs that skips exceed those of the
    intact pass that fills the replay cache (emptied before every timed run, so each run pays that pass, as a real
    run does); otherwise it runs full passes.

All four use the default evaluation set of ``compare_methods`` (4 images x 2 timesteps x both erase branches through
the ablated model = 16 UNet rows per mask) and must agree on every delta J. Printed: ms per component (median over
interleaved rounds), FLOPs per component (each way run once under ``torch.utils.flop_counter`` with the math
attention kernel, so attention is counted; the text encoder included where a way runs it), achieved FLOP/s, and a
1024x1024 float32 matmul's FLOP/s measured in the same run.

    python benchmarks/bench_ablation.py [--n 0 (all)] [--rounds 3] [--threads 2] [--max-batch 256] [--model concept-world]
    python benchmarks/bench_ablation.py --allocator default    # glibc's malloc untuned (see interp.core.runtime)
    python benchmarks/sd15_sized.py /tmp/sd15-16 --sample-size 16
    python benchmarks/bench_ablation.py --model /tmp/sd15-16 --n 8 --rounds 1 --images 1 --timesteps 500
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import resource
import statistics
import time

import torch


def matmul_flops_per_s(reps: int = 20) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024**3 / statistics.median(times)


def erase_j(eps: torch.Tensor, S: int) -> torch.Tensor:
    """Per-sample erase objective from a (2S, ...) batch: target rows first, anchor rows second."""
    return (eps[:S] - eps[S:]).pow(2).mean(dim=tuple(range(1, eps.dim())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept-world")
    p.add_argument("--n", type=int, default=0,
                   help="components ablated, spread over all ff.net.2 neurons (default 0: all of them, as a "
                        "comparison ablates them)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--timesteps", type=int, nargs="+", default=[250, 600])
    p.add_argument("--concept", default="red")
    p.add_argument("--skip-naive", action="store_true", help="leave out the deep-copy loop (slow on big models)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the engine's UNet rows per pass (default: ObjectiveConfig's)")
    p.add_argument("--also-batch", type=int, nargs="*", default=[],
                   help="also time the engine at these rows per pass, interleaved with the rest")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="glibc's malloc as load_model tunes it for every way (interp.core.runtime), or its defaults "
                        "(INTERP_TUNE_MALLOC=0)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator == "default":
        os.environ["INTERP_TUNE_MALLOC"] = "0"

    from torch.utils.flop_counter import FlopCounterMode

    import interp
    from interp.core.objectives import Objective, ObjectiveConfig

    model = interp.load_model(args.model)
    allc = model.components("neuron", kind="ff.net.2")
    n = args.n or len(allc)
    step = max(1, len(allc) // n)
    comps = interp.ComponentSet([allc[i] for i in range(0, len(allc), step)][:n])
    extra = {} if args.max_batch is None else {"max_batch": args.max_batch}
    obj = Objective(model, args.concept, ObjectiveConfig(n_images=args.images, timesteps=tuple(args.timesteps), **extra))
    S, rows = obj.n_samples, obj.rows_per_eval
    idx = obj.image_index
    ids = torch.cat([obj.target_ids[idx], obj.anchor_ids[idx]])
    x = torch.cat([obj.x_t, obj.x_t])
    t = torch.cat([obj.t, obj.t])
    unet, text = model.unet, model.text_encoder
    j0 = obj.intact.double()

    def target(u, c):
        mod = u.get_submodule(c.module.split(".", 1)[1])
        return mod.weight, mod.bias, c.index

    def naive(subset=None):
        out = []
        for c in subset or comps:
            u = copy.deepcopy(unet)
            w, b, i = target(u, c)
            with torch.no_grad():
                w[i] = 0
                b[i] = 0
                ctx = text(ids)[0]
                out.append(erase_j(u(x, t, encoder_hidden_states=ctx, return_dict=False)[0], S).double() - j0)
        return torch.stack(out)

    def careful(subset=None):
        out = []
        for c in subset or comps:
            w, b, i = target(unet, c)
            with torch.no_grad():
                saved = (w[i].clone(), b[i].clone())
                try:
                    w[i] = 0
                    b[i] = 0
                    ctx = text(ids)[0]
                    out.append(erase_j(unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0], S).double() - j0)
                finally:
                    w[i], b[i] = saved
        return torch.stack(out)

    def engine(replay: bool = True, objective=None):
        o = objective or obj
        o.replay_prefix, o._replayed = replay, {}
        df = interp.attribute("ablation", model, args.concept, comps, objective=o)
        return -torch.tensor(df["score"].to_numpy(float))

    other = {b: Objective(model, args.concept, dataclasses.replace(obj.config, max_batch=b)) for b in args.also_batch}

    def engine_full():
        return engine(replay=False)

    # agreement first: every way computes the same delta J
    with torch.no_grad():
        ref = engine()
        d_full = engine_full()
        d_careful = careful().mean(1)
        pos = list(range(0, len(comps), max(1, len(comps) // 8)))  # the deep-copy loop checked on 8: it is slow
        d_naive = None if args.skip_naive else naive([comps[i] for i in pos]).mean(1)
    for d in (d_full, d_careful, *(engine(objective=o) for o in other.values())):
        assert torch.allclose(d, ref, rtol=1e-3, atol=1e-6), (d - ref).abs().max()
    if d_naive is not None:
        assert torch.allclose(d_naive, ref[pos], rtol=1e-3, atol=1e-6), (d_naive - ref[pos]).abs().max()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flops_of(fn, per_component_same: bool = False) -> float:
        """FLOPs of one run of ``fn`` per component, attention included (math kernel). The loops do the same work
        for every component (one text encoder and UNet pass), so they are counted on 4 of them."""
        few = list(comps)[:4]
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            fn(few) if per_component_same else fn()
        return fc.get_total_flops() / (len(few) if per_component_same else len(comps))

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc_full:
        unet(x, t, encoder_hidden_states=torch.cat([obj.ctx_target[idx], obj.ctx_anchor[idx]]), return_dict=False)
    ways = {"naive (deep copy)": naive, "careful (in place)": careful, "engine, full passes": engine_full,
            **{f"engine, max_batch {b}": (lambda o=o: engine(objective=o)) for b, o in other.items()},
            "engine": engine}
    if args.skip_naive:
        ways.pop("naive (deep copy)")
    flops = {name: flops_of(fn, name.startswith(("naive", "careful"))) for name, fn in ways.items()}
    # The rate a plain UNet pass (no nnsight, no interventions) reaches at the engine's batch: what the engine's
    # FLOPs would cost with no overhead at all, the bound of any exact ablation at this rate.
    reps = max(1, min(obj.config.max_batch // rows, len(comps)))  # the engine batches at most every mask at once
    ctx_all = torch.cat([obj.ctx_target[idx], obj.ctx_anchor[idx]])
    xb, tb, cb = x.repeat(reps, 1, 1, 1), t.repeat(reps), ctx_all.repeat(reps, 1, 1)

    def plain():
        unet(xb, tb, encoder_hidden_states=cb, return_dict=False)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc_plain:
        plain()
    times = {k: [] for k in ways}
    faults = {k: [] for k in ways}  # minor page faults: memory the allocator got from the kernel again
    peak, plain_s = [], []
    for _ in range(args.rounds):
        peak.append(matmul_flops_per_s())
        with torch.no_grad():
            plain()  # warm: the allocator's pool at this size
            t0 = time.perf_counter()
            plain()
            plain_s.append(time.perf_counter() - t0)
        for name, fn in ways.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times[name].append((time.perf_counter() - t0) / len(comps))
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(comps))
    mm = statistics.median(peak)
    print(f"{args.model}: {len(comps)} of {len(allc)} ff.net.2 neurons, {rows} UNet rows per mask "
          f"({args.images} images x {len(args.timesteps)} timesteps x 2 erase branches), {args.threads} threads, "
          f"{args.rounds} interleaved rounds, engine max_batch {obj.config.max_batch}; full UNet forward {fc_full.get_total_flops() / rows / 1e6:.1f} MFLOP/row "
          f"(math attention)")
    from interp.core.runtime import tune_cpu_allocator

    print(f"1024x1024 float32 matmul: {mm / 1e9:.1f} GFLOP/s; glibc allocator: "
          f"{'tuned' if tune_cpu_allocator() else 'defaults'}")
    eng = statistics.median(times["engine"])
    print(f"{'way':<30}{'ms/component':>14}{'MFLOP/component':>17}{'GFLOP/s':>9}{'of matmul':>10}{'vs engine':>10}"
          f"{'faults/component':>18}")
    for name in ways:
        s, f = statistics.median(times[name]), flops[name]
        print(f"{name:<30}{s * 1e3:>14.1f}{f / 1e6:>17.1f}{f / s / 1e9:>9.1f}{f / s / mm:>10.0%}{s / eng:>9.2f}x"
              f"{statistics.median(faults[name]):>18,.1f}")
    if "naive (deep copy)" in times:
        print(f"engine vs naive: {statistics.median(times['naive (deep copy)']) / eng:.2f}x (target >= 6x); "
              f"engine vs careful: {statistics.median(times['careful (in place)']) / eng:.2f}x (target >= 3x)")
    rate = fc_plain.get_total_flops() / statistics.median(plain_s)
    bound = flops["engine"] / rate
    print(f"plain UNet pass of {len(xb)} rows (no nnsight, no interventions): {rate / 1e9:.1f} GFLOP/s; the engine's "
          f"{flops['engine'] / 1e6:.0f} MFLOP per component at that rate with no overhead: {bound * 1e3:.1f} ms, "
          f"{statistics.median(times['careful (in place)']) / bound:.2f}x over the careful loop (the most an exact "
          f"ablation of these FLOPs reaches here; the engine reaches {bound / eng:.0%} of it)")
    # The floor of any exact ablation: each component re-runs only the UNet after its own unit (the UNet before it
    # replayed for free, no fill pass), whatever the batching.
    from interp.core.prefix import frontier, upstream_share

    floor = statistics.mean(1 - upstream_share(model, frontier(model, model.events[("out", c.module)])) for c in comps)
    floor_s = floor * fc_full.get_total_flops() / rate
    print(f"floor of an exact ablation (each component re-runs only what follows its unit, nothing else): "
          f"{floor:.1%} of a full pass's FLOPs, the engine {flops['engine'] / fc_full.get_total_flops():.1%}; at the "
          f"plain pass's rate {floor_s * 1e3:.1f} ms, {statistics.median(times['careful (in place)']) / floor_s:.2f}x "
          f"over the careful loop")
    full = statistics.median(times["engine, full passes"])
    print(f"prefix replay: {full / eng:.2f}x faster than full passes, {flops['engine'] / flops['engine, full passes']:.0%} "
          f"of their FLOPs per component")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
