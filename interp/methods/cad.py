"""CAD: gradient x weight attribution (Nguyen, Phan, Doan 2024, "Unveiling Concept Attribution in Diffusion
Models", arXiv 2412.02542).

A scalar weight's score is ``w * dJ/dw``: the first-order Taylor estimate of how much J drops when ``w`` is set to
zero (``J(w=0) - J ~ -w dJ/dw``). It costs one forward and one backward pass over the evaluation set, for every
weight at once. CAD scores individual weights of the UNet's feed-forward layers; this module scores any weights
and aggregates them to the suite's components exactly as ablating the component would zero them: a Linear
output neuron is its weight row plus bias (row sum, as CAD's code does), a GEGLU hidden unit is the matching
column of ``ff.net.2``, an attention head the matching input columns of its output projection, a conv channel its
filter and bias, a Linear/attention/feed-forward layer all of its (output) weights. For containers whose output
is not the output of one weight matrix (a whole transformer block, a ResNet block, a text-encoder layer) the score
is the gradient with respect to a multiplier on their output, i.e. activation x gradient, the same first-order
quantity. So is a token-KV unit's (a head's key and value at the concept's tokens, or a token-span unit's at them
and every later position, :mod:`interp.core.tokens`:
``dJ/dm`` is the gradient along the move from the anchor's keys and values to the prompt's), and a feature's (a latent of an attached sparse autoencoder, :mod:`interp.core.features`): ``dJ/dm`` at
``m = 1`` is its activation times the gradient of J along its decoder direction. Gradients are float32 (float64 with the objective's ``dtype``), never float16.

CAD uses the erase objective for positive components (ablating them erases the concept) and the denoising loss
on concept images for negative ones (ablating them amplifies it); choose with ``ObjectiveConfig(kind=...)``.
Differences from the paper: our evaluation set is forward-noised renders at a few timesteps instead of every step
of 50-step DDIM trajectories, and the anchor branch is a choice of the objective (see :mod:`interp.core.objectives`).
The standard error is over ``n_groups`` disjoint groups of evaluation samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.core.components import Component, head_sites, is_text_part
from interp.core.interventions import compile_plan, parameters_requiring_grad
from interp.core.objectives import mean_gradient
from interp.methods.base import Capabilities, Method, MethodConfig, Scores, option, register, stderr_over


@dataclass(frozen=True)
class CADConfig(MethodConfig):
    """CAD's options.

    Attributes:
        n_groups: disjoint groups of evaluation samples, one gradient each; the standard error is over them.
    """
    n_groups: int = option(8, "disjoint groups of evaluation samples, one gradient each (its standard error is "
                              "over them)", flag="groups")


def weight_slices(model, c: Component) -> list[tuple[torch.nn.Parameter, tuple]] | None:
    """The weights that ablating component ``c`` zeroes, as (parameter, index) pairs; None if it is no weight set."""
    if c.granularity in ("feature", "tokenkv", "tokenspan"):  # a decoder direction of an attached SAE is no weight
        return None  # of the model; a token-KV (or -span) unit moves a head's keys and values at some positions only
    mod = model.module(c.module)
    if c.granularity == "weight":
        return [(getattr(mod, c.param), c.unit)]
    if c.kind in ("ff.net.0", "ff_context.net.0"):  # a (GE)GLU/GELU hidden unit -> a column of net.2
        out = model.module(c.module[: -len(".0")] + ".2")
        return [(out.weight, (slice(None), c.index if c.granularity == "neuron" else slice(None)))]
    if c.granularity == "head":
        sites = head_sites(mod)
        if sites[0][1] != "in":  # no output projection of its own (FLUX's single-stream attention)
            return None
        # the head's columns of every output projection it feeds (both streams of a joint attention)
        return [(model.module(c.module + suffix).weight, (slice(None), slice(c.index * d, (c.index + 1) * d)))
                for suffix, _, _, d in sites]
    if c.granularity == "neuron":
        sl = [(mod.weight, (c.index,))]
        return sl + ([(mod.bias, (c.index,))] if mod.bias is not None else [])
    # layer granularity: the module whose output is the layer's output
    target = {"attn1": "to_out.0", "attn2": "to_out.0", "self_attn": "out_proj", "ff": "net.2", "mlp": "fc2",
              "ff_context": "net.2", "SelfAttention": "o", "DenseReluDense": "wo"}.get(c.kind)
    if target is not None:
        mod = mod.get_submodule(target)
    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
        sl = [(mod.weight, (slice(None),))]
        return sl + ([(mod.bias, (slice(None),))] if mod.bias is not None else [])
    return None  # a container: use the output-multiplier gradient


@register
class CAD(Method):
    """CAD: ``w * dJ/dw`` aggregated to components (see the module docstring). One forward and one backward
    pass over the evaluation set, for any number of components.
    """
    name = "cad"
    default_erasure = True
    label = "CAD"
    default_run = True
    Config = CADConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "weight", "feature", "tokenkv", "tokenspan"),
                                gradients=True)

    def _scores(self, obj, comps, run):
        slices = [weight_slices(obj.model, c) for c in comps]
        fallback = [i for i, s in enumerate(slices) if s is None]
        params = list({id(p): p for s in slices if s for p, _ in s}.values())
        plan = compile_plan(obj.model, [comps[i] for i in fallback]) if fallback else None
        text = any(is_text_part(c.model) for c in comps)
        groups = torch.arange(obj.n_samples).tensor_split(min(self.config.n_groups, obj.n_samples))
        per_group = []
        with parameters_requiring_grad(params):
            for g in groups:
                mult = torch.ones(1, len(fallback), dtype=obj.dtype, requires_grad=True) if fallback else None
                grads = mean_gradient(obj, params + ([mult] if fallback else []), samples=g, reduce=lambda J: J.mean(),
                                      plan=plan, mult=mult, recompute_text=text)
                gmap = {id(p): gr for p, gr in zip(params, grads)}
                scores = torch.empty(len(comps), dtype=torch.float64)
                for i, s in enumerate(slices):
                    if s is not None:
                        # products and sums in float32/64 even when the weights and their gradients are bfloat16
                        scores[i] = sum((p.detach()[idx].to(obj.dtype) * gmap[id(p)][idx].to(obj.dtype)).sum()
                                        for p, idx in s).double()
                if fallback:
                    scores[fallback] = grads[-1][0].double()
                per_group.append(scores)
        # Groups are equal-sized up to one sample: the mean of group means is the full-set mean.
        G = torch.stack(per_group, dim=1)
        return Scores(G.mean(1), stderr_over(G, 1),
                      meta={"n_groups": len(groups), "n_params": sum(p.numel() for p in params),
                            "multiplier_gradient_components": len(fallback)})

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): the evaluation set once, in groups, with gradients."""
        return shape.values(1, grad=True)


def weight_scores(obj, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """CAD's raw per-scalar scores ``w * dJ/dw`` for named parameters (the input of CAD-Erase's selection)."""
    plist = list(params.values())
    text = any(is_text_part(n.split(".", 1)[0]) for n in params)
    with parameters_requiring_grad(plist):
        grads = mean_gradient(obj, plist, reduce=lambda J: J.mean(), recompute_text=text)
    return {n: (p.detach().to(obj.dtype) * g.to(obj.dtype)).detach() for (n, p), g in zip(params.items(), grads)}
