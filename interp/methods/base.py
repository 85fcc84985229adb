"""What every attribution method shares: the interface, the run bookkeeping and the registry.

Like captum's ``attribute``, every method is called the same way and returns the same thing::

    df = interp.attribute("cad", model, "red", components, objective=ObjectiveConfig(kind="erase"))

and ``df`` is the tidy frame of :mod:`interp.core.results`: one row per component, ``score > 0`` when the component
supports the concept. Each method declares capability flags (granularities it handles, whether it uses gradients,
whether its scores are exact ablation effects, whether it also makes maps) so callers can pick methods without trying
them. A method with maps (causal tracing) returns them from ``maps(...)``, called as ``attribute``: a frame of their
own (:data:`interp.core.results.MAP_COLUMNS`), computed in the same run and cached beside the scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import platform
import sys
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from interp.core.components import TOKEN_GRANULARITIES, ComponentSet, is_text_part
from interp.core.concepts import resolve
from interp.core.features import identity
from interp.core.objectives import Objective, ObjectiveConfig
from interp.core.results import SCHEMA, Cost, empty_maps, make_frame, make_map_frame
from interp.core.runs import versions
from interp.core.store import Store
from interp.core.tokens import check_concept

REGISTRY: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, so callers can choose methods without trying them.

    Attributes:
        granularities: the component granularities it handles (``layer``, ``neuron``, ``head``, ``weight``,
            ``feature``: latents of an attached sparse autoencoder, :mod:`interp.core.features`; ``tokenkv``: a
            cross-attention head's key and value at the concept's tokens, ``tokenspan``: at them and every later
            position, :mod:`interp.core.tokens`).
        gradients: whether it takes gradients (it then needs a differentiable objective and more memory per row).
        exact: whether its scores are measured ablation effects rather than estimates.
        text_encoder: whether it attributes text-encoder components.
        maps: whether it also localizes along timesteps and tokens (read with :meth:`Method.maps`).
        reference: it is the ground truth every comparison checks the others against (true ablation; one method).
        uses_reference: part of its scores are the reference's own measurements (screen-then-verify), so it is left
            out when the tables ask which estimate agrees best with the reference.
        baseline: the method every other's LDS is set against on the same held-out masks (COAR, for which the LDS
            was defined; one method).
        single_changes: it evaluates J with one unit changed at a time, which prefix replay speeds up (the plan
            says so).
    """
    granularities: tuple[str, ...] = ("layer", "neuron", "head")
    gradients: bool = False
    exact: bool = False  # scores are measured ablation effects, not estimates
    text_encoder: bool = True
    maps: bool = False  # also localizes along the timestep / token axes (read with Method.maps)
    reference: bool = False
    uses_reference: bool = False
    baseline: bool = False
    single_changes: bool = False


def option(default, help: str, *, flag: str | None = None, compare=MISSING, choices=None):
    """A method option that the commands show: ``--<method>-<flag>`` (``flag`` defaults to the field's name with
    dashes) in the method's own group of ``compare_methods --help``, with ``help``.

    Args:
        default: the option's default when the method is called from Python.
        help: one line for ``--help``.
        flag: the option's name after ``--<method>-`` (default: the field name, ``_`` as ``-``).
        compare: the default in a comparison run, when it differs from ``default`` (shown in ``--help``).
        choices: the values a string option accepts.

    Returns:
        A dataclass field for a :class:`MethodConfig` subclass.
    """
    meta = {"help": help, "flag": flag}
    if compare is not MISSING:
        meta["compare"] = compare
    if choices is not None:
        meta["choices"] = tuple(choices)
    kw = {"default_factory": (lambda d=default: d)} if isinstance(default, (list, dict)) else {"default": default}
    return field(**kw, metadata=meta)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config: ``seed`` plus the method's own options.

    Fields named in :attr:`COUNTS` must be integers >= 1 and those in :attr:`RATES` rates in (0, 1); a ``mode`` must be
    ``"zero"`` or ``"mean"``. Checked on construction.

    Attributes:
        seed: seed of the method's random choices (masks), >= 0.

    Raises:
        ValueError: a field out of its range, naming it.
    """

    seed: int = 0

    #: Fields every method config may have, checked by name on construction: counts, rates and the ablation mode.
    COUNTS: ClassVar[tuple[str, ...]] = ("chunk", "batch", "steps", "n_groups", "n_masks", "n_noise")
    RATES: ClassVar[tuple[str, ...]] = ("alpha",)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"{type(self).__name__}: seed must be an integer >= 0, got {self.seed!r}")
        for name in self.COUNTS:
            v = getattr(self, name, 1)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer >= 1, got {v!r}")
        for name in self.RATES:
            v = getattr(self, name, 0.5)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{type(self).__name__}: {name} is an ablation rate and must be in (0, 1), got {v!r}")
        if getattr(self, "mode", "zero") not in ("zero", "mean"):
            raise ValueError(f"{type(self).__name__}: mode must be 'zero' or 'mean', got {self.mode!r}")

    def to_dict(self) -> dict:
        """The options as a dict (part of every cached result's key and of its metadata)."""
        return asdict(self)


def register(cls):
    """Class decorator: add a :class:`Method` subclass to :data:`REGISTRY` under its ``name``.

    Args:
        cls: the method class (it must set ``name``; a name is lower-case letters, digits and ``_``).

    Returns:
        The class, unchanged: ``@register`` above its definition.

    Raises:
        ValueError: a bad name, or one another class has.
    """
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"{cls.__name__}.name must be lower-case letters, digits and '_', got {name!r}")
    if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is taken by {REGISTRY[name].__module__}.{REGISTRY[name].__qualname__}:"
                         f" give {cls.__name__} another name")
    REGISTRY[name] = cls
    return cls


