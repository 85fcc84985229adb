"""Interventions on components, all through nnsight: ablation by per-row multipliers, patching, saving.

The one mechanism every method uses is a **multiplier per component and per batch row**: a unit's activation ``h``
becomes ``m * h + (1 - m) * mu``, with ``m = 1`` intact, ``m = 0`` ablated, and ``mu = 0`` (zero-ablation) or the
unit's mean over a reference set (mean-ablation). A matrix of B masks is therefore B different ablations in one
batched forward pass, and since ``m`` is a tensor, ``dJ/dm`` is one backward pass away (the mask gradients of the
beyond-first-order estimators, and CAD's neuron scores). Nothing here edits a weight: interventions act on module
outputs (neurons, layers) or on the input of an attention module's output projection (heads). The one exception,
scalar-weight ablation for ground truth at weight granularity, runs in :func:`weights_ablated`, which restores the
weights bitwise in ``finally``.

A **feature** (a latent of a sparse autoencoder attached at a module's output, :mod:`interp.core.features`) has a
multiplier too: the output ``h`` becomes ``h + sum_i (m_i - 1) (f_i(h) - mu_i) W_dec[i]``, where ``f(h)`` is the
autoencoder's top-k encoding of ``h`` and ``W_dec[i]`` the feature's decoder direction. Only the feature's own
decoded contribution moves; the autoencoder's reconstruction error stays in ``h``, so ``m = 1`` is the intact
output exactly, and ``dJ/dm_i`` at ``m = 1`` is the feature's activation times the gradient along its direction.

A **token-KV** component (head ``h`` of a cross-attention, at the concept's tokens, :mod:`interp.core.tokens`) has a
multiplier on that head's slice of the ``to_k`` and ``to_v`` outputs at the context positions of the concept word
only: ``k`` becomes ``m * k + (1 - m) * k_ref`` there (the same for ``v``), where ``k_ref`` is the anchor prompt's
key (or, with means, the unit's mean), and every other position and row is left as it was. Which positions hold the
concept, and the anchor's keys and values, are per batch row (:class:`TokenRows`): rows without the concept (the
anchor branch, the unconditional branch of guidance, prompts without the word) are untouched. A **token-span**
component (``attn2#kvs3``) is the same head at the concept's positions and every later context position (the span
mask of :class:`TokenRows`), each taking the anchor's key and value at its aligned position.

Patching replaces a module's output with a saved clean one at chosen rows (and, for the text encoder, chosen token
positions); the denoising loop decides at which timesteps a patch applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nnsight
import torch
import torch.utils.checkpoint

from interp.core.components import Component, ComponentSet, head_sites, neuron_count


@dataclass
class Site:
    """Where a group of components is reached: one module, at its output or (heads) its output projection's input."""

    path: str  # module path the trace touches
    event: str  # "in" | "out"
    axis: int  # feature axis (-1 for tokens x features, 1 for conv channels); None-like 0 for whole-layer scaling
    n_features: int
    features: torch.Tensor  # feature indices touched
    columns: torch.Tensor  # column of the multiplier matrix for each touched feature
    whole: bool = False  # layer granularity: one multiplier scales the whole output
    streams: int = 1  # tensors of the output tuple the multiplier scales (a joint block's image and context streams)
    #: feature granularity: the sparse autoencoder whose latents ``features`` are (:mod:`interp.core.features`)
    sae: object = None
    #: token-KV granularity: the multiplier acts at the concept's token positions only (a per-row :class:`TokenRows`)
    tokens: bool = False
    #: token-span granularity (with ``tokens``): at the concept's positions and every later one
    #: (:attr:`TokenRows.span_mask`)
    span: bool = False


