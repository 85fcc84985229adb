"""Concept edits built from attributions: erase (or amplify) a concept by ablating or rewriting the components that
carry it, without ever changing the user's copy of the model.

An edit is a frozen dataclass with two methods: ``apply(model)``, a context manager inside which generation through
the suite sees the edited model, and ``record()``, a plain dict of what was changed, how much, and which method
ranked it. Two mechanisms:

:class:`AblationEdit`
    zero-ablates a set of components (neurons, heads, layers) through the engine's multipliers: a compiled
    :class:`~interp.core.interventions.Plan` and one multiplier row of zeros, passed to
    :func:`~interp.core.generation.generate` as ``plan``/``mult``. No weight is touched, so there is nothing to restore;
    the edited model is reached through the :class:`EditedModel` handle the context yields.
:class:`WeightEdit`
    writes new values into weights inside the context and restores the saved originals bitwise in ``finally`` (also
    when the block raises). Everything the suite runs inside the block sees the new weights.

The edits of the literature, each as its paper does it unless noted:

CAD-Erase / CAD-Amplify (Nguyen, Phan, Doan 2024, arXiv 2412.02542): :func:`cad_erase`, :func:`cad_amplify`.
    Score every scalar weight of the UNet's feed-forward matrices (``ff.net.0.proj``, ``ff.net.2``) by
    ``w * dJ/dw`` (:func:`interp.methods.cad.weight_scores`), and per *output row* of each matrix zero the top
    ``floor(ratio * in_features)`` entries: the most positive ones on the erase objective (only entries with a
    positive score), the most negative ones on the amplify objective (only negative scores). Ranking is never
    global across rows or layers. The paper's ratio is 0.001, which on Stable Diffusion zeroes 0-5 weights per row
    (``in_features`` 320-5120; rows narrower than 1000 inputs are left alone); on the concept world ``in_features``
    is 64 and 256, ``floor(0.001 * in)`` is 0 and nothing would change. The default here,
    :data:`CAD_DEFAULT_RATIO` = 0.1, zeroes 6 and 25 entries per row (at most 10% of the feed-forward weights), the
    middle of the ratio sweep measured in the README's "Editing" section. Which weights the per-row rule
    picks depends strongly on the attribution set (more objective images can change the result a lot); the
    analysis sweeps the ratio. The neuron variants (:func:`cad_erase_neurons`, :func:`cad_amplify_neurons`) rank
    whole units (by default the GEGLU hidden units ``ff.net.0[j]``) instead and ablate the top k.
Diff-QuickFix (Basu et al., "Localizing and Editing Knowledge in Text-to-Image Generative Models", ICLR 2024):
    :func:`diff_quickfix`. A closed-form rewrite of the text encoder's layer-0 self-attention output projection,
    ``W* = (lambda W0 + sum_i v_i k_i^T)(lambda I + sum_i k_i k_i^T)^-1`` with ``lambda = 0.01``: the keys ``k_i``
    are the projection's inputs for prompts with the concept, at the last subject token and every later position;
    the values ``v_i`` what the *unedited* projection writes for the anchor prompts (the concept word left out, or
    replaced) at the matching positions. Solved in float64 (:func:`quickfix_solve`). The bias is left alone, so
    ``v_i`` is the anchor's output minus the bias. A pipeline with several text encoders (SDXL's two CLIPs, SD3's
    CLIPs and T5, FLUX's CLIP and T5, PixArt's T5) has each one's layer-0 projection edited the same way (T5's
    ``SelfAttention.o``; T5 attends both ways, so its keys also cover the positions before the subject).
    ``preserve`` (not in the paper, default 0) adds keys of prompts
    without the concept mapped to their own unedited outputs: on a text encoder as narrow as the concept world's
    (64 features) the ~140 concept keys span the whole input space (rank 64), the paper's edit changes the
    projection by several times its norm and rewrites it for every prompt: on the shipped model erasing "red"
    (0.96 -> 0.21) left the other colors at 0.42 of their rates; with 32 preservation prompts they kept 1.00 at
    the same erasure.
COAR-Edit (Shah, Ilyas, Madry, ICML 2024): :func:`coar_edit`. Per component, a Welch t-statistic of its
    attributions on the target concept's samples against the reference concepts' samples; ablate the k
    components with the largest t (large support of the target, little of the references). COAR fits one linear
    model per example; here the per-sample attributions are summarized by each method's result frame (mean score
    and its standard error), from which Welch's t follows exactly when the standard error is over the frame's
    ``n_samples`` evaluation samples: true for ``ablation``, ``coar`` and for ``cad`` run with one group per sample,
    which is what :func:`coar_edit` asks CAD for (the default attribution, since COAR's own regression needs
    thousands of masked passes per concept). The reference concepts default to the other values of the target's
    attribute.
Any registry method: :func:`rank_components` turns a method's scores into a :class:`Ranking`, whose ``top(k)`` is
    an :class:`AblationEdit` (``side="positive"`` erases, ``"negative"`` amplifies);
    :meth:`AblationEdit.from_frame` does the same for a result frame already computed.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from interp.core import diffusion
from interp.core.components import ComponentSet
from interp.core.concepts import DEFAULT_TEMPLATES
from interp.core.generation import generate
from interp.core.interventions import Plan, compile_plan
from interp.core.objectives import Objective, ObjectiveConfig
from interp.core.results import is_main
from interp.core.tokens import subject_forms
from interp.methods import attribute
from interp.methods.cad import weight_scores

#: CAD-Erase's ratio on the concept world (the paper's 0.001 zeroes nothing when in_features < 1000; see above).
CAD_DEFAULT_RATIO = 0.1
#: Diff-QuickFix's regularizer, as in the paper's notebook.
QUICKFIX_LAMBDA = 0.01
#: Seed stream of the prompts the edits are computed from (the evaluation uses another, see evaluate.py).
EDIT_SEED = 30_000
#: The feed-forward matrices CAD edits (module kinds of the component tables).
CAD_KINDS = ("ff.net.0.proj", "ff.net.2")
SIDES = ("positive", "negative")


# -- the edited model --------------------------------------------------------------------------------------------
@dataclass
class EditedModel:
    """What ``edit.apply(model)`` yields: the model plus the interventions generation must apply.

    For a weight edit ``plan`` and ``mult`` are None (the weights themselves are edited); for an ablation edit they
    carry the zeroed components. Use :meth:`generate` (or pass :attr:`intervention` to the suite's functions) so
    that both kinds of edit are seen.
    """

    model: object
    edit: object
    plan: Plan | None = None
    mult: torch.Tensor | None = None
    means: Mapping[str, torch.Tensor] | None = None  # mean-ablation's values per site (None: zero-ablation)
    concept: object = None  # the concept whose tokens token-KV components act at (:mod:`interp.core.tokens`)

    @property
    def intervention(self) -> dict:
        """Keyword arguments for :func:`interp.core.generation.generate` and the engine's run functions (with
        ``concept`` when token-KV components are ablated)."""
        extra = {"concept": self.concept} if self.plan is not None and self.plan.has_tokens else {}
        return {"plan": self.plan, "mult": self.mult, "means": self.means, **extra}

    def generate(self, prompts, seed: int = 0, steps: int = 20, guidance: float | None = None,
                 **kwargs) -> torch.Tensor:
        """:func:`interp.core.generation.generate` on the edited model (``guidance=None``: the model's default)."""
        return generate(self.model, prompts, seed=seed, steps=steps, guidance=guidance, **self.intervention, **kwargs)


class Edit:
    """Interface of every edit (frozen dataclasses below): ``apply(model)``, ``record()``, ``label``."""

    name: str

    def apply(self, model) -> contextlib.AbstractContextManager[EditedModel]:
        """A context in which ``model`` is edited; on exit it is bitwise what it was.

        Args:
            model: the loaded model.

        Returns:
            A context manager yielding an :class:`EditedModel` (``edited.generate(prompts)`` draws with the edit).
        """
        raise NotImplementedError

    def record(self) -> dict:
        """What the edit did, as a JSON-ready dict (``edits.json`` of an edit run)."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """A short name for tables and figures (the edit's name and budget)."""
        return self.name


# -- ablation edits ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationEdit(Edit):
    """Ablate ``components`` (addresses) through the multiplier mechanism; weights are never touched. Zero-ablation,
    or mean-ablation with ``means`` (per module path, as :func:`interp.core.objectives.reference_means` gives them: each
    ablated unit is replaced by its mean there; other units of the site are untouched whatever their mean).

    ``multiplier`` (default 0: ablated) is what each component is multiplied by around its mean: a negative one
    steers against it (a feature's decoded contribution reversed, as feature steering does), one above 1 amplifies
    it."""

    components: tuple[str, ...]
    name: str = "ablation-edit"
    method: str | None = None  # which method ranked the components
    concept: str | None = None
    side: str = "positive"
    scores: tuple[float, ...] = ()  # the ranking scores of the chosen components, same order
    objective: str | None = None
    seconds: float = 0.0  # wall time of computing the edit (attribution + selection)
    budget: float | None = None  # the swept quantity (k)
    means: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    multiplier: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "components", tuple(str(c) for c in self.components))
        if not math.isfinite(self.multiplier) or self.multiplier == 1:
            raise ValueError(f"an ablation edit's multiplier must be finite and not 1 (1 leaves the components as "
                             f"they are), got {self.multiplier}")
        if len(set(self.components)) != len(self.components):
            raise ValueError("an ablation edit lists a component twice")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")

    @property
    def k(self) -> int:
        """The number of ablated components."""
        return len(self.components)

    @property
    def label(self) -> str:
        """The edit's name and ``k`` (and its multiplier, when it steers rather than ablates)."""
        return f"{self.name} (k={self.k})" if self.multiplier == 0 else f"{self.name} (k={self.k}, x{self.multiplier:g})"

    @contextlib.contextmanager
    def apply(self, model) -> Iterator[EditedModel]:
        """A context in which the components are ablated through multipliers (the weights are never touched).

        Args:
            model: the loaded model.

        Returns:
            A context manager yielding an :class:`EditedModel`.

        Raises:
            ValueError: mean-ablation without means for some of the components' modules.
        """
        if not self.components:  # nothing to ablate: the intact model, with no trace overhead
            yield EditedModel(model, self)
            return
        plan = compile_plan(model, list(self.components))
        if self.means is not None:
            missing = sorted({s.path for part in plan.sites.values() for s in part} - set(self.means))
            if missing:
                raise ValueError(f"mean-ablation has no means for {missing[:2]}: compute them for these components")
        if plan.has_tokens and self.concept is None:
            raise ValueError("an ablation edit of token-KV components needs its concept (AblationEdit(concept=...)): "
                             "they act at the concept's tokens")
        yield EditedModel(model, self, plan, torch.full((1, len(self.components)), float(self.multiplier),
                                                        dtype=model.dtype, device=model.device), self.means,
                          self.concept)

    @property
    def mode(self) -> str:
        """``"zero"``, or ``"mean"`` when the edit carries means."""
        return "zero" if self.means is None else "mean"

    def record(self) -> dict:
        """What the edit ablates, as a JSON-ready dict: components, their scores, the method and budget."""
        return {
            "edit": self.name, "mechanism": f"ablation (multipliers, {self.mode})" if self.multiplier == 0 else
            f"steering (multipliers x{self.multiplier:g}, {self.mode})", "method": self.method,
            "concept": self.concept, "side": self.side, "objective": self.objective, "budget": self.budget,
            "n_components": self.k, "n_weights": None, "components": list(self.components),
            "scores": list(self.scores), "seconds": self.seconds,
        }

    @classmethod
    def from_frame(cls, df: pd.DataFrame, k: int, side: str = "positive", name: str | None = None,
                   concept: str | None = None) -> "AblationEdit":
        """The top ``k`` components of a tidy result frame (positive side = largest scores)."""
        return Ranking.from_frame(df, side=side, name=name, concept=concept).top(k)


@dataclass(frozen=True)
class Ranking:
    """Components ordered for ablation (most effective first), with the scores that ordered them."""

    components: tuple[str, ...]
    scores: tuple[float, ...]
    method: str
    name: str
    concept: str | None = None
    side: str = "positive"
    objective: str | None = None
    seconds: float = 0.0
    info: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if len(self.components) != len(self.scores):
            raise ValueError(f"{len(self.scores)} scores for {len(self.components)} components")

    @classmethod
    def from_frame(cls, df: pd.DataFrame, side: str = "positive", name: str | None = None,
                   concept: str | None = None, seconds: float | None = None,
                   variant: str | None = None) -> "Ranking":
        """Order a result frame's components: largest score first (``positive``) or most negative first. A frame
        with several estimates of one method (``variant`` column) ranks its main estimate unless ``variant`` names
        another."""
        rows = df
        if "variant" in rows:
            rows = rows[rows["variant"] == variant] if variant else rows[is_main(rows)]
        if concept is not None:
            rows = rows[rows["concept"] == concept]
        methods = rows["method"].unique()
        if len(methods) != 1 or rows["component"].duplicated().any():
            raise ValueError(
                f"rank one method's scores for one concept at a time (got methods {list(methods)}, "
                f"{int(rows['component'].duplicated().sum())} repeated components); filter the frame first"
            )
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        s = rows["score"].to_numpy(float)
        order = np.argsort(-s if side == "positive" else s, kind="stable")
        meta = df.attrs.get("meta", {}) or {}
        return cls(
            components=tuple(rows["component"].to_numpy()[order].astype(str)), scores=tuple(s[order].tolist()),
            method=str(methods[0]), name=name or f"ablate:{methods[0]}",
            concept=str(rows["concept"].iat[0]) if len(rows) else concept, side=side,
            objective=str(rows["objective"].iat[0]) if len(rows) else None,
            seconds=float(meta.get("seconds", 0.0) if seconds is None else seconds),
        )

    def top(self, k: int, multiplier: float = 0.0) -> AblationEdit:
        """Ablate the first ``k`` components (only those on the ranking's side: a positive ranking never ablates a
        component with a negative score, just as CAD never erases one); ``multiplier``: what they are multiplied by
        (0: ablated; negative: steered against)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        on_side = [i for i, s in enumerate(self.scores[:k]) if (s > 0 if self.side == "positive" else s < 0)]
        return AblationEdit(
            components=tuple(self.components[i] for i in on_side), name=self.name, method=self.method,
            concept=self.concept, side=self.side, scores=tuple(self.scores[i] for i in on_side),
            objective=self.objective, seconds=self.seconds, budget=k, multiplier=multiplier,
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"rank": np.arange(len(self.components)), "component": list(self.components),
                             "score": list(self.scores), "method": self.method, "edit": self.name})


#: Named component sets for ablation edits (granularity + filters of ``model.components``), as on a Stable Diffusion
#: UNet; :func:`preset_filters` gives each one's filters on the model's own family.
COMPONENT_PRESETS: dict[str, dict] = {
    "ff": {"granularity": "neuron", "family": "ff", "kind": "ff.net.0", "model": "unet"},  # GEGLU hidden units
    "attn2": {"granularity": "neuron", "family": "attn2", "kind": "attn2.to_v", "model": "unet"},  # cross-attn values
    "attn2-heads": {"granularity": "head", "family": "attn2", "model": "unet"},
    "text-mlp": {"granularity": "neuron", "family": "text_mlp", "kind": "mlp.fc1", "model": "text_encoder"},
    "features": {"granularity": "feature"},  # the latents of the attached sparse autoencoders
}


def preset_filters(model, name: str) -> list[dict]:
    """The filters of component set ``name`` (:data:`COMPONENT_PRESETS`) on the model's family: the denoiser's own
    feed-forward hidden units (``ff``); the value neurons of the projections that read the text (``attn2``: every
    cross-attention's ``to_v``, or the joint blocks' context values ``attn.add_v_proj`` on SD3 and FLUX); the
    cross-attention heads (``attn2-heads``, refused where there is no cross-attention); every text encoder's MLP
    hidden units (``text-mlp``: CLIP's ``mlp.fc1``, T5's ``DenseReluDense.wi`` or, gated, ``wi_0``); the latents of
    the attached sparse autoencoders (``features``: :func:`interp.core.features.attach`)."""
    if name not in COMPONENT_PRESETS:
        raise ValueError(f"unknown component set {name!r}; choose from {sorted(COMPONENT_PRESETS)}")
    f, den = dict(COMPONENT_PRESETS[name]), model.denoiser_part
    families = set(model.space.families())
    if name == "ff":
        return [{**f, "model": den}]
    if name == "features":
        if not model.space.features:
            raise ValueError("component set features: no sparse autoencoder is attached to the model; pass --sae "
                             "FOLDER (written by python -m analyses.train_sae)")
        return [f]
    if name in ("attn2", "attn2-heads"):
        if "attn2" in families:
            return [{**f, "model": den}]
        if name == "attn2" and "attn_context" in families:
            return [{"granularity": "neuron", "family": "attn_context", "kind": "attn.add_v_proj", "model": den}]
        raise ValueError(f"component set {name}: the {model.family.label} {den} has no cross-attention"
                         + ("; its joint attention's heads (family attn) attend over the image and the text at once: "
                            "use attn2 (the context stream's value neurons) on this model"
                            if "attn_context" in families else ""))
    out = []  # text-mlp: every text encoder's
    for part in model.text_parts:
        kinds = {i.kind for i in model.space.modules.values() if i.model == part and i.rule.family == "text_mlp"}
        kind = next((k for k in ("mlp.fc1", "DenseReluDense.wi", "DenseReluDense.wi_0") if k in kinds), None)
        if kind is None:
            raise ValueError(f"component set text-mlp: {part} of the {model.family.label} pipeline has no MLP the "
                             f"suite knows (CLIP's mlp.fc1 or T5's DenseReluDense.wi)")
        out.append({**f, "kind": kind, "model": part})
    return out


def edit_components(model, presets: Sequence[str] = ("ff",)) -> ComponentSet:
    """The union of named component sets (:data:`COMPONENT_PRESETS`, as :func:`preset_filters` reads them on the
    model's family), in the order given."""
    unknown = [p for p in presets if p not in COMPONENT_PRESETS]
    if unknown or not presets:
        raise ValueError(f"unknown component set(s) {unknown}; choose from {sorted(COMPONENT_PRESETS)}")
    out = []
    for p in dict.fromkeys(presets):
        for f in preset_filters(model, p):
            f = dict(f)
            out.extend(model.components(f.pop("granularity"), **f))
    return ComponentSet(out)


def default_edit_components(model) -> ComponentSet:
    """The denoiser's feed-forward hidden units (``ff.net.0[j]``): the neurons CAD's weights feed."""
    return edit_components(model, ("ff",))


def rank_components(model, concept, method: str, components=None, *,
                    objective: ObjectiveConfig | Objective | None = None, side: str = "positive",
                    name: str | None = None, **options) -> Ranking:
    """Rank ``components`` by a registry method's scores for ``concept`` (default: the UNet's GEGLU units)."""

    comps = default_edit_components(model) if components is None else components
    t0 = time.perf_counter()
    df = attribute(method, model, concept, comps, objective=objective, **options)
    return Ranking.from_frame(df, side=side, name=name or f"ablate:{method}", seconds=time.perf_counter() - t0)


def cad_erase_neurons(model, concept, k: int, components=None, objective: ObjectiveConfig | None = None,
                      method: str = "cad", **options) -> AblationEdit:
    """CAD-Erase at neuron level: ablate the ``k`` GEGLU hidden units with the largest positive scores."""
    objective = objective or ObjectiveConfig(kind="erase")
    return rank_components(model, concept, method, components, objective=objective, side="positive",
                           name="cad-erase-neurons", **options).top(k)


def cad_amplify_neurons(model, concept, k: int, components=None, objective: ObjectiveConfig | None = None,
                        method: str = "cad", **options) -> AblationEdit:
    """CAD-Amplify at neuron level: ablate the ``k`` GEGLU hidden units with the most negative amplify scores."""
    objective = objective or ObjectiveConfig(kind="amplify")
    return rank_components(model, concept, method, components, objective=objective, side="negative",
                           name="cad-amplify-neurons", **options).top(k)


# -- COAR-Edit ---------------------------------------------------------------------------------------------------
def welch_t(target: pd.DataFrame, references: Sequence[pd.DataFrame]) -> pd.Series:
    """Per component, Welch's t of the target's per-sample attributions against the pooled reference samples.

    Each frame gives, per component, the mean attribution over its ``n_samples`` samples (``score``) and its
    standard error (``stderr``); the reference samples of several concepts are pooled (mean of means, total
    variance = within + between). Returns a Series indexed by component.
    """
    if not references:
        raise ValueError("COAR-Edit needs at least one reference concept")

    def stats(df):
        rows = df.set_index("component")
        n = rows["n_samples"].astype(float)
        se = rows["stderr"].fillna(0.0).astype(float)
        return rows["score"].astype(float), se, n

    m_t, se_t, _ = stats(target)
    refs = [stats(r) for r in references]
    comps = m_t.index
    means = np.stack([r[0].reindex(comps).to_numpy() for r in refs])
    var = np.stack([(r[1].reindex(comps) ** 2 * r[2].reindex(comps)).to_numpy() for r in refs])  # per-sample var
    n = np.stack([r[2].reindex(comps).to_numpy() for r in refs])
    if np.isnan(means).any():
        raise ValueError("the reference frames do not cover the target's components")
    total_n = n.sum(0)
    pooled_mean = (means * n).sum(0) / total_n
    pooled_var = ((var + (means - pooled_mean) ** 2) * n).sum(0) / total_n
    den = np.sqrt(se_t.to_numpy() ** 2 + pooled_var / total_n)
    diff = m_t.to_numpy() - pooled_mean
    t = np.divide(diff, den, out=np.zeros_like(diff), where=den > 0)
    return pd.Series(t, index=comps, name="t")


def coar_edit_ranking(model, concept: str, references: Sequence[str] | None = None, method: str = "cad",
                      components=None, objective: ObjectiveConfig | None = None, **options) -> Ranking:
    """COAR-Edit's ranking: components ordered by Welch t (target vs references) of ``method``'s attributions."""

    objective = objective or ObjectiveConfig(kind="erase")
    if references is None and not model.is_concept_world:  # the world's colour words mean nothing to another model
        raise ValueError(
            f"coar_edit on {model.name!r} (not the concept world) needs the references argument: the concepts the "
            f"edit must leave alone, e.g. references=['a dog', 'a car'] (only the concept world has defaults)"
        )
    references = list(model.world.references(concept) if references is None else references)
    if concept in references:
        raise ValueError(f"the target {concept!r} is among its own references")
    if method == "cad" and "n_groups" not in options:
        # one group per sample: CAD's stderr is then over samples, and Welch's t is the per-sample t-test
        options["n_groups"] = objective.n_images * len(objective.timesteps)
    comps = default_edit_components(model) if components is None else components
    t0 = time.perf_counter()
    target = attribute(method, model, concept, comps, objective=objective, **options)
    refs = [attribute(method, model, r, comps, objective=objective, **options) for r in references]
    t = welch_t(target, refs)
    order = np.argsort(-t.to_numpy(), kind="stable")
    return Ranking(
        components=tuple(t.index.to_numpy()[order].astype(str)), scores=tuple(t.to_numpy()[order].tolist()),
        method=f"welch-t({method})", name="coar-edit", concept=concept, side="positive", objective=objective.kind,
        seconds=time.perf_counter() - t0, info={"references": references, "attribution": method},
    )


def coar_edit(model, concept: str, k: int, references: Sequence[str] | None = None, method: str = "cad",
              components=None, objective: ObjectiveConfig | None = None, **options) -> AblationEdit:
    """COAR-Edit: ablate the ``k`` components with the largest t-statistic (see :func:`coar_edit_ranking`)."""
    return coar_edit_ranking(model, concept, references, method, components, objective, **options).top(k)


# -- weight edits ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WeightUpdate:
    """New values for one parameter: at flat indices ``index`` (or the whole tensor when ``index`` is None)."""

    param: str  # full name as in model.parameters(), e.g. "unet.mid_block....ff.net.2.weight"
    values: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def n_changed(self) -> int:
        return int(self.values.numel())


@dataclass(frozen=True, eq=False)
class WeightEdit(Edit):
    """Write ``updates`` into the model's weights inside the context; restore them bitwise afterwards."""

    updates: tuple[WeightUpdate, ...]
    name: str = "weight-edit"
    method: str | None = None
    concept: str | None = None
    objective: str | None = None
    seconds: float = 0.0
    budget: float | None = None
    info: Mapping = field(default_factory=dict)

    @property
    def n_changed(self) -> int:
        """The number of scalar weights the edit writes."""
        return sum(u.n_changed for u in self.updates)

    @property
    def label(self) -> str:
        """The edit's name and budget."""
        return self.name if self.budget is None else f"{self.name} ({self.budget:g})"

    @contextlib.contextmanager
    def apply(self, model) -> Iterator[EditedModel]:
        """A context in which the updates are written into the weights; on exit the weights are restored bitwise.

        Args:
            model: the loaded model.

        Returns:
            A context manager yielding an :class:`EditedModel`.

        Raises:
            KeyError: an update names a parameter the model does not have.
            ValueError: an update's values do not match the entries it indexes.
        """
        params = dict(model.parameters())
        for u in self.updates:  # validate everything before writing anything
            if u.param not in params:
                raise KeyError(f"the edit changes {u.param!r}, which this model does not have")
            p = params[u.param]
            need = p.numel() if u.index is None else u.index.numel()
            if u.values.numel() != need:
                raise ValueError(f"{u.param}: {u.values.numel()} new values for {need} entries")
        saved = []
        try:
            with torch.no_grad():
                for u in self.updates:
                    p = params[u.param]
                    saved.append((p, p.detach().clone()))
                    vals = u.values.to(device=p.device, dtype=p.dtype)
                    if u.index is None:
                        p.copy_(vals.reshape(p.shape))
                    else:
                        p.view(-1)[u.index.to(p.device)] = vals.reshape(-1)
            yield EditedModel(model, self)
        finally:
            with torch.no_grad():
                for p, old in reversed(saved):  # reversed: a parameter updated twice ends at its first copy
                    p.copy_(old)

    def record(self) -> dict:
        """What the edit writes, as a JSON-ready dict: the parameters and how many weights of each."""
        return {
            "edit": self.name, "mechanism": "weights (restored on exit)", "method": self.method,
            "concept": self.concept, "side": self.info.get("side"), "objective": self.objective,
            "budget": self.budget, "n_components": None, "n_weights": self.n_changed,
            "weights": {u.param: u.n_changed for u in self.updates}, "seconds": self.seconds,
            **{k: v for k, v in self.info.items() if k != "side"},
        }


def per_row_count(ratio: float, in_features: int) -> int:
    """CAD's entries per row, ``floor(ratio * in_features)`` (a 1e-9 guard keeps 0.07 * 100 at 7, not 6)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return int(math.floor(ratio * in_features + 1e-9))


def select_per_row(scores: torch.Tensor, count: int, side: str = "positive") -> torch.Tensor:
    """Boolean mask of the top ``count`` entries of every row of a 2-D score matrix, on ``side`` only.

    ``positive``: the largest scores, and only scores > 0; ``negative``: the most negative, only scores < 0.
    """
    if scores.dim() != 2:
        raise ValueError(f"per-row selection needs a matrix, got shape {tuple(scores.shape)}")
    signed = scores if side == "positive" else -scores
    mask = torch.zeros_like(scores, dtype=torch.bool)
    count = min(count, scores.shape[1])
    if count == 0:
        return mask
    vals, idx = signed.topk(count, dim=1)
    mask.scatter_(1, idx, vals > 0)
    return mask


@dataclass(frozen=True, eq=False)
class WeightScores:
    """CAD's per-weight scores ``w * dJ/dw`` of the feed-forward matrices, ready for per-row selection."""

    scores: Mapping[str, torch.Tensor]
    concept: str
    objective: str
    side: str
    name: str
    seconds: float = 0.0

    def edit(self, ratio: float = CAD_DEFAULT_RATIO) -> WeightEdit:
        """Zero the top ``floor(ratio * in_features)`` entries of every row (only entries on the side)."""
        t0 = time.perf_counter()
        updates = []
        for pname, s in self.scores.items():
            mask = select_per_row(s, per_row_count(ratio, s.shape[1]), self.side)
            idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
            updates.append(WeightUpdate(pname, torch.zeros(len(idx), dtype=s.dtype), idx))
        return WeightEdit(tuple(updates), name=self.name, method="cad (w * dJ/dw per weight)", concept=self.concept,
                          objective=self.objective, seconds=self.seconds + time.perf_counter() - t0, budget=ratio,
                          info={"side": self.side, "ratio": ratio, "rule": "top floor(ratio * in_features) per row"})


def cad_weight_scores(model, concept, kind: str = "erase", objective: ObjectiveConfig | None = None,
                      kinds: Sequence[str] = CAD_KINDS) -> WeightScores:
    """Score every weight of the denoiser's feed-forward matrices (a UNet's or a transformer's, image stream) with
    CAD on the erase or amplify objective."""

    objective = objective or ObjectiveConfig(kind=kind)
    if objective.kind != kind:
        raise ValueError(f"objective kind {objective.kind!r} does not match {kind!r}")
    t0 = time.perf_counter()
    obj = Objective(model, concept, objective)
    params = {}
    space = obj.model.space.modules
    for path, info in space.items():
        if info.model != obj.model.denoiser_part:
            continue
        if info.kind in kinds:
            params[f"{path}.weight"] = info.module.weight
        elif (f"{info.kind}.proj" in kinds and f"{path}.proj" not in space
              and isinstance(getattr(info.module, "proj", None), torch.nn.Linear)):
            # a diffusion transformer's GELU feed-forward: ff.net.0 holds its input projection (not a component)
            params[f"{path}.proj.weight"] = info.module.proj.weight
    if not params:
        raise ValueError(f"the model's {obj.model.denoiser_part} has no modules of kinds {list(kinds)}")
    scores = weight_scores(obj, params)
    side = "positive" if kind == "erase" else "negative"
    return WeightScores({n: s.double() for n, s in scores.items()}, obj.concept.name, kind, side,
                        f"cad-{'erase' if kind == 'erase' else 'amplify'}", time.perf_counter() - t0)


def cad_erase(model, concept, ratio: float = CAD_DEFAULT_RATIO, objective: ObjectiveConfig | None = None) -> WeightEdit:
    """CAD-Erase: per row of every UNet feed-forward matrix, zero the top ``floor(ratio * in)`` positive weights."""
    return cad_weight_scores(model, concept, "erase", objective).edit(ratio)


def cad_amplify(model, concept, ratio: float = CAD_DEFAULT_RATIO,
                objective: ObjectiveConfig | None = None) -> WeightEdit:
    """CAD-Amplify: per row, zero the ``floor(ratio * in)`` most negative weights on the amplify objective."""
    return cad_weight_scores(model, concept, "amplify", objective).edit(ratio)


# -- Diff-QuickFix -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QuickFixSolution:
    """The pieces of the closed-form edit: ``W_star (lam I + K K^T) = lam W0 + V K^T`` (float64)."""

    W_star: torch.Tensor  # (out, in)
    W0: torch.Tensor  # (out, in)
    K: torch.Tensor  # (in, N) keys as columns
    V: torch.Tensor  # (out, N) values as columns
    lam: float

    def residual(self) -> float:
        """Largest absolute violation of the normal equations, relative to the right-hand side's scale."""
        eye = torch.eye(self.K.shape[0], dtype=self.K.dtype)
        lhs = self.W_star @ (self.lam * eye + self.K @ self.K.T)
        rhs = self.lam * self.W0 + self.V @ self.K.T
        return float((lhs - rhs).abs().max() / rhs.abs().max().clamp_min(1e-300))


def quickfix_solve(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                   lam: float = QUICKFIX_LAMBDA) -> QuickFixSolution:
    """``W* = (lam W0 + V K^T)(lam I + K K^T)^-1`` in float64, through a linear solve (never an explicit inverse).

    ``A = lam I + K K^T`` is symmetric, so ``W* A = B`` is ``A W*^T = B^T``.
    """
    if lam <= 0:
        raise ValueError(f"lambda must be positive (it keeps the system invertible), got {lam}")
    W0, K, V = (x.detach().to(torch.float64) for x in (W0, K, V))
    if K.shape[0] != W0.shape[1] or V.shape[0] != W0.shape[0] or K.shape[1] != V.shape[1]:
        raise ValueError(f"shapes do not match: W0 {tuple(W0.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}")
    A = lam * torch.eye(K.shape[0], dtype=torch.float64) + K @ K.T
    B = lam * W0 + V @ K.T
    W_star = torch.linalg.solve(A, B.T).T
    return QuickFixSolution(W_star, W0, K, V, lam)


_LAYER_PATTERNS = {  # a text encoder's self-attention output projections, by architecture
    "clip": r"(?:text_model\.)?encoder\.layers\.(?P<layer>\d+)\.self_attn\.out_proj",  # causal
    "t5": r"encoder\.block\.(?P<layer>\d+)\.layer\.0\.SelfAttention\.o",  # attends both ways
}


def _encoder_kind(model, part: str) -> str:
    """``"clip"`` (a causal CLIP-style text transformer), ``"t5"`` (T5's encoder, which reads in both directions),
    from the encoder's module paths; or the encoder's class name when it is neither."""
    for kind, pattern in _LAYER_PATTERNS.items():
        if any(re.fullmatch(rf"{re.escape(part)}\.{pattern}", p) for p in model.space.modules):
            return kind
    return type(model.text_encoders[part]).__name__


def quickfix_module_paths(model, layer: int = 0) -> list[str]:
    """Every text encoder's layer-``layer`` self-attention output projection, in the order the encoders run:
    CLIP's ``encoder.layers.{layer}.self_attn.out_proj`` (``text_model.`` prefix or not) and T5's
    ``encoder.block.{layer}.layer.0.SelfAttention.o``. An encoder of another architecture is refused by name."""
    out = []
    for part in model.text_parts:
        kind = _encoder_kind(model, part)
        if kind not in _LAYER_PATTERNS:
            raise ValueError(f"Diff-QuickFix edits the layer-{layer} self-attention output projection of CLIP and T5 "
                             f"text encoders; the {model.family.label} pipeline's {part} is a {kind}, whose "
                             f"layer-{layer} projection the suite does not know")
        pattern = rf"{re.escape(part)}\.{_LAYER_PATTERNS[kind]}"
        hits = [p for p in model.space.modules
                if (m := re.fullmatch(pattern, p)) is not None and int(m.group("layer")) == layer]
        if len(hits) != 1:
            raise ValueError(f"found {len(hits)} layer-{layer} self-attention output projections in {part}; "
                             f"Diff-QuickFix needs a CLIP-style (or T5) text encoder with a layer {layer}")
        out.append(hits[0])
    return out


def quickfix_module_path(model, layer: int = 0) -> str:
    """The first text encoder's layer-``layer`` self-attention output projection (``text_model.`` prefix or not):
    Stable Diffusion 1.x/2.x's only one; :func:`quickfix_module_paths` lists every encoder's."""
    return quickfix_module_paths(model, layer)[0]


def quickfix_prompts(model, concept: str, anchor: str | None = None, n_per_template: int = 2,
                     seed: int = EDIT_SEED) -> list[tuple[str, str]]:
    """(concept prompt, anchor prompt) pairs that differ only in the concept word.

    Concept world: every caption template, ``n_per_template`` scenes with the concept's value (other attributes
    drawn from the edit seed stream) plus one caption naming the concept alone; the anchor prompt leaves the word
    out (``anchor=None``) or puts ``anchor`` in its place. Other models: the default templates around the concept
    phrase and the anchor phrase (empty by default, as CAD's anchor).
    """
    if model.is_concept_world:
        return model.world.swapped_captions(concept, anchor, n_per_template, seed)
    return [(" ".join(t.format(concept).split()), " ".join(t.format(anchor or "").split())) for t in DEFAULT_TEMPLATES]


def _real_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt).input_ids)