@dataclass(frozen=True)
class RunContext:
    """Where one run of a method computes, what :meth:`Method._scores` receives: the method object keeps none of it,
    so one object can run on several models, concepts and stores.

    Attributes:
        entry: the run's cache entry (:meth:`interp.core.store.Store.entry`): the engine's sweeps store their chunks
            there, so a killed run resumes.
        store: the store of the run (a method that builds on another method's result asks it for that result).
        executor: where the engine's sweeps run (:mod:`interp.core.executors`); None: this process.
        progress: show progress bars.
    """

    entry: object
    store: Store
    executor: object = None
    progress: bool = False


@dataclass
class Estimate:
    """One estimate besides a run's main one (a variant: another mask rate, budget or fit), as rows of the result.

    Attributes:
        score: one score per component (``> 0``: ablating the component lowers J).
        stderr: its standard errors, or None.
        columns: its typed columns of :data:`interp.core.results.SCHEMA` (``variant``, ``estimator``, ``budget``,
            ``mask_alpha``).
        components: the components it scores (None: the run's).
    """

    score: object
    stderr: object = None
    columns: dict = field(default_factory=dict)
    components: ComponentSet | None = None


@dataclass
class Map:
    """One map column of a method with the ``maps`` capability: a score per component at one ``position`` along
    ``axis`` (``timestep`` or ``token``)."""

    components: object
    score: object
    stderr: object
    axis: str
    position: object


@dataclass
class Scores:
    """What :meth:`Method._scores` returns: the main estimate and what else the run made.

    Attributes:
        score: one score per component (``> 0``: ablating the component lowers J).
        stderr: its standard errors, or None (one evaluation: no spread to report).
        columns: the main estimate's typed columns (``budget``, ``mask_alpha``).
        variants: other estimates of the same run (:class:`Estimate`), rows with a ``variant`` of their own.
        maps: map columns (:class:`Map`), for a method with the ``maps`` capability.
        cost: the main estimate's :class:`~interp.core.results.Cost`, when it is not simply the passes counted while
            the run computed (the mask-averaged gradient also paid for its extra rates).
        variant_costs: ``{variant: Cost}`` of the variants.
        meta: more metadata for ``df.attrs["meta"]``.
    """

    score: object
    stderr: object = None
    columns: dict = field(default_factory=dict)
    variants: list[Estimate] = field(default_factory=list)
    maps: list[Map] = field(default_factory=list)
    cost: Cost | None = None
    variant_costs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attribution:
    """One run's result frames: ``scores`` (:data:`interp.core.results.SCHEMA`) and ``maps``
    (:data:`interp.core.results.MAP_COLUMNS`, empty for a method without maps)."""

    scores: pd.DataFrame
    maps: pd.DataFrame