@dataclass
class TokenRows:
    """Where the concept's tokens are, row by row of a denoiser batch, and what an ablated token-KV unit reads there.

    ``index`` (N,): for each batch row, its prompt among the ``P`` rows of ``mask`` and ``refs`` (-1: a row without
    the concept, left untouched); ``mask`` (P, L) bool: the context positions of the concept's tokens; ``refs``:
    per ``to_k``/``to_v`` path, (P, L, features), the anchor prompt's keys or values at the aligned positions (at
    every position of ``span_mask``); ``span_mask`` (P, L) bool: the concept's positions and every later one that
    has an aligned anchor position, where token-span sites act (None: no token-span site can run)."""

    index: torch.Tensor
    mask: torch.Tensor
    refs: dict
    span_mask: torch.Tensor | None = None

    def to(self, device) -> "TokenRows":
        """The same rows on ``device``."""
        mask = None if self.mask is None else self.mask.to(device)
        span = None if self.span_mask is None else self.span_mask.to(device)
        return TokenRows(self.index.to(device), mask, {k: v.to(device) for k, v in self.refs.items()}, span)

    @staticmethod
    def none(n: int) -> "TokenRows":
        """``n`` rows without the concept (a timed pass of the plan: the same work, nothing changed)."""
        return TokenRows(torch.full((n,), -1, dtype=torch.long), None, {})


@dataclass
class Plan:
    """Compiled interventions for one component set, in the model's execution order."""

    components: ComponentSet
    sites: dict[str, list[Site]] = field(default_factory=dict)  # address prefix (model part) -> sites in order
    denoiser_part: str = "unet"

    @property
    def parts(self) -> set[str]:
        return {p for p, s in self.sites.items() if s}

    @property
    def denoiser(self) -> list[Site]:
        """The sites in the denoiser, in execution order."""
        return self.sites.get(self.denoiser_part, [])

    @property
    def has_tokens(self) -> bool:
        """Whether some site is a token-KV unit's (a run then needs :class:`TokenRows`)."""
        return any(s.tokens for sites in self.sites.values() for s in sites)

    @property
    def text(self) -> list[Site]:
        """The sites in every text encoder, encoder by encoder, each in execution order."""
        return [s for p, sites in self.sites.items() if p != self.denoiser_part for s in sites]

    def with_denoiser(self, sites: list[Site]) -> "Plan":
        """This plan with the denoiser's sites replaced."""
        return Plan(self.components, {**self.sites, self.denoiser_part: sites}, self.denoiser_part)


