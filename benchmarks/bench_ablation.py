"""True ablation of N feed-forward output neurons, three ways, measured in one interleaved run (issue 15, item 4):

naive
    the loop a researcher writes: deep-copy the UNet, zero the neuron's row and bias of ``ff.net.2``, run the text
    encoder and the UNet on the evaluation set.
careful
    in place: zero the row and bias, run the text encoder and the UNet, restore the row and bias.
engine
    ``interp.attribute("ablation", ...)``: multipliers on the neurons' outputs through nnsight, many one-hot masks
    per batched pass, text states computed once per evaluation set.
upstream-cached (prototype, this script only)
    the "fewer FLOPs" lever: a neuron's ablation cannot change anything upstream of its UNet stage, so the states
    entering every stage (and the skip connections produced before it) are computed once per evaluation set, and
    each batch of masks runs the UNet only from the earliest stage it touches (diffusers' UNet2DConditionModel
    down / mid / up structure, skips included). Plain forward hooks apply the masks here; it is not the engine.

All four use the default evaluation set of ``compare_methods`` (4 images x 2 timesteps x both erase branches through
the ablated model = 16 UNet rows per mask) and must agree on every delta J. Printed: ms per component (median over
interleaved rounds), FLOPs per component (``torch.utils.flop_counter`` on a meta-device copy, where attention is
counted; text encoder included where a method runs it), achieved FLOP/s, and a 1024x1024 float32 matmul's FLOP/s
measured in the same run.

    python benchmarks/bench_ablation.py [--n 32] [--rounds 3] [--threads 2] [--model concept-world]
"""

from __future__ import annotations

import argparse
import copy
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