class Method:
    """Base class of the attribution methods: subclasses set ``name``, ``label``, ``Config``, ``capabilities`` and
    implement :meth:`_scores` and :meth:`planned_rows` (what ``--plan`` counts). Everything else about a method (its
    command-line options, its options in a comparison, its memory, what it reuses) has a default here that a method
    overrides in its own file: adding a method edits no other file.

    Args:
        config: the method's frozen config (an instance of ``Config``); or give its fields as ``**overrides``.
        **overrides: config fields, e.g. ``MaskGrad(n_masks=24, alpha=0.2)``.

    Raises:
        TypeError: both a config and overrides, or an unknown option (the message lists the method's options).
        ValueError: an option out of its range.
    """

    name: ClassVar[str]
    #: How tables, figures and report sentences name the method ("true ablation", "CAD").
    label: ClassVar[str] = ""
    #: In a comparison run when ``methods`` is not given (a method from a plugin runs when named).
    default_run: ClassVar[bool] = False
    #: Among the rankings ``analyses.erasure_curves`` ablates when ``--methods`` is not given.
    default_erasure: ClassVar[bool] = False
    #: One sentence on the variants it reports beside its main estimate (rows with a ``variant`` of their own).
    variants_help: ClassVar[str] = ""
    #: What its maps' scores are, for their colour bars (a method with the ``maps`` capability).
    map_score: ClassVar[str] = "score"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: MethodConfig | None = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config object or keyword overrides, not both")
        try:
            self.config = config or self.Config(**overrides)
        except TypeError as err:
            fields = ", ".join(self.Config.__dataclass_fields__)
            raise TypeError(f"{self.name}: {err}. Its options are: {fields}") from None

    # -- the interface ---------------------------------------------------------------------------------------
    def attribute(self, model, concept, components, *, objective: ObjectiveConfig | Objective | None = None,
                  store: Store | str | None = None, progress: bool = False, executor=None) -> pd.DataFrame:
        """Attribute ``concept``'s objective to ``components``.

        Args:
            model: a loaded :class:`~interp.core.models.DiffusionModel`.
            concept: a concept word or phrase, or a :class:`~interp.core.concepts.Concept`.
            components: a :class:`~interp.core.components.ComponentSet`, a list of addresses or components, or a dict of
                filters for ``model.components``.
            objective: an :class:`~interp.core.objectives.ObjectiveConfig` (default: ``ObjectiveConfig()``), or an
                already built :class:`~interp.core.objectives.Objective` of this model and concept.
            store: a :class:`~interp.core.store.Store` or folder that caches the result and its chunks (None: nothing
                cached).
            progress: show a progress bar.
            executor: where the engine's sweeps run (:mod:`interp.core.executors`: this process by default, or a
                ``RayExecutor``); the result is the same.

        Returns:
            The tidy result frame (:data:`interp.core.results.SCHEMA`): one row per component and estimate, ``score >
            0`` when ablating the component lowers J; metadata (config, objective, cost, versions) in
            ``df.attrs["meta"]``.

        Raises:
            ValueError: a granularity or text-encoder component the method does not handle, or an empty selection.
            interp.core.components.UnknownComponentError: an address that names no component.
        """
        return self.run(model, concept, components, objective=objective, store=store, progress=progress,
                        executor=executor).scores

    def maps(self, model, concept, components, *, objective: ObjectiveConfig | Objective | None = None,
             store: Store | str | None = None, progress: bool = False, executor=None) -> pd.DataFrame:
        """The maps of a method with the ``maps`` capability, from the same run as :meth:`attribute`.

        Takes the same arguments as :meth:`attribute`; with the same ``store``, the run is read from it (without
        one, the run is computed again: :meth:`run` gives both frames of one run).

        Returns:
            A frame of :data:`interp.core.results.MAP_COLUMNS` (``axis``, ``position``, ``score``, ...).

        Raises:
            ValueError: the method makes no maps (the message names those that do).
        """
        if not self.capabilities.maps:
            makers = sorted(n for n, m in REGISTRY.items() if m.capabilities.maps)
            raise ValueError(f"{self.name} makes no maps; methods that do: {makers}")
        return self.run(model, concept, components, objective=objective, store=store, progress=progress,
                        executor=executor).maps

    def run(self, model, concept, components, *, objective: ObjectiveConfig | Objective | None = None,
            store: Store | str | None = None, progress: bool = False, executor=None) -> Attribution:
        """One run's scores and maps (:class:`Attribution`); takes the arguments of :meth:`attribute`.

        The run is cached in ``store`` under everything it depends on (the method and its config, the objective's
        identity, the components), so asking again, for either frame, reads it back.
        """
        comps = as_component_set(model, components)
        if comps.granularities & set(TOKEN_GRANULARITIES):  # the concept's tokens, checked before the evaluation set
            cfg = (objective.config if isinstance(objective, Objective) else ObjectiveConfig(kind=objective)
                   if isinstance(objective, str) else objective or ObjectiveConfig())
            check_concept(model, objective.concept if isinstance(objective, Objective)
                          else resolve(model, concept, n=cfg.n_images, seed=cfg.seed))
        obj = objective if isinstance(objective, Objective) else Objective(model, concept, objective)
        bad = comps.granularities - set(self.capabilities.granularities)
        if bad:
            raise ValueError(f"{self.name} does not handle {sorted(bad)} granularity; it handles "
                             f"{self.capabilities.granularities}")
        if not self.capabilities.text_encoder and any(is_text_part(c.model) for c in comps):
            raise ValueError(f"{self.name} does not attribute text-encoder components")
        store = store if isinstance(store, Store) else Store(store)
        key = {"method": self.name, "method_config": self.config.to_dict(), **obj.identity(),
               "components": components_hash(comps), "schema": SCHEMA}
        if "feature" in comps.granularities:  # the same addresses under another SAE are other components
            key["features"] = identity(obj.model, comps)
        entry = store.entry(f"{self.name}-{obj.concept.name}", key)
        if entry.complete:
            maps = entry.load_maps()
            return Attribution(entry.load(), empty_maps() if maps is None else maps)
        return Attribution(*self._compute(obj, comps, RunContext(entry, store, executor, progress)))

    def _compute(self, obj, comps, run: RunContext):
        """Run :meth:`_scores` and save ``(scores, maps)`` with the run's metadata into its entry."""
        entry = run.entry
        counters_before = Counter(obj.model.counters)
        t0 = time.perf_counter()
        out = self._scores(obj, comps, run)
        if not isinstance(out, Scores):
            raise TypeError(f"{type(self).__name__}._scores must return a Scores, got {type(out).__name__}")
        seconds = time.perf_counter() - t0
        used = Counter(obj.model.counters)
        used.subtract(counters_before)
        used.update(entry.replayed)
        # The passes counted while it ran, unless the method states the cost of its main estimate itself (the
        # mask-averaged gradient also paid for its extra rates; screen-then-verify for its screener's run).
        cost = out.cost or Cost(used["unet_rows"] / obj.rows_per_eval, used["unet_rows_grad"] / obj.rows_per_eval)
        meta = {
            "method": self.name, "config": self.config.to_dict(), "objective": obj.describe(),
            "capabilities": asdict(self.capabilities),
            "cost": dataclasses.replace(cost, seconds=seconds).to_dict(),
            "variant_costs": {v: c.to_dict() for v, c in out.variant_costs.items()},
            "n_components": len(comps), "versions": versions(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), **out.meta,
        }
        common = dict(method=self.name, model=obj.model.name, concept=obj.concept.name, objective=obj.config.kind,
                      n_samples=obj.n_samples, seed=self.config.seed, config_hash=entry.hash)
        # the main estimate's typed columns (budget, mask rate); a variant names its own
        frames = [make_frame(comps, out.score, out.stderr, **common, **out.columns)]
        for v in out.variants:
            frames.append(make_frame(comps if v.components is None else v.components, v.score, v.stderr, **common,
                                     **v.columns))
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        maps = [make_map_frame(m.components, m.score, m.stderr, axis=m.axis, position=m.position, **common)
                for m in out.maps]
        maps = pd.concat(maps, ignore_index=True) if maps else empty_maps()
        return entry.save(df, meta, maps), maps

    def _scores(self, obj: Objective, comps: ComponentSet, run: RunContext) -> Scores:
        """The method itself: a score per component of ``comps`` for ``obj``'s J (:class:`Scores`), computed through
        the engine with ``run``'s cache entry and executor."""
        raise NotImplementedError

    @classmethod
    def command_options(cls) -> list[dataclasses.Field]:
        """The options of :attr:`Config` that the commands show (declared with :func:`option`), in order."""
        return [f for f in dataclasses.fields(cls.Config) if "help" in f.metadata]

    @classmethod
    def flag(cls, f: dataclasses.Field) -> str:
        """The command-line flag of option ``f``: ``--<method>-<flag>``."""
        return f"--{cls.name}-" + (f.metadata.get("flag") or f.name).replace("_", "-")

    @classmethod
    def compare_options(cls, cfg, n_components: int) -> dict:
        """The options this method runs with in a comparison.

        By default: the comparison's ``seed``, each option's comparison default (``option(compare=...)``), and what
        the comparison gives for this method (``CompareConfig.options[name]``, the ``--<method>-...`` flags). A method
        whose options derive from the comparison (its component count, its LDS rates) extends this.

        Args:
            cfg: the comparison's :class:`~interp.studies.compare_config.CompareConfig`.
            n_components: how many components it attributes.

        Returns:
            ``{option: value}`` for the method's constructor.
        """
        defaults = {f.name: f.metadata["compare"] for f in dataclasses.fields(cls.Config) if "compare" in f.metadata}
        return {"seed": cfg.seed, **defaults, **cfg.options.get(cls.name, {})}

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows a run of this method executes (:class:`interp.studies.plan.Rows`), from its config, the components
        and the evaluation set's shape (:class:`interp.studies.plan.EvalShape`): what ``--plan`` counts and the run
        records.

        Raises:
            NotImplementedError: a method that does not say (``--plan`` then names it).
        """
        raise NotImplementedError(f"method {cls.name!r} does not declare planned_rows, so its cost cannot be planned")

    @classmethod
    def reuses(cls, config) -> list[tuple[str, dict]]:
        """Other methods' results this one reads from the same store, as ``(name, options)``: the plan counts them
        once in a run that also reports them (screen-then-verify screens with the run's own estimate)."""
        return []

    @classmethod
    def memory_bytes(cls, config, n_components: int) -> dict[str, float]:
        """The host memory of its largest allocations beyond the engine's, by what holds it (``{description:
        bytes}``), so a run that cannot fit is refused before it starts."""
        return {}

    @classmethod
    def recorded_rows(cls, config, comps, shape):
        """The UNet rows the result records as its cost (:mod:`interp.studies.plan`); by default all it runs.

        Args:
            config: the method's config.
            comps: the components.
            shape: the evaluation set's shape (:class:`interp.studies.plan.EvalShape`).

        Returns:
            The rows, as :class:`interp.studies.plan.Rows`.
        """
        return cls.planned_rows(config, comps, shape)


def as_component_set(model, components) -> ComponentSet:
    """Accept a ComponentSet, a list of addresses/Components, or a dict of filters for ``model.components``."""
    if isinstance(components, dict) and not components:
        raise ValueError("components={} selects nothing: pass filters such as {'family': 'ff'}, a ComponentSet or "
                         "a list of addresses")
    if isinstance(components, ComponentSet):
        comps = components
    elif isinstance(components, dict):
        comps = model.components(**components)
    else:
        comps = ComponentSet([model.space.parse(c) for c in ([components] if isinstance(components, str)
                                                              else components)])
    if len(comps) == 0:
        raise ValueError("the component selection is empty: widen the filters (family, kind, block) or pass "
                         "component addresses")
    return comps


def components_hash(comps: ComponentSet) -> str:
    return hashlib.sha256("\n".join(comps.addresses).encode()).hexdigest()[:16]



def stderr_over(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Standard error of the mean along ``dim`` (0 when there is one value)."""
    n = x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.select(dim, 0))
    return x.std(dim=dim) / np.sqrt(n)


def get(name: str) -> type[Method]:
    """The registered method class called ``name``.

    Args:
        name: a registry name (``"cad"``, ``"ablation"``, ...).

    Returns:
        The :class:`Method` subclass.

    Raises:
        KeyError: no method of that name (the message lists the registered ones).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered methods are {sorted(REGISTRY)}")
    return REGISTRY[name]


def attribute(method: str, model, concept, components, *, objective=None, store=None, progress=False,
              executor=None, **config) -> pd.DataFrame:
    """Run a registered method by name: ``interp.attribute("cad", model, "red", components, objective=..., **options)``.

    Args:
        method: a registry name: ``ablation``, ``cad``, ``coar``, ``tracing``, ``maskgrad``, ``ig``, ``midpoint``,
            ``screen`` or one you registered (:data:`REGISTRY`).
        model: a loaded :class:`~interp.core.models.DiffusionModel`.
        concept: a concept word (concept world), a phrase (other models) or a :class:`~interp.core.concepts.Concept`.
        components: a :class:`~interp.core.components.ComponentSet`, a list of addresses, or a dict of filters for
            ``model.components``.
        objective: an :class:`~interp.core.objectives.ObjectiveConfig` (default ``ObjectiveConfig()``: the erase
            objective) or a built :class:`~interp.core.objectives.Objective`.
        store: a :class:`~interp.core.store.Store` or folder that caches results; an interrupted run resumes there.
        progress: show a progress bar.
        executor: where the sweeps run (this process by default, or an :class:`interp.core.executors.RayExecutor`).
        **config: the method's options (its config's fields, e.g. ``n_masks=896`` for COAR; see each method's page).

    Returns:
        The tidy result frame: one row per component and estimate (columns ``method``, ``variant``, ``concept``,
        ``component``, ``block``, ``layer``, ``unit``, ``score``, ``stderr``, ...; :data:`interp.core.results.SCHEMA`),
        ``score > 0`` when ablating the component lowers J. Metadata, the cost included, in ``df.attrs["meta"]``.

    Raises:
        KeyError: an unknown method name.
        TypeError: an option the method does not have (the message lists its options).
        ValueError: an invalid option, objective, concept or component selection, naming it.
    """
    return get(method)(**config).attribute(model, concept, components, objective=objective, store=store,
                                           progress=progress, executor=executor)


def maps(method: str, model, concept, components, *, objective=None, store=None, progress=False, executor=None,
         **config) -> pd.DataFrame:
    """The maps of a registered method with the ``maps`` capability (causal tracing), by name.

    Takes the same arguments as :func:`attribute` and reads the same run (cached in ``store``).

    Returns:
        A frame of :data:`interp.core.results.MAP_COLUMNS`: per component and position along ``axis`` (``timestep`` or
        ``token``), the score.

    Raises:
        KeyError: an unknown method name.
        ValueError: the method makes no maps.
    """
    return get(method)(**config).maps(model, concept, components, objective=objective, store=store,
                                      progress=progress, executor=executor)


def reference() -> str:
    """The registry name of the reference method (``Capabilities.reference``: true ablation)."""
    return _the("reference")


def baseline() -> str:
    """The registry name of the LDS baseline (``Capabilities.baseline``: COAR)."""
    return _the("baseline")


def _the(flag: str) -> str:
    found = [n for n, m in REGISTRY.items() if getattr(m.capabilities, flag)]
    if len(found) != 1:
        raise RuntimeError(f"the registry needs exactly one method with capability {flag!r}, found {found}")
    return found[0]


def label(name: str) -> str:
    """How prose names a method or one of its variants (``"coar@40"`` is COAR's): its :attr:`Method.label`."""
    base = name.split("@", 1)[0]
    m = REGISTRY.get(base)
    return (m.label or m.name) if m is not None and base == name else name


def default_methods() -> tuple[str, ...]:
    """The methods of a comparison run that names none: the registered ones with ``default_run``, in registry
    order."""
    return tuple(n for n, m in REGISTRY.items() if m.default_run)


def load_plugin(spec: str) -> list[str]:
    """Import a module that registers methods (``@register``), by module name or ``.py`` file path; returns the
    names it added to the registry.

    Installed packages may instead declare the entry point group ``interp.methods``, loaded with the registry.

    Raises:
        ValueError: the file or module does not exist (naming it), or registers a name already taken.
    """
    before = dict(REGISTRY)
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"plugin file {spec} does not exist: pass a .py file that registers a method, or an "
                             f"importable module name")
        name = f"interp_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if name not in sys.modules:
            spec_ = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            try:
                spec_.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as err:
            if err.name != spec.split(".")[0] and err.name != spec:
                raise
            raise ValueError(f"plugin module {spec!r} cannot be imported: pass a .py file path or a module on the "
                             f"Python path") from None
    return [n for n in REGISTRY if n not in before]


def load_entry_points() -> None:
    """Register the methods of installed packages (entry point group ``interp.methods``)."""
    for ep in entry_points(group="interp.methods"):
        ep.load()