def compile_plan(model, components: ComponentSet | Sequence[Component | str]) -> Plan:
    """Group a component set by the module each is reached at, ordered by execution."""
    if not isinstance(components, ComponentSet):
        components = ComponentSet([model.space.parse(c) for c in components])
    if "weight" in components.granularities:
        raise ValueError(
            "scalar weights are not ablated through activations; use weights_ablated() for them, or CAD, "
            "which attributes weights by gradient"
        )
    groups: dict[tuple[str, str], dict] = {}
    for col, c in enumerate(components):
        mod = model.module(c.module)
        if c.granularity == "head":
            # a head's output features, where they enter the output projection(s) (both streams of a joint
            # attention), or the attention's own output when it has no projection (FLUX's single-stream blocks)
            for suffix, event, n, d in head_sites(mod):
                g = groups.setdefault((c.module + suffix, event), {"axis": -1, "n": n, "f": [], "c": [], "whole": False})
                g["f"].extend(range(c.index * d, (c.index + 1) * d))
                g["c"].extend([col] * d)
        elif c.granularity == "feature":
            site = model.space.features[c.module]
            g = groups.setdefault((c.module, "out"), {"axis": site.dictionary.axis, "n": site.n_features, "f": [],
                                                      "c": [], "whole": False, "sae": site.dictionary})
            if g.get("sae") is not site.dictionary:
                raise ValueError(f"{c.module} appears both through its SAE features and as a layer or neurons in one "
                                 f"component set: attribute them in separate sets")
            g["f"].append(c.index)
            g["c"].append(col)
        elif c.granularity in ("tokenkv", "tokenspan"):  # head h's slice of the key and value projections' outputs
            span = c.granularity == "tokenspan"  # at the concept's positions only, or at them and every later one
            for proj in ("to_k", "to_v"):
                lin = model.module(f"{c.module}.{proj}")
                d = lin.out_features // mod.heads
                key = (f"{c.module}.{proj}", "out")
                if key in groups and not groups[key].get("tokens"):
                    raise ValueError(f"{key[0]} appears both through token-KV units and as a layer or neurons in one "
                                     f"component set: attribute them in separate sets")
                if key in groups and groups[key]["span"] != span:
                    raise ValueError(f"{c.module} appears both through token-KV (#kv) and token-span (#kvs) units in "
                                     f"one component set: attribute them in separate sets")
                g = groups.setdefault(key, {"axis": -1, "n": lin.out_features, "f": [], "c": [], "whole": False,
                                            "tokens": True, "span": span})
                g["f"].extend(range(c.index * d, (c.index + 1) * d))
                g["c"].extend([col] * d)
        elif c.granularity == "neuron":
            axis = 1 if isinstance(mod, torch.nn.Conv2d) else -1
            n = neuron_count(mod)
            if any(groups.get((c.module, "out"), {}).get(k) for k in ("whole", "sae", "tokens")):
                raise ValueError(f"{c.module} appears both as a layer or SAE features and through its units in one "
                                 f"component set")
            g = groups.setdefault((c.module, "out"), {"axis": axis, "n": n, "f": [], "c": [], "whole": False})
            g["f"].append(c.index)
            g["c"].append(col)
        else:  # layer
            key = (c.module, "out")
            if key in groups and groups[key].get("tokens"):
                raise ValueError(f"{c.module} appears both as a layer and through token-KV units in one component set")
            if key in groups:
                raise ValueError(f"{c.module} appears both as a layer and through its units in one component set")
            groups[key] = {"axis": 0, "n": 1, "f": [0], "c": [col], "whole": True,
                           "streams": model.space.modules[c.module].rule.streams}
    plan = Plan(components, {p: [] for p in model.modules()}, model.denoiser_part)
    for (path, event), g in sorted(groups.items(), key=lambda kv: model.events[(kv[0][1], kv[0][0])]):
        site = Site(path, event, g["axis"], g["n"], torch.tensor(g["f"]), torch.tensor(g["c"]), g["whole"],
                    g.get("streams", 1), g.get("sae"), g.get("tokens", False), g.get("span", False))
        plan.sites[path.split(".", 1)[0]].append(site)
    return plan


def stream_key(path: str, k: int) -> str:
    """The key of stream ``k`` of a module's output in saved states and means (``path`` itself for stream 0)."""
    return path if k == 0 else f"{path}#{k}"


def _streams(model, path: str) -> int:
    info = model.space.modules.get(path) if getattr(model, "space", None) is not None else None
    return 1 if info is None else info.rule.streams


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(old, new):
    return (new, *old[1:]) if isinstance(old, tuple) else new


