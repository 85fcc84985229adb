"""The main job's configuration: the command line is generated from it (:mod:`analyses._cli`). Every field is
validated on construction; what needs the model (timesteps against the scheduler, component counts, memory) is checked
by :func:`interp.studies.compare.run_comparison` before any method runs.
"""

from __future__ import annotations

import numbers
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from interp.core.components import TOKEN_GRANULARITIES, ComponentSet
from interp.core.features import attach, load_sae
from interp.core.models import model_kind
from interp.core.objectives import ObjectiveConfig
from interp.methods import REGISTRY, default_methods, get, reference

OBJECTIVES = ("erase", "amplify", "classifier")
GRANULARITIES = ("layer", "neuron", "head")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("float32", "bfloat16", "float16", "float64")
MIN_HELDOUT_MASKS = 10  # an LDS (a rank correlation) over fewer held-out masks is noise


def _default_methods() -> list[str]:
    return list(default_methods())


def opt(default, help: str, **cli):
    """A config field with its command-line help (and optional ``flags``, ``choices``, ``nargs``)."""
    kw = {"default_factory": (lambda d=default: d)} if isinstance(default, (list, dict)) else {"default": default}
    return field(**kw, metadata={"help": help, **cli})


@dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison run depends on; its hash names the run folder and keys the caches."""

    model: str = opt("concept-world", "'concept-world' (shipped), a folder written by save_pretrained, or a hub id")
    concepts: tuple[str, ...] = opt(("red", "blue", "circle", "square", "striped"),
                                    "concept words (concept world: attribute values such as red, circle, striped)")
    methods: tuple[str, ...] = opt((), "methods to run, by registered name (a plugin's too, with --plugin); the "
                                        "reference, true ablation, is always needed; empty: every method the "
                                        "registry runs by default", cli_default=_default_methods)
    granularity: str = opt("neuron", "component granularity (feature: the latents of the --sae dictionaries; "
                                     "tokenkv: each cross-attention head's key and value at the concept's tokens; "
                                     "tokenspan: at them and every later position; families and kinds are then not "
                                     "used)", choices=GRANULARITIES + ("feature", "tokenkv", "tokenspan"))
    sae: tuple[str, ...] = opt((), "folders of sparse autoencoders (written by analyses.train_sae) attached to the "
                                   "model: their latents are the components of --granularity feature (families and "
                                   "kinds are then not used), or name some with --components SITE#fI", nargs="*",
                               metavar="FOLDER")
    families: tuple[str, ...] = opt(("ff",), "component families: ff attn1 attn2 resnet text_attn text_mlp ...",
                                    nargs="*", metavar="FAMILY")
    kinds: tuple[str, ...] = opt(("ff.net.2",), "module kinds within the families, e.g. ff.net.0 (hidden units) or "
                                                "ff.net.2 (outputs); empty for all", nargs="*")
    blocks: tuple[str, ...] = opt((), "UNet stages to include, e.g. mid_block up_blocks.0 (empty: all)", nargs="*")
    components: tuple[str, ...] = opt((), "explicit component addresses, e.g. "
                                          "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2[5]; when given, "
                                          "granularity/families/kinds/blocks are not used", nargs="*")
    objective: str = opt("erase", "the objective J: erase (how differently the model denoises with and without the "
                                  "concept), amplify (how well it denoises images of the concept) or classifier (an "
                                  "image judge's probability of the concept on generated images)", choices=OBJECTIVES)
    judge: str = opt("classifier", "image judge of the classifier objective: 'classifier' (the concept world's), "
                                   "'concept-world-clip' (shipped), or a CLIPModel folder or hub id")
    alternatives: tuple[str, ...] = opt((), "models other than the concept world: the phrases the image judge weighs "
                                            "each concept against (classifier objective, causal tracing's score, "
                                            "erasure curves), the concept itself left out; empty: the judge's "
                                            "generic ones for the objective, the other --concepts for the erasure "
                                            "curves", nargs="*", metavar="PHRASE")
    anchor: str = opt("shared", "erase objective: ablate the anchor branch too (shared) or keep it intact (frozen, "
                                "CAD's stop-gradient literally)", choices=("shared", "frozen"))
    n_images: int = opt(4, "evaluation images per concept", flags=("--images", "--n-images"))
    timesteps: tuple[int, ...] = opt((250, 600), "diffusion timesteps of the evaluation set, within the "
                                                 "scheduler's training range")
    gen_steps: int = opt(10, "denoising steps of the objective's generations: its evaluation images on models other "
                             "than the concept world (which renders them), and every image of the classifier objective")
    guidance: float | None = opt(None, "classifier-free guidance scale of every generation: those, and the erasure "
                                       "curves' held-out images (default: the model's: 1 for the concept world, its "
                                       "world.json's for concept-world-latent, 7.5 for Stable Diffusion)")
    dtype: str = opt("float32", "precision of the forward passes (statistics are accumulated in float32; float64 "
                                "for ground truth)", choices=PRECISIONS, flags=("--precision",),
                  hidden_flags=("--dtype",))
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    max_batch: int = opt(256, "UNet rows per forward pass, >= 1: a speed and memory knob (results differ only by "
                              "rounding); 256 was the fastest on a 2-core CPU (docs/benchmarks.md), a GPU takes more")
    erasure_k: tuple[int, ...] = opt((), "erasure curves in the report: ablate each method's top k components "
                                         "jointly, for each k given, and judge held-out generated images (empty: "
                                         "not measured; see analyses.erasure_curves for more options)", nargs="*")
    erasure_images: int = opt(48, "held-out images per concept of the erasure curves")
    erasure_steps: int = opt(10, "denoising steps of the erasure curves' images")
    lds_alphas: tuple[float, ...] = opt((0.01, 0.05, 0.2), "ablation rates of the held-out masks, each in (0, 1)")
    heldout_masks: int = opt(64, f"held-out joint-ablation masks per ablation rate for the LDS (at least "
                                 f"{MIN_HELDOUT_MASKS})")
    n_boot: int = opt(1000, "bootstrap resamples of the confidence intervals (at least 100)")
    seed: int = opt(0, "seed of every random choice (>= 0)")
    options: dict = opt({}, "each method's options by method, e.g. {'coar': {'n_masks': 800}} (the commands' "
                            "--<method>-<option> flags; each method's file declares them)")

    def __post_init__(self):
        check_fields(self)
        if not self.model.strip():
            raise ValueError("model is empty: pass 'concept-world', a pipeline folder or a hub id")
        if not self.concepts:
            raise ValueError("no concepts given")
        if any(not c.strip() for c in self.concepts):
            raise ValueError(f"concept words must be non-empty, got {self.concepts}")
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"duplicate concepts in {self.concepts}")
        if any(not a.strip() for a in self.alternatives) or len(set(self.alternatives)) != len(self.alternatives):
            raise ValueError(f"alternatives (--alternatives) must be distinct non-empty phrases, got "
                             f"{list(self.alternatives)}")
        alone = [c for c in self.concepts if self.alternatives and set(self.alternatives) <= {c}]
        if alone:
            raise ValueError(f"alternatives (--alternatives) {list(self.alternatives)} leave {alone[0]!r} nothing to "
                             f"be weighed against: name phrases other than the concept")
        check_saes(self)
        features = self.granularity == "feature" or any("#f" in a for a in self.components)
        tokens = ({self.granularity} & set(TOKEN_GRANULARITIES)
                  | {"tokenspan" if "#kvs" in a else "tokenkv" for a in self.components if "#kv" in a})
        needs = tokens | ({"feature"} if features else set())
        if not self.methods:
            # features, token-KV units: the default methods that attribute them
            object.__setattr__(self, "methods", tuple(m for m in default_methods()
                                                      if needs <= set(get(m).capabilities.granularities)))
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered methods are {sorted(REGISTRY)} (a method of "
                             f"your own: --plugin FILE.py)")
        blind = [m for m in self.methods if features and "feature" not in get(m).capabilities.granularities]
        if blind:
            raise ValueError(f"method(s) {blind} do not attribute SAE features: leave them out of --methods")
        blind = [m for m in self.methods if not tokens <= set(get(m).capabilities.granularities)]
        if blind:
            raise ValueError(f"method(s) {blind} do not attribute token-KV components: leave them out of --methods")
        if reference() not in self.methods:
            raise ValueError(f"the comparison needs {reference()!r} (the reference of every table): add it to "
                             f"--methods")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"duplicate methods in {self.methods}")
        object.__setattr__(self, "options", check_method_options(self.options, self.methods))
        if self.n_images < 1:
            raise ValueError(f"n_images (--images) must be >= 1, got {self.n_images}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch (--max-batch) must be >= 1, got {self.max_batch}")
        if not self.timesteps or any(t < 0 for t in self.timesteps):
            raise ValueError(f"timesteps must be non-empty and >= 0, got {self.timesteps}")
        if self.gen_steps < 1:
            raise ValueError(f"gen_steps (--gen-steps) must be >= 1, got {self.gen_steps}")
        if any(k < 1 for k in self.erasure_k):
            raise ValueError(f"erasure_k values must be >= 1, got {self.erasure_k}")
        if self.erasure_k and self.erasure_images < 3:  # a quarter show the concept, the rest other values
            raise ValueError(f"erasure_images (--erasure-images) must be >= 3, got {self.erasure_images}")
        if self.erasure_k and self.erasure_steps < 1:
            raise ValueError(f"erasure_steps (--erasure-steps) must be >= 1, got {self.erasure_steps}")
        if not self.lds_alphas:
            raise ValueError("lds_alphas is empty: give at least one ablation rate in (0, 1)")
        for a in self.lds_alphas:
            if not 0 < a < 1:
                raise ValueError(f"LDS ablation rates must be in (0, 1), got {a}")
        if self.heldout_masks < MIN_HELDOUT_MASKS:
            raise ValueError(f"heldout_masks (--heldout-masks) must be >= {MIN_HELDOUT_MASKS} for a meaningful LDS, "
                             f"got {self.heldout_masks}")

    def to_dict(self) -> dict:
        """The fields as a dict: what the run's hash, ``meta.json`` and the caches' keys are made of."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the configuration") -> "CompareConfig":
        """The config a run folder's ``status.json`` or ``meta.json`` records (:meth:`to_dict`).

        Raises:
            ValueError: fields this version does not have (a run written by an older version, whose method options
                were fields of their own such as ``coar_masks``), naming them and the fix.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where} has fields this version does not know ({', '.join(unknown)}): it was written "
                             f"by an older version; run the comparison again (method options are now "
                             f"--<method>-<option> flags, e.g. --coar-masks)")
        return cls(**d)

    def objective_config(self):
        """The :class:`~interp.core.objectives.ObjectiveConfig` every method of the run attributes."""

        return ObjectiveConfig(kind=self.objective, anchor=self.anchor, n_images=self.n_images,
                               timesteps=self.timesteps, seed=self.seed, gen_steps=self.gen_steps,
                               guidance=self.guidance, dtype=self.dtype, judge=self.judge, max_batch=self.max_batch)

    def method_options(self, method: str, n: int) -> dict:
        """The options ``method`` runs with in this comparison over ``n`` components. Each method declares them
        (:meth:`interp.methods.base.Method.compare_options`), so a new method needs no edit here."""

        return get(method).compare_options(self, n)


def check_sae_folders(saes) -> None:
    """Each ``--sae`` folder holds an SAE, and none is given twice (no model needed).

    Raises:
        ValueError: naming the folder.
    """
    for folder in saes:
        if not (Path(folder).expanduser() / "sae.safetensors").is_file():
            raise ValueError(f"--sae {folder} holds no sae.safetensors: pass a folder written by "
                             f"python -m analyses.train_sae --out FOLDER")
    if len(set(saes)) != len(saes):
        raise ValueError(f"duplicate --sae folders in {list(saes)}")


def check_saes(cfg) -> None:
    """``--sae`` folders exist and hold an SAE, and feature components have one (no model needed).

    Raises:
        ValueError: naming the folder or the missing option.
    """

    saes = getattr(cfg, "sae", ())
    check_sae_folders(saes)
    components = getattr(cfg, "components", ())  # (an erasure-curves config has none)
    wants = cfg.granularity == "feature" and not components or any("#f" in a for a in components)
    if wants and not saes:
        raise ValueError("feature components need their sparse autoencoder: pass --sae FOLDER (written by "
                         "python -m analyses.train_sae)")
    if saes and not wants:
        raise ValueError("--sae is used with --granularity feature (or feature --components SITE#fI): add it or "
                         "drop --sae")


def attach_saes(model, cfg) -> None:
    """Attach the sparse autoencoders of ``cfg.sae`` (folders) to ``model`` (:func:`interp.core.features.attach`)."""

    for folder in getattr(cfg, "sae", ()):
        attach(model, load_sae(folder))


def select_components(model, cfg: CompareConfig):
    """The components a comparison attributes: ``cfg.components`` by address, else the model's components of
    ``cfg.granularity`` filtered by ``cfg.families``, ``cfg.kinds`` and ``cfg.blocks`` (features: the latents of
    the ``cfg.sae`` dictionaries, which are attached to ``model`` first, filtered by ``cfg.blocks``).

    Args:
        model: the loaded model.
        cfg: the comparison's config (or any with those fields).

    Returns:
        A :class:`~interp.core.components.ComponentSet` (possibly empty: the caller refuses that).

    Raises:
        interp.core.components.UnknownComponentError: an address names no component (with the nearest valid ones).
    """
    attach_saes(model, cfg)  # (its features' addresses parse once attached)
    if getattr(cfg, "components", ()):  # named addresses (unknown ones fail with the nearest valid ones)
        return ComponentSet([model.space.parse(a) for a in cfg.components])
    if cfg.granularity in ("feature", "tokenkv", "tokenspan"):  # every latent of the attached dictionaries (every cross-attention
        # head at the concept's tokens), in the chosen UNet stages: the families and kinds are not used
        return model.components(cfg.granularity, **({"block": list(cfg.blocks)} if cfg.blocks else {}))
    filters = {"family": list(cfg.families) or None, "kind": list(cfg.kinds) or None,
               "block": list(cfg.blocks) or None}
    return model.components(cfg.granularity, **{k: v for k, v in filters.items() if v})


def check_concept_words(model: str, concepts) -> None:
    """On a model kind with its own concepts (the concept world, by name or folder), refuse unknown concept words
    before the model loads."""

    kind = model_kind(model)
    if kind is not None and hasattr(kind.provider, "check_concept_words"):
        kind.provider.check_concept_words(concepts)


def check_method_options(options, methods) -> dict:
    """``options`` (``{method: {option: value}}``) checked against each method's config, as plain sorted dicts with
    sequences as tuples; a method with no options given is left out. A registered method that is not run may have
    options: screen-then-verify screens with the mask-averaged gradient's. Every option is checked by the method's config
    on its own; those that depend on the component count (COAR's curve) are checked again before any method runs.

    Raises:
        ValueError: not a dict of dicts, an unknown method or option, or a bad value, naming the method's flag.
    """

    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise ValueError(f"options must be a dict of dicts, {{method: {{option: value}}}}, got {options!r}")
    out = {}
    for method in sorted(options):
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in sorted(options[method].items())}
        if not given:
            continue
        if method not in REGISTRY:
            raise ValueError(f"options are given for {method!r}, which is no registered method; registered methods "
                             f"are {sorted(REGISTRY)}")
        cls = get(method)  # (a method not run may still set another's options: screen screens with maskgrad's)
        names = [f.name for f in fields(cls.Config) if f.name != "seed"]
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ValueError(f"{method} has no option {unknown[0]!r}; its options are {names}")
        try:
            cls.Config(**given)
        except (TypeError, ValueError) as err:
            flags = {f.name: cls.flag(f) for f in cls.command_options()}
            shown = ", ".join(f"{flags.get(k, k)} {v}" for k, v in given.items())
            raise ValueError(f"{method} options ({shown}): {err}") from None
        out[method] = given
    return out


# -- field types, which the command line (analyses/_cli.py) is generated from -----------------------------------------
_SCALARS = {"str": str, "int": int, "float": float}

#: Fields every config may have, checked once here by name (one validation per field): what is wrong, or None.
COMMON_CHECKS = {
    # seeds are offset into 64-bit generators (ObjectiveConfig's bound)
    "seed": lambda v: None if 0 <= v <= 2**62 else f"must be between 0 and 2**62 ({2**62})",
    "guidance": lambda v: None if 0 <= v < 1e4 else "must be a scale >= 0 (1: unguided)",
    "n_boot": lambda v: None if v >= 100 else "must be >= 100 bootstrap resamples for a 95% interval",
}


def check_fields(cfg) -> None:
    """Check every field of a frozen config dataclass against its annotation (``str``, ``int``, ``float``, a
    ``tuple[T, ...]`` of them, each possibly ``| None``) and its ``choices``; sequences are stored as tuples."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        tp = field_type(f)
        if value is None and optional(f) or tp[0] == "dict":  # a dict field is checked by its config
            continue
        if tp[0] == "tuple":
            if isinstance(value, str) or not isinstance(value, typing.Iterable):
                raise ValueError(f"{f.name} must be a sequence of {tp[1].__name__} values, got {value!r}"
                                 + (f"; write ({value!r},)" if isinstance(value, str) else ""))
            value = tuple(value)
            for v in value:
                _check_type(f.name, v, tp[1])
            object.__setattr__(cfg, f.name, tuple(float(v) if tp[1] is float else v for v in value))
        else:
            _check_type(f.name, value, tp[1])
        check = COMMON_CHECKS.get(f.name)
        if check is not None and (getattr(cfg, f.name) is not None or not optional(f)):
            problem = check(getattr(cfg, f.name))
            if problem:
                flag = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
                named = flag if flag.lstrip("-").replace("-", "_") == f.name and "_" not in f.name else \
                    f"{flag} ({f.name})"
                raise ValueError(f"{named} {problem}, got {getattr(cfg, f.name)!r}")
        choices = f.metadata.get("choices")
        given = getattr(cfg, f.name)
        bad = [v for v in (given if tp[0] == "tuple" else (given,)) if v not in choices] if choices else []
        if bad:
            raise ValueError(f"{f.name} must be {'each ' if tp[0] == 'tuple' else ''}one of {list(choices)}, got "
                             f"{bad[0]!r}")


def _annotation(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace(" ", "")


def optional(f) -> bool:
    """Whether the field may be None (annotated ``... | None``)."""
    return _annotation(f).endswith("|None")


def field_type(f) -> tuple[str, type]:
    """("scalar", "tuple" or "dict", the element type) of a config field, from its annotation (``| None``
    aside)."""
    t = _annotation(f).removesuffix("|None")
    if t == "dict":
        return "dict", dict
    if t.startswith("tuple[") and t.endswith(",...]"):
        return "tuple", _SCALARS[t[len("tuple["):-len(",...]")]]
    return "scalar", _SCALARS[t]


def _check_type(name: str, v, tp: type) -> None:
    ok = (isinstance(v, str) if tp is str else
          isinstance(v, numbers.Integral) and not isinstance(v, bool) if tp is int else
          isinstance(v, numbers.Real) and not isinstance(v, bool))
    if not ok:
        raise ValueError(f"{name} must be {'a' if tp is not int else 'an'} {tp.__name__}, got {v!r} "
                         f"({type(v).__name__})")