class StagedUNet:
    """UNet2DConditionModel's forward split at its stages (conv_in + down blocks, mid, up blocks), so a run can
    start from cached states at any stage. Follows diffusers' forward for SD-style UNets (no class / added
    embeddings, no ControlNet residuals)."""

    def __init__(self, unet):
        self.u = unet
        self.stages = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + \
                      [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]

    def _block(self, blk, sample, emb, ctx, **kw):
        if getattr(blk, "has_cross_attention", False):
            return blk(hidden_states=sample, temb=emb, encoder_hidden_states=ctx, **kw)
        return blk(hidden_states=sample, temb=emb, **kw)

    def run(self, x, t, ctx, start: int = 0, cache: dict | None = None, record: dict | None = None):
        """Run from stage ``start`` (with ``cache[start]`` = (sample, skips, emb) repeated to the batch); with
        ``record``, store the state entering every stage."""
        u = self.u
        if start == 0:
            emb = u.time_embedding(u.time_proj(t).to(x.dtype))
            sample = u.conv_in(x)
            skips = (sample,)
        else:
            sample, skips, emb = cache[start]
        n_down = len(u.down_blocks)
        for i, name in enumerate(self.stages):
            if i < start:
                continue
            if record is not None:
                record[i] = (sample, skips, emb)
            if i < n_down:
                sample, res = self._block(u.down_blocks[i], sample, emb, ctx)
                skips = skips + tuple(res)
            elif i == n_down:
                sample = u.mid_block(sample, emb, encoder_hidden_states=ctx) if u.mid_block is not None else sample
            else:
                blk = u.up_blocks[i - n_down - 1]
                k = len(blk.resnets)
                res, skips = skips[-k:], skips[:-k]
                sample = self._block(blk, sample, emb, ctx, res_hidden_states_tuple=res)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept-world")
    p.add_argument("--n", type=int, default=32, help="components ablated (spread over all ff.net.2 neurons)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--timesteps", type=int, nargs="+", default=[250, 600])
    p.add_argument("--concept", default="red")
    p.add_argument("--skip-naive", action="store_true", help="leave out the deep-copy loop (slow on big models)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import interp
    from interp.objectives import Objective, ObjectiveConfig
    from interp.plan import _meta_flops
    from torch.utils.flop_counter import FlopCounterMode

    model = interp.load_model(args.model)
    allc = model.components("neuron", kind="ff.net.2")
    step = max(1, len(allc) // args.n)
    comps = interp.ComponentSet([allc[i] for i in range(0, len(allc), step)][: args.n])
    obj = Objective(model, args.concept, ObjectiveConfig(n_images=args.images, timesteps=tuple(args.timesteps)))
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

    def naive():
        out = []
        for c in comps:
            u = copy.deepcopy(unet)
            w, b, i = target(u, c)
            with torch.no_grad():
                w[i] = 0
                b[i] = 0
                ctx = text(ids)[0]
                out.append(erase_j(u(x, t, encoder_hidden_states=ctx, return_dict=False)[0], S).double() - j0)
        return torch.stack(out)

    def careful():
        out = []
        for c in comps:
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

    def engine():
        df = interp.attribute("ablation", model, args.concept, comps, objective=obj)
        return -torch.tensor(df["score"].to_numpy(float))

    # -- the prototype: start each batch of masks at the earliest stage it ablates ------------------------------------
    staged = StagedUNet(unet)
    stage_of = {c: staged.stages.index(c.block) for c in comps}
    ctx_all = torch.cat([obj.ctx_target[idx], obj.ctx_anchor[idx]])
    masks_per_pass = max(1, obj.config.max_batch // rows)

    def cached():
        with torch.no_grad():
            rec: dict = {}
            staged.run(x, t, ctx_all, record=rec)  # once per evaluation set
            out = torch.empty(len(comps), dtype=torch.float64)
            order = sorted(range(len(comps)), key=lambda k: stage_of[comps[k]])
            for s0 in range(0, len(order), masks_per_pass):
                group = order[s0 : s0 + masks_per_pass]
                start = min(stage_of[comps[k]] for k in group)
                R = len(group)
                sample, skips, emb = rec[start]
                rep = lambda z: z.repeat(R, *([1] * (z.dim() - 1)))  # noqa: E731
                cache = {start: (rep(sample), tuple(rep(s) for s in skips), rep(emb))}
                handles = []
                for j, k in enumerate(group):
                    c = comps[k]

                    def hook(m, a, o, j=j, f=c.index):
                        o = o.clone()
                        o[j * rows : (j + 1) * rows, ..., f] = 0
                        return o

                    handles.append(unet.get_submodule(c.module.split(".", 1)[1]).register_forward_hook(hook))
                try:
                    eps = staged.run(rep(x), rep(t), rep(ctx_all), start, cache)
                finally:
                    for h in handles:
                        h.remove()
                eps = eps.reshape(R, rows, *eps.shape[1:])
                for j, k in enumerate(group):
                    out[k] = (erase_j(eps[j], S).double() - j0).mean()
            return out

    # agreement first: every way computes the same delta J
    with torch.no_grad():
        ref = engine()
        d_careful = careful().mean(1)
        d_cached = cached()
    assert torch.allclose(d_careful, ref, rtol=1e-3, atol=1e-6), (d_careful - ref).abs().max()
    assert torch.allclose(d_cached, ref, rtol=1e-3, atol=1e-6), (d_cached - ref).abs().max()
    if not args.skip_naive:
        assert torch.allclose(naive().mean(1), ref, rtol=1e-3, atol=1e-6)

    # FLOPs per component: UNet rows on the meta copy (attention counted), text encoder on the real one
    f_row, _ = _meta_flops(model, comps)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        text(ids)
    f_text = fc.get_total_flops()
    f_unet = rows * f_row
    # the prototype's FLOPs: the stages it runs, counted on the real model with the math attention kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc_full:
        staged.run(x, t, ctx_all)
    rec: dict = {}
    with torch.no_grad():
        staged.run(x, t, ctx_all, record=rec)
    f_stage = {}
    for s in sorted(set(stage_of.values())):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc_s:
            staged.run(x, t, ctx_all, s, rec)
        f_stage[s] = fc_s.get_total_flops()
    f_cached = sum(f_stage[stage_of[c]] for c in comps) / len(comps)

    ways = {"naive (deep copy)": (naive, f_unet + f_text), "careful (in place)": (careful, f_unet + f_text),
            "engine": (engine, f_unet), "upstream-cached (prototype)": (cached, f_cached)}
    if args.skip_naive:
        ways.pop("naive (deep copy)")
    times = {k: [] for k in ways}
    peak = []
    for _ in range(args.rounds):
        peak.append(matmul_flops_per_s())
        for name, (fn, _) in ways.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times[name].append((time.perf_counter() - t0) / len(comps))
    mm = statistics.median(peak)
    print(f"{args.model}: {len(comps)} of {len(allc)} ff.net.2 neurons, {rows} UNet rows per mask "
          f"({args.images} images x {len(args.timesteps)} timesteps x 2 erase branches), {args.threads} threads, "
          f"{args.rounds} interleaved rounds; full UNet forward {fc_full.get_total_flops() / rows / 1e6:.1f} MFLOP/row "
          f"(math attention), meta count {f_row / 1e6:.1f}")
    print(f"1024x1024 float32 matmul: {mm / 1e9:.1f} GFLOP/s")
    eng = statistics.median(times["engine"])
    print(f"{'way':<30}{'ms/component':>14}{'MFLOP/component':>17}{'GFLOP/s':>9}{'of matmul':>10}{'vs engine':>10}")
    for name, (_, flops) in ways.items():
        s = statistics.median(times[name])
        print(f"{name:<30}{s * 1e3:>14.1f}{flops / 1e6:>17.1f}{flops / s / 1e9:>9.1f}{flops / s / mm:>10.0%}"
              f"{s / eng:>9.2f}x")
    if "naive (deep copy)" in times:
        print(f"engine vs naive: {statistics.median(times['naive (deep copy)']) / eng:.2f}x (target >= 6x); "
              f"engine vs careful: {statistics.median(times['careful (in place)']) / eng:.2f}x (target >= 3x)")
    cst = statistics.median(times["upstream-cached (prototype)"])
    print(f"prototype vs naive: {statistics.median(times.get('naive (deep copy)', [float('nan')])) / cst:.2f}x, vs "
          f"careful: {statistics.median(times['careful (in place)']) / cst:.2f}x, vs engine: {eng / cst:.2f}x; "
          f"FLOPs per component {f_cached / f_unet:.0%} of the engine's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