def aligned_positions(tokenizer, row: list[int], subject: list[int] | Sequence[list[int]], concept: str,
                      concept_prompt: str, anchor_prompt: str, *, before: bool = False,
                      attended: tuple[Sequence[bool], Sequence[bool]] | None = None) -> tuple[list[int], list[int]]:
    """Positions of a concept prompt's token ids ``row`` from the concept's last token to the end of the context,
    and the anchor prompt's matching positions (shifted by the difference of the two prompts' token counts: -1 when
    the word is left out): where the closed-form edits read what the concept passes on.

    ``subject``: the concept's ids, or several spellings of them (:func:`subject_forms`; the first one found in the
    row is used, at its last occurrence). ``before``: also the positions before the subject, each matched to the
    same position of the anchor prompt: a reader that sees the whole prompt (T5's encoder, which attends both ways,
    or a denoiser whose joint attention mixes the tokens) carries the concept there too. ``attended``: per position
    of the concept row and of the anchor row, whether the reader sees it; pairs where either is masked (padding
    under an attention mask) are left out."""
    forms = [list(subject)] if subject and isinstance(subject[0], int) else [list(s) for s in subject if s]
    L = len(row)
    hits = []
    for sub in forms:  # in order: a later spelling only when the earlier ones do not occur
        hits = [(p, len(sub)) for p in range(L - len(sub) + 1) if row[p : p + len(sub)] == sub]
        if hits:
            break
    if not hits:
        raise ValueError(f"the concept {concept!r} does not occur in prompt {concept_prompt!r}")
    first, n = max(hits)
    last = first + n - 1
    shift = _real_length(tokenizer, anchor_prompt) - _real_length(tokenizer, concept_prompt)
    pos = [p for p in range(last, L) if 0 <= p + shift < L]
    apos = [p + shift for p in pos]
    if before:
        pos, apos = list(range(first)) + pos, list(range(first)) + apos
    if attended is not None:
        keep = [i for i, (p, q) in enumerate(zip(pos, apos)) if attended[0][p] and attended[1][q]]
        pos, apos = [pos[i] for i in keep], [apos[i] for i in keep]
    return pos, apos