def _site_scale(site: Site, mult: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row scale broadcastable to ``h`` from the multiplier rows ``mult`` (N, n_components)."""
    n = mult.shape[0]
    if site.whole:
        return mult[:, site.columns[0]].reshape(n, *([1] * (h.dim() - 1))).to(h.dtype)
    scale = torch.ones(n, site.n_features, dtype=h.dtype, device=h.device)
    scale = scale.index_copy(1, site.features.to(h.device), mult[:, site.columns].to(h.dtype))
    if site.axis == 1:
        return scale.reshape(n, site.n_features, *([1] * (h.dim() - 2)))
    return scale.reshape(n, *([1] * (h.dim() - 2)), site.n_features)


def apply_site(site: Site, h: torch.Tensor, mult: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``m * h + (1 - m) * mu`` for the units of ``site``; other features pass through unchanged. At a feature
    site (an attached sparse autoencoder), ``h + sum_i (m_i - 1) (f_i(h) - mu_i) W_dec[i]`` instead."""
    if mult.shape[0] != h.shape[0]:
        if h.shape[0] % mult.shape[0]:
            raise ValueError(f"{mult.shape[0]} multiplier rows do not divide a batch of {h.shape[0]} at {site.path}")
        mult = mult.repeat_interleave(h.shape[0] // mult.shape[0], dim=0)
    if site.sae is not None:  # an attached sparse autoencoder (interp.core.features.FeatureDictionary)
        return site.sae.apply(h, mult[:, site.columns], site.features, mean)
    s = _site_scale(site, mult, h)
    out = h * s
    if mean is not None:
        if mean.dim() == h.dim() and mean.shape[0] not in (1, h.shape[0]):  # per-row values (causal tracing)
            mean = mean.repeat(h.shape[0] // mean.shape[0], *([1] * (h.dim() - 1)))
        out = out + (1 - s) * mean.to(h.dtype)
    return out


def apply_token_site(site: Site, h: torch.Tensor, mult: torch.Tensor, mean: torch.Tensor | None,
                     tokens: TokenRows | None) -> torch.Tensor:
    """A token-KV site (a ``to_k``/``to_v`` output, (N, L, features)): ``m * h + (1 - m) * ref`` for the heads'
    features at the rows' concept positions (a token-span site: at ``tokens.span_mask``, the concept's positions and
    every later one), ``h`` itself everywhere else (so ``m = 1`` is ``h`` exactly). ``ref`` is the anchor prompt's
    value at the aligned position from ``tokens``, or ``mean`` (mean-ablation: the unit's mean over a reference
    set)."""
    if tokens is None:
        raise ValueError(f"token-KV components at {site.path} need the concept's token positions of every row: run "
                         f"them through an Objective, or generate(..., concept=WORD)")
    if tokens.index.shape[0] != h.shape[0]:
        raise ValueError(f"{tokens.index.shape[0]} token rows for a batch of {h.shape[0]} at {site.path}")
    if mult.shape[0] != h.shape[0]:
        if h.shape[0] % mult.shape[0]:
            raise ValueError(f"{mult.shape[0]} multiplier rows do not divide a batch of {h.shape[0]} at {site.path}")
        mult = mult.repeat_interleave(h.shape[0] // mult.shape[0], dim=0)
    index = tokens.index.to(h.device)
    rows = index.clamp(min=0)
    mask = tokens.span_mask if site.span else tokens.mask
    if site.span and mask is None and tokens.mask is not None:
        raise ValueError(f"token-span components at {site.path} need the span of every row (TokenRows.span_mask): "
                         f"bind the rows with interp.core.tokens.bind")
    if mask is None:  # no row holds the concept
        where, ref = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device), h if mean is None else mean
    else:
        where = mask.to(h.device)[rows] & (index >= 0)[:, None]  # (N, L)
        ref = tokens.refs[site.path].to(h.device)[rows] if mean is None else mean
    s = _site_scale(site, mult, h)
    return torch.where(where[..., None], h * s + (1 - s) * ref.to(h.dtype), h)


@dataclass
class Patch:
    """Replace a module's output by ``clean`` where ``where`` is true (broadcast over the output)."""

    clean: torch.Tensor
    where: torch.Tensor  # bool, broadcastable to the output, e.g. (N, 1, 1, 1) or (N, T, 1)


def _intervene(root_envoy, model, sites: Sequence[Site], mult, means, patches, saves, store, skips=None,
               save_inputs=(), tokens: TokenRows | None = None):
    """The body shared by every trace: visit all touched modules in execution order.

    At one module, ablation comes first, then patching, then saving: a saved output is the value that flowed
    downstream in this run (after its interventions). ``skips`` (module path -> output) are modules not run at all,
    their given outputs used instead (:mod:`interp.core.prefix`)."""
    order = {"skip": -1, "save_in": -1, "site": 0, "patch": 1, "save": 2}
    todo = [(model.events[("in", p)], "skip", p) for p in (skips or {})]
    todo += [(model.events[("in", p)], "save_in", p) for p in save_inputs]
    todo += [(model.events[(s.event, s.path)], "site", s) for s in sites]
    todo += [(model.events[("out", p.split("#")[0])], "patch", p) for p in patches]
    todo += [(model.events[("out", p)], "save", p) for p in saves]
    for _, what, x in sorted(todo, key=lambda t: (t[0], order[t[1]])):
        if what == "skip":
            model.envoy(x).skip(skips[x])
        elif what == "save_in":
            store[x] = model.envoy(x).input.save()
        elif what == "site":
            env = model.envoy(x.path)
            if x.tokens:
                env.output = apply_token_site(x, env.output, mult, None if means is None else means.get(x.path),
                                              tokens)
            elif x.event == "in":
                env.input = apply_site(x, env.input, mult, None if means is None else means.get(x.path))
            elif x.streams == 1:
                old = env.output
                new = apply_site(x, _first(old), mult, None if means is None else means.get(x.path))
                env.output = _replace_first(old, new)
            else:  # every stream of a joint block (an absent one, None, stays so)
                old = env.output
                new = [h if h is None else apply_site(x, h, mult, None if means is None else means.get(stream_key(x.path, k)))
                       for k, h in enumerate(old[: x.streams])]
                env.output = (*new, *old[x.streams :])
        elif what == "patch":  # a key "path#k" patches stream k of a joint block's output
            path, _, k = x.partition("#")
            env = model.envoy(path)
            old = env.output
            p = patches[x]
            h0 = old[int(k)] if k else _first(old)
            try:
                torch.broadcast_shapes(p.clean.shape, p.where.shape, h0.shape)
            except RuntimeError:
                raise ValueError(f"the patch of {x} does not fit its output: clean {tuple(p.clean.shape)} and where "
                                 f"{tuple(p.where.shape)} must broadcast to {tuple(h0.shape)} (rows x the module's "
                                 f"output)") from None
            if k:
                h = old[int(k)]
                env.output = (*old[: int(k)], torch.where(p.where, p.clean.to(h.dtype), h), *old[int(k) + 1 :])
            else:
                env.output = _replace_first(old, torch.where(p.where, p.clean.to(_first(old).dtype), _first(old)))
        else:
            out = model.envoy(x).output
            if _first(out) is not None:  # SD3's last block has no context stream left: (None, image)
                store[x] = _first(out).save()
            for k in range(1, _streams(model, x)):  # a joint block's other stream, for its mean
                if out[k] is not None:
                    store[stream_key(x, k)] = out[k].save()


def _on_device(model, mult, means, patches):
    """Multipliers, means and patches moved to the model's device (masks stay in their own dtype, so gradients
    with respect to them are float32 even when the forward pass runs in bfloat16)."""
    dev = model.device
    if mult is not None:
        mult = mult.to(dev)
    if means is not None:
        means = {k: v.to(dev) for k, v in means.items()}
    if patches:
        patches = {k: Patch(p.clean.to(dev), p.where.to(dev)) for k, p in patches.items()}
    return mult, means, patches


def _encoder_kwargs(model, enc, ids: torch.Tensor) -> dict:
    """Keyword arguments the family's pipeline calls a text encoder with, besides the ids."""
    kw = {}
    if enc.hidden_states:
        kw["output_hidden_states"] = True
    if enc.attention_mask and ids.device.type != "meta":  # a meta-device plan: no values to mask by, same cost
        kw["attention_mask"] = (ids != model.tokenizers[enc.part].pad_token_id).long()
    return kw


def run_text(model, ids: torch.Tensor, plan: Plan | None = None, mult: torch.Tensor | None = None,
             means: Mapping[str, torch.Tensor] | None = None, patches: Mapping[str, Patch] | None = None,
             saves: Sequence[str] = (), save_inputs: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
    """Every text encoder's forward with interventions, assembled into the denoiser's packed context
    (:mod:`interp.core.families`; for Stable Diffusion 1.x/2.x, CLIP's ``last_hidden_state``): ``(context, saved)``.
    ``ids`` are :meth:`DiffusionModel.tokenize`'s packed ids."""
    patches = dict(patches or {})
    ids = ids.to(model.device)
    mult, means, patches = _on_device(model, mult, means, patches)
    per = model.split_ids(ids)
    reads: dict = {}
    store: dict = {}
    for enc in model.encoders:
        part = enc.part
        sites = plan.sites.get(part, []) if plan is not None else []
        mine = {k: v for k, v in patches.items() if k.split(".", 1)[0] == part}
        keep = [k for k in saves if k.split(".", 1)[0] == part]
        keep_in = [k for k in save_inputs if k.split(".", 1)[0] == part]
        kwargs = _encoder_kwargs(model, enc, per[part])
        if not sites and not mine and not keep and not keep_in:
            reads[part] = model.family.read(enc, model.text_encoders[part](per[part], **kwargs))
            continue
        root = model.nn[part]
        with root.trace(per[part], **kwargs):
            _intervene(root, model, sites, mult, means, mine, keep, store, save_inputs=keep_in)
            kept = nnsight.save([v for v in model.family.read(enc, root.output)])
        reads[part] = tuple(kept)
    ctx, layout = model.family.assemble(model, reads, ids)
    model.layout = layout
    return ctx, store


def encode_prompts(model, ids: torch.Tensor) -> torch.Tensor:
    """The packed context of the intact text encoders for :meth:`DiffusionModel.tokenize`'s ids."""
    return run_text(model, ids)[0]


def call_denoiser(model, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, guidance: float | None = None):
    """One plain denoiser call (no interventions), as the family's pipeline makes it; the prediction."""
    kw = model.family.denoiser_inputs(model, x, t, ctx, guidance)
    return model.family.prediction(model, model.unet(**kw, return_dict=False)[0], x)


def run_unet(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, plan: Plan | None = None,
             mult: torch.Tensor | None = None, means: Mapping[str, torch.Tensor] | None = None,
             patches: Mapping[str, Patch] | None = None, saves: Sequence[str] = (),
             skips: Mapping[str, object] | None = None, checkpoint: bool = False,
             guidance: float | None = None, save_inputs: Sequence[str] = (),
             tokens: TokenRows | None = None) -> tuple[torch.Tensor, dict]:
    """Denoiser forward (its prediction, in the latents' layout) with interventions; returns ``(eps, saved)``.
    ``context`` is the packed context of :func:`run_text`; ``guidance`` is FLUX's embedded guidance scale (default:
    the model's), unused by families that guide with two branches. ``skips``: modules replayed
    from given outputs instead of run (:mod:`interp.core.prefix`). ``checkpoint``: under gradients, keep only the call's
    inputs and run it again during the backward pass (:func:`torch.utils.checkpoint.checkpoint`), so a loop of many
    calls (a generation) holds one call's activations at a time instead of every call's. ``tokens``: the concept's
    token positions and anchor keys and values of every row (:class:`TokenRows`), which token-KV sites need."""
    sites = plan.denoiser if plan is not None else []
    patches = dict(patches or {})
    # Forward passes run in the model's dtype on its device, whatever the caller keeps its tensors in.
    x = x.to(device=model.device, dtype=model.dtype)
    context = context.to(device=model.device, dtype=model.dtype)
    t = torch.as_tensor(t, device=model.device)
    mult, means, patches = _on_device(model, mult, means, patches)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    model.counters["unet_rows"] += x.shape[0]  # counted here, not in the forward a checkpoint runs again
    if torch.is_grad_enabled():
        model.counters["unet_rows_grad"] += x.shape[0]

    def forward(x, context):
        kw = model.family.denoiser_inputs(model, x, t, context, guidance)
        if not sites and not patches and not saves and not skips and not save_inputs:
            return model.family.prediction(model, model.unet(**kw, return_dict=False)[0], x), {}
        store: dict = {}
        first = kw.pop(next(iter(kw)))  # the latents go positionally: nnsight's trace takes its input that way
        with model.nn_unet.trace(first, **kw, return_dict=False):
            _intervene(model.nn_unet, model, sites, mult, means, patches, list(saves), store, skips, save_inputs,
                       tokens)
            out = model.nn_unet.output[0].save()
        return model.family.prediction(model, out, x), store

    if checkpoint and torch.is_grad_enabled():
        # Early stop would end the re-run by raising inside nnsight's trace: re-run whole calls instead.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(forward, x, context, use_reentrant=False)
    return forward(x, context)


def run_unet_in_passes(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, max_rows: int,
                       saves: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
    """:func:`run_unet` of the intact model over a batch of any size, in passes of at most ``max_rows`` rows whose
    predictions and saved outputs are concatenated (one pass when the batch fits)."""
    if x.shape[0] <= max_rows:
        return run_unet(model, x, t, context, saves=saves)
    parts = [run_unet(model, x[s : s + max_rows], t[s : s + max_rows], context[s : s + max_rows], saves=saves)
             for s in range(0, x.shape[0], max_rows)]
    return torch.cat([eps for eps, _ in parts]), {p: torch.cat([saved[p] for _, saved in parts]) for p in parts[0][1]}


@torch.no_grad()
def unit_means(model, plan: Plan, ids: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
               max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Mean activation of every site over a reference batch, for mean-ablation.

    Units (neurons, head features) get their mean over rows and positions; whole layers their mean over rows; the
    features of a sparse autoencoder their mean activation over rows and positions.
    A batch of more than ``max_rows`` rows (one per prompt ``ids`` and latent ``x``) runs in passes of at most that
    many, whose means are combined weighted by their rows.
    """
    if max_rows is not None and len(x) > max_rows:
        parts = [(len(x[s : s + max_rows]), unit_means(model, plan, ids[s : s + max_rows], x[s : s + max_rows],
                                                        t[s : s + max_rows]))
                 for s in range(0, len(x), max_rows)]
        return {k: sum(n / len(x) * means[k] for n, means in parts) for k in parts[0][1]}
    saves_t = [s.path for s in plan.text if s.event == "out"]
    saves_u = [s.path for s in plan.denoiser if s.event == "out"]
    # heads are reached at an input (their output projection's): saved as it enters
    ins_t = [s.path for s in plan.text if s.event == "in"]
    ins_u = [s.path for s in plan.denoiser if s.event == "in"]
    ctx, st = run_text(model, ids, saves=saves_t, save_inputs=ins_t)
    _, su = run_unet(model, x, t, ctx, saves=saves_u, save_inputs=ins_u)
    saved = {**st, **su}
    means = {}
    for s in plan.text + plan.denoiser:
        h = saved.get(s.path)
        if s.sae is not None:  # a feature's mean activation (its top-k encoding, 0 where inactive)
            means[s.path] = s.sae.means(h)
        elif s.whole:
            for k in range(s.streams):
                if stream_key(s.path, k) in saved:
                    means[stream_key(s.path, k)] = saved[stream_key(s.path, k)].mean(0, keepdim=True)
        elif s.axis == 1:
            means[s.path] = h.mean(dim=[d for d in range(h.dim()) if d != 1]).reshape(1, -1, *([1] * (h.dim() - 2)))
        else:
            means[s.path] = h.reshape(-1, h.shape[-1]).mean(0)
    return means


@contextlib.contextmanager
def weights_ablated(model, weights: Sequence[Component | str], value: float = 0.0):
    """Set scalar weights to ``value`` inside the block; restore them bitwise afterwards, also on error."""
    comps = [model.space.parse(w) for w in weights]
    saved = []
    try:
        with torch.no_grad():
            for c in comps:
                if c.granularity != "weight":
                    raise ValueError(f"{c} is not a scalar weight")
                p = getattr(model.module(c.module), c.param)
                saved.append((p, c.unit, p[c.unit].clone()))
                p[c.unit] = value
        yield
    finally:
        with torch.no_grad():
            for p, idx, old in reversed(saved):
                p[idx] = old


@contextlib.contextmanager
def parameters_requiring_grad(params: Sequence[torch.nn.Parameter]):
    """Temporarily make ``params`` require grad (the suite keeps weights frozen otherwise)."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)
            p.grad = None