def encoder_kwargs(model, part: str, ids: torch.Tensor) -> dict:
    """Keyword arguments besides the ids that the family's pipeline runs text encoder ``part`` with that change its
    states: the tokenizer's attention mask (PixArt's T5)."""
    enc = next(e for e in model.encoders if e.part == part)
    if enc.attention_mask:
        return {"attention_mask": (ids != model.tokenizers[part].pad_token_id).long()}
    return {}


def attended_mask(model, part: str, ids: torch.Tensor) -> torch.Tensor | None:
    """Per token, whether the family's pipeline lets its readers see it (False at padding under an attention
    mask: PixArt's T5 and its cross-attention); None when every position is seen."""
    kw = encoder_kwargs(model, part, ids)
    return kw["attention_mask"].bool() if "attention_mask" in kw else None


def reads_whole_prompt(model, part: str) -> bool:
    """Whether encoder ``part``'s states at a position depend on tokens after it (T5 attends both ways; CLIP is
    causal): then the positions before the subject carry the concept too."""
    return _encoder_kind(model, part) != "clip"


def quickfix_keys_values(model, pairs: Sequence[tuple[str, str]], concept: str, layer: int = 0,
                         preserve_prompts: Sequence[str] = (),
                         part: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Keys (in, N), values (out, N) and W0 for Diff-QuickFix on text encoder ``part`` (default: the first), float64.

    For each pair: the concept prompt's inputs of the output projection at the last subject token and every later
    position (padding included: the UNet attends to every position), and the unedited projection's output minus
    bias (``W0 k``) for the anchor prompt at the matching position. Positions match counting from the end of the
    subject: the anchor's position is shifted by the difference of the two prompts' token counts (-1 when the word
    is left out). ``preserve_prompts`` add their keys at every position with values ``W0 k`` (keep their outputs).

    A T5 encoder attends in both directions, so its layer-0 attention carries the concept to the positions before
    the subject as well: there the keys are every position but the subject's tokens before its last, those before
    it matched to the same position of the anchor prompt. Positions its pipeline masks (PixArt's T5 padding, which
    neither T5 nor the transformer reads) are left out, for the concept, anchor and preserved prompts alike.
    """

    part = part or model.text_parts[0]
    paths = quickfix_module_paths(model, layer)
    path = paths[model.text_parts.index(part)]
    W0 = model.module(path).weight.detach().to(torch.float64).cpu()  # solved on the CPU, as UCE is
    tok = model.tokenizers[part]
    length = next(e.length for e in model.encoders if e.part == part)
    subject = subject_forms(tok, concept)
    concept_prompts = model.check_prompts([c for c, _ in pairs])
    anchor_prompts = model.check_prompts([a for _, a in pairs])
    before = reads_whole_prompt(model, part)

    def inputs(prompts):
        ids = diffusion.tokenize(tok, prompts, model.device, max_length=length)
        with torch.no_grad(), model.nn[part].trace(ids, **encoder_kwargs(model, part, ids)):
            x = model.envoy(path).input.save()
        return ids, x.detach().to(torch.float64).cpu(), attended_mask(model, part, ids)

    ids_c, x_c, m_c = inputs(concept_prompts)
    _, x_a, m_a = inputs(anchor_prompts)
    keys, vals, n_positions = [], [], []
    for i, (cp, ap) in enumerate(zip(concept_prompts, anchor_prompts)):
        seen = None if m_c is None else (m_c[i].tolist(), m_a[i].tolist())
        pos, apos = aligned_positions(tok, ids_c[i].tolist(), subject, concept, cp, ap, before=before, attended=seen)
        keys.append(x_c[i, pos])
        vals.append(x_a[i, apos] @ W0.T)
        n_positions.append(len(pos))
    n_concept_keys = sum(n_positions)
    if preserve_prompts:
        _, x_p, m_p = inputs(model.check_prompts(list(preserve_prompts)))
        kp = x_p.reshape(-1, x_p.shape[-1]) if m_p is None else x_p[m_p.to(x_p.device)]
        keys.append(kp)
        vals.append(kp @ W0.T)
    K = torch.cat(keys).T.contiguous()
    V = torch.cat(vals).T.contiguous()
    return K, V, W0, {"module": path, "n_keys": K.shape[1], "n_concept_keys": n_concept_keys,
                      "n_preserve_keys": K.shape[1] - n_concept_keys}


def preserve_prompts(model, concept: str, n: int, seed: int) -> list[str]:
    """``n`` prompts without the concept, for an edit's optional preservation keys: captions of scenes without its
    value on the concept world (from its provider), the default templates around "a thing" elsewhere."""
    if n <= 0:
        return []
    if not model.is_concept_world:
        return [t.format("a thing") for t in DEFAULT_TEMPLATES][:n]
    return model.world.captions_without(concept, n, seed)


def diff_quickfix_solutions(model, concept: str, anchor: str | None = None, lam: float = QUICKFIX_LAMBDA,
                            n_per_template: int = 2, preserve: int = 0, layer: int = 0,
                            seed: int = EDIT_SEED) -> list[tuple[QuickFixSolution, dict]]:
    """Diff-QuickFix's solution for every text encoder of the model (in the order they run), each with its
    bookkeeping (module, prompts, key counts): a concept a pipeline reads through two or three encoders (SDXL's two
    CLIPs, SD3's CLIPs and T5, FLUX's CLIP and T5) is still read through any encoder left unedited."""
    pairs = quickfix_prompts(model, concept, anchor, n_per_template, seed)
    keep = preserve_prompts(model, concept, preserve, seed)
    out = []
    for part in model.text_parts:
        K, V, W0, info = quickfix_keys_values(model, pairs, concept, layer, keep, part)
        sol = quickfix_solve(W0, K, V, lam)
        info = {**info, "encoder": part, "pairs": pairs, "preserve_prompts": keep, "lambda": lam, "anchor": anchor,
                "key_rank": int(torch.linalg.matrix_rank(K)), "in_features": K.shape[0]}
        out.append((sol, info))
    return out


def diff_quickfix_solution(model, concept: str, anchor: str | None = None, lam: float = QUICKFIX_LAMBDA,
                           n_per_template: int = 2, preserve: int = 0, layer: int = 0,
                           seed: int = EDIT_SEED) -> tuple[QuickFixSolution, dict]:
    """Diff-QuickFix's solution and its bookkeeping (module, prompts, key counts) for the first text encoder (Stable
    Diffusion 1.x/2.x's only one; :func:`diff_quickfix_solutions` gives every encoder's)."""
    pairs = quickfix_prompts(model, concept, anchor, n_per_template, seed)
    keep = preserve_prompts(model, concept, preserve, seed)
    K, V, W0, info = quickfix_keys_values(model, pairs, concept, layer, keep)
    sol = quickfix_solve(W0, K, V, lam)
    info = {**info, "pairs": pairs, "preserve_prompts": keep, "lambda": lam, "anchor": anchor,
            "key_rank": int(torch.linalg.matrix_rank(K)), "in_features": K.shape[0]}
    return sol, info


def diff_quickfix(model, concept: str, anchor: str | None = None, lam: float = QUICKFIX_LAMBDA,
                  n_per_template: int = 2, preserve: int = 0, layer: int = 0, seed: int = EDIT_SEED) -> WeightEdit:
    """Diff-QuickFix: rewrite the layer-0 self-attention output projection so the concept reads as the anchor; on a
    pipeline with several text encoders, every encoder's (CLIP's ``out_proj``, T5's ``SelfAttention.o``)."""
    t0 = time.perf_counter()
    solutions = diff_quickfix_solutions(model, concept, anchor, lam, n_per_template, preserve, layer, seed)
    updates = tuple(WeightUpdate(f"{info['module']}.weight", sol.W_star.reshape(-1).clone())
                    for sol, info in solutions)
    rel = [float((sol.W_star - sol.W0).norm() / sol.W0.norm()) for sol, _ in solutions]
    first = solutions[0][1]
    if len(solutions) == 1:  # Stable Diffusion 1.x/2.x: the record as it always was
        info = {"module": first["module"], "key_rank": first["key_rank"], "in_features": first["in_features"],
                "relative_change": rel[0], "normal_equation_residual": solutions[0][0].residual()}
    else:
        info = {"module": ", ".join(i["module"] for _, i in solutions),
                "key_rank": ", ".join(str(i["key_rank"]) for _, i in solutions),
                "in_features": ", ".join(str(i["in_features"]) for _, i in solutions),
                "relative_change": max(rel), "normal_equation_residual": max(s.residual() for s, _ in solutions),
                "per_encoder": {i["encoder"]: {"module": i["module"], "n_keys": i["n_keys"],
                                               "n_preserve_keys": i["n_preserve_keys"], "key_rank": i["key_rank"],
                                               "in_features": i["in_features"], "relative_change": r}
                                for (_, i), r in zip(solutions, rel)}}
    return WeightEdit(updates, name="diff-quickfix", method="closed form (no attribution)", concept=concept,
                      objective=None, seconds=time.perf_counter() - t0, budget=None,
                      info={"module": info["module"], "lambda": lam, "anchor": anchor or "(word left out)",
                            "n_keys": sum(i["n_keys"] for _, i in solutions),
                            "n_preserve_keys": sum(i["n_preserve_keys"] for _, i in solutions),
                            "key_rank": info["key_rank"], "in_features": info["in_features"],
                            "relative_change": info["relative_change"],
                            "normal_equation_residual": info["normal_equation_residual"],
                            "n_prompt_pairs": len(first["pairs"]),
                            **({"per_encoder": info["per_encoder"]} if "per_encoder" in info else {})})
