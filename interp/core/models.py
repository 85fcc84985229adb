"""Loading a text-to-image diffusion model into the suite, with its UNet and text encoder behind nnsight.

:func:`load_model` accepts a registered name (``"concept-world"``, the shipped default), a local folder of a
diffusers pipeline (Stable Diffusion 1.x/2.x or a registered kind's checkpoint), a hub id, or a pipeline object, and
returns a :class:`DiffusionModel`: the pipeline's parts, their nnsight wrappers, the component space of the
architecture, and what the model's kind provides (for the concept world: its concepts and the classifier that judges
generated images).

Model kinds beyond plain diffusers pipelines register themselves (:func:`register_kind`) from plugins found through
the ``interp.plugins`` entry point; the concept world is one (:mod:`interp.world.plugin`). This module never imports
them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from nnsight import NNsight

from interp.core.components import ComponentSpace
from interp.core.diffusion import latent_shape, tokenize
from interp.core.families import FAMILIES, Family, family_of
from interp.core.interventions import call_denoiser, encode_prompts
from interp.core.runtime import tune_cpu_allocator


@dataclass(frozen=True)
class ModelKind:
    """A family of models a plugin teaches the core: its shipped names, how to recognise and load its folders and
    pipelines, and the provider a loaded model carries as ``DiffusionModel.world`` (concepts, prompt checks,
    evaluation images, default guidance)."""

    name: str
    shipped: dict[str, Path]
    matches_folder: Callable[[Path], bool]
    #: ``folder, dtype -> (pipeline, extras)``; extras may hold ``classifier`` and ``default_guidance`` (the folder's
    #: own, over the provider's)
    load_folder: Callable[[Path, torch.dtype], tuple[object, dict]]
    matches_pipeline: Callable[[object], bool]
    provider: object
    missing_hint: str = ""


KINDS: dict[str, ModelKind] = {}
_PLUGINS_LOADED = False


def register_kind(kind: ModelKind) -> None:
    KINDS[kind.name] = kind


def load_plugins() -> None:
    """Import every ``interp.plugins`` entry point once (each registers its model kinds)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="interp.plugins"):
        ep.load()()


def shipped_models() -> dict[str, Path]:
    load_plugins()
    return {name: path for kind in KINDS.values() for name, path in kind.shipped.items()}


def model_kind(spec) -> ModelKind | None:
    """The registered kind a name or folder belongs to, without loading it (None: a plain diffusers pipeline)."""
    load_plugins()
    text = str(spec)
    for kind in KINDS.values():
        if text in kind.shipped:
            return kind
    folder = Path(text).expanduser()
    if folder.is_dir():
        for kind in KINDS.values():
            if kind.matches_folder(folder):
                return kind
    return None


class ModelLoadError(ValueError):
    """A model spec that names nothing loadable."""


@dataclass(eq=False)
class DiffusionModel:
    """A loaded model: pipeline parts, their nnsight wrappers and the component space.

    ``unet`` is the denoiser, a UNet or a diffusion transformer (also reachable as :attr:`denoiser`); its
    components' addresses start with the pipeline's own attribute name for it (``unet.`` or ``transformer.``).
    ``text_encoder``/``tokenizer`` are the first text encoder and its tokenizer; :attr:`text_encoders` holds every
    one (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) under the pipeline's attribute names, which are
    their components' address prefixes too. ``family`` (:mod:`interp.core.families`) says how prompts become the
    denoiser's conditioning and how the denoiser is called.
    """

    name: str
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    vae: nn.Module | None = None
    classifier: nn.Module | None = None
    #: What the model's registered kind provides (None for a plain diffusers pipeline): see :class:`ModelKind`.
    world: object | None = field(default=None, repr=False)
    pipeline: object = field(default=None, repr=False)
    #: Classifier-free guidance scale used when a caller gives none: the kind's (the concept world samples best
    #: unguided), else the pipeline family's default (Stable Diffusion's 7.5, SDXL's 5, FLUX's embedded 3.5, ...).
    default_guidance: float | None = None
    #: Where the weights were loaded from, loadable again by :func:`load_model` in another process (a Ray worker):
    #: the shipped name, the folder's absolute path or the hub id; None for a model built in memory.
    source: str | None = None
    #: How the pipeline conditions and calls its denoiser (None: Stable Diffusion 1.x/2.x's UNet and CLIP).
    family: Family | None = field(default=None, repr=False)
    #: Every text encoder and tokenizer by pipeline attribute (None: ``text_encoder`` and ``tokenizer`` alone).
    text_encoders: dict | None = field(default=None, repr=False)
    tokenizers: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.family = self.family or FAMILIES["sd"]
        if self.default_guidance is None:
            self.default_guidance = getattr(self.world, "default_guidance", self.family.default_guidance)
        self.text_encoders = dict(self.text_encoders or {"text_encoder": self.text_encoder})
        self.tokenizers = dict(self.tokenizers or {"text_encoder": self.tokenizer})
        #: The text encoders in the order the family runs them, with the token length each is run at (asked of the
        #: pipeline when there is one: PixArt-Σ's encodes more tokens than PixArt-α's).
        self.encoders = self.family.encoders(self.pipeline if self.pipeline is not None else _Parts(self.tokenizers))
        for m in (self.unet, *self.text_encoders.values(), self.vae, self.classifier):
            if m is not None:
                m.eval().requires_grad_(False)
        self.counters: Counter = Counter()  # UNet rows run (and with gradients): the methods' cost accounting
        self.nn = {part: NNsight(m) for part, m in self.modules().items()}
        self.nn_unet = self.nn[self.denoiser_part]
        self.nn_text = self.nn["text_encoder"] if "text_encoder" in self.nn else None
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.layout = None  # where the extras sit in a packed context (set by the first encoding)
        self.events, self.calls = _event_order(self.modules(), self)
        order = {p: i for (kind, p), i in self.events.items() if kind == "in"}
        self.space = ComponentSpace(self.modules(), order)

    @property
    def denoiser(self) -> nn.Module:
        """The denoiser (UNet or transformer)."""
        return self.unet

    @property
    def denoiser_part(self) -> str:
        """The denoiser's address prefix: the pipeline's attribute name for it (``unet`` or ``transformer``)."""
        return self.family.denoiser

    @property
    def text_parts(self) -> list[str]:
        """The text encoders' address prefixes, in the order they run."""
        return [e.part for e in self.encoders]

    def is_text(self, part: str) -> bool:
        """Whether an address prefix (a component's ``model``) names a text encoder."""
        return part in self.text_encoders

    @property
    def is_concept_world(self) -> bool:
        """A model of a registered kind that provides its own concepts (the concept world)."""
        return self.world is not None

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype, as diffusers reports it."""
        return self._placement()[0]

    @property
    def device(self) -> torch.device:
        """The denoiser's device, as diffusers reports it."""
        return self._placement()[1]

    def _placement(self) -> tuple[torch.dtype, torch.device]:
        """diffusers' ``unet.dtype`` and ``unet.device``, asked again only when the UNet's first parameter is moved or
        cast (which enabling offloading or layerwise casting also does): they walk every module looking for hooks,
        ~2 ms each on these UNets, and every pass reads them several times."""
        p = next(self.unet.parameters())
        key = (p.dtype, p.device)
        cached = self.__dict__.get("_placement_cache")
        if cached is None or cached[0] != key:
            cached = self._placement_cache = (key, (self.unet.dtype, self.unet.device))
        return cached[1]

    def modules(self) -> dict[str, nn.Module]:
        """Every part the suite intervenes on, by address prefix: the text encoders, then the denoiser."""
        return {**{e.part: self.text_encoders[e.part] for e in self.encoders}, self.denoiser_part: self.unet}

    def module(self, path: str) -> nn.Module:
        """The module at an address's path (``"transformer.transformer_blocks.3.ff.net.2"``).

        Raises:
            KeyError: the prefix names no part of this model.
            AttributeError: no such submodule.
        """
        prefix, _, rel = path.partition(".")
        return self.modules()[prefix].get_submodule(rel)

    def envoy(self, path: str):
        """The nnsight envoy of the module at ``path`` (for use inside a trace of its part's :attr:`nn` wrapper)."""
        prefix, _, rel = path.partition(".")
        root = self.nn[prefix]
        return root.get(rel) if rel else root

    def tokenize(self, prompts, device=None) -> torch.Tensor:
        """Token ids of ``prompts`` for every text encoder, side by side: ``(len(prompts), sum of lengths)``, each
        tokenizer's ids padded to the length its pipeline uses (Stable Diffusion 1.x/2.x: CLIP's 77)."""

        ids = [tokenize(self.tokenizers[e.part], prompts, max_length=e.length) for e in self.encoders]
        ids = ids[0] if len(ids) == 1 else torch.cat(ids, 1)
        return ids if device is None else ids.to(device)

    def split_ids(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed ids of :meth:`tokenize` per text encoder."""
        out, at = {}, 0
        for e in self.encoders:
            out[e.part] = ids[:, at : at + e.length]
            at += e.length
        return out

    def check_prompts(self, prompts):
        """Validate prompts: non-empty list; the model's kind may check more (the concept world: every word known)."""
        if self.world is not None:
            return self.world.check_prompts(prompts, self.tokenizer)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty: pass at least one prompt (use '' for the unconditional one)")
        return prompts

    def parameters(self):
        """All weights the suite might touch (for bitwise-unchanged checks)."""
        for prefix, m in self.modules().items():
            for n, p in m.named_parameters():
                yield f"{prefix}.{n}", p

    def state_fingerprint(self) -> dict[str, torch.Tensor]:
        """A copy of every weight, to compare bitwise after an analysis."""
        return {n: p.detach().clone() for n, p in self.parameters()}

    def components(self, granularity: str = "neuron", **filters):
        """The model's components of one granularity, in execution order.

        Args:
            granularity: ``"layer"``, ``"neuron"``, ``"head"`` or ``"weight"``.
            **filters: ``family``, ``kind``, ``block``, ``layer`` or ``model`` (an address prefix such as
                ``text_encoder_2``), each a name or a list of names; :meth:`ComponentSpace.families` lists the
                families this model has.

        Returns:
            A :class:`~interp.core.components.ComponentSet`.

        Raises:
            ValueError: an unknown granularity or filter value, or a selection that is empty.
        """
        return self.space.select(granularity, **filters)


class _Parts:
    """Attribute access to a model's tokenizers by pipeline name (``tokenizer_2``), for :meth:`Family.encoders`."""

    def __init__(self, tokenizers: dict):
        self._by_attr = {("tokenizer" if p == "text_encoder" else "tokenizer" + p[len("text_encoder"):]): t
                         for p, t in tokenizers.items()}
        for p in tokenizers:
            setattr(self, p, True)

    def __getattr__(self, name):
        if name.startswith("tokenizer"):
            return self.__dict__["_by_attr"].get(name)
        raise AttributeError(name)


def _event_order(models: dict[str, nn.Module], owner: DiffusionModel) -> tuple[dict[tuple[str, str], int], Counter]:
    """Execution order of every module's input and output events (its first call), and how often each module is
    called, from one forward pass with plain hooks (the empty prompt through every text encoder, then the
    denoiser). It also records the model's packed-context layout (:mod:`interp.core.families`).

    nnsight must be asked for modules in the order they run (``named_modules`` lists the UNet's up blocks before
    its mid block, but the mid block runs first). A module called more than once per pass (a resnet's shared
    ``nonlinearity``) can never be skipped with a cached output (:mod:`interp.core.prefix`).
    """

    events: dict[tuple[str, str], int] = {}
    calls: Counter = Counter()
    handles = []

    def pre(name):
        def hook(mod, args, kwargs):
            events.setdefault(("in", name), len(events))
        return hook

    def post(name):
        def hook(mod, args, out):
            events.setdefault(("out", name), len(events))
            calls[name] += 1
        return hook

    try:
        for prefix, root in models.items():
            for n, m in root.named_modules():
                name = f"{prefix}.{n}" if n else prefix
                handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
                handles.append(m.register_forward_hook(post(name)))
        with torch.no_grad():
            ctx = encode_prompts(owner, owner.tokenize([""], owner.device))
            x = torch.zeros(latent_shape(owner, 1), dtype=owner.unet.dtype, device=owner.device)
            call_denoiser(owner, x, torch.tensor([1], device=owner.device), ctx.to(owner.unet.dtype))
    finally:
        for h in handles:
            h.remove()
    return events, calls


def _looks_like_hub_id(text: str) -> bool:
    """``org/name`` whose first part is not a local folder (a missing ``runs/model`` is a missing path, not a hub
    id)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "/", "~")):
        return False
    return not Path(text.split("/")[0]).exists()


def broken_file(folder: Path) -> tuple[Path, str] | None:
    """The first JSON or safetensors file under ``folder`` that does not parse (truncated, random bytes), if any."""
    from safetensors import safe_open

    for f in sorted(folder.rglob("*")):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as st:
                    list(st.keys())
        except Exception as err:  # json, safetensors and OS errors alike mean this file is unusable
            return f, " ".join(str(err).split())[:200]
    return None


@contextmanager
def _naming_broken_files(folder: Path):
    """Turn a failure to load from ``folder`` into a ModelLoadError naming the broken file (libraries often don't)."""
    try:
        yield
    except Exception as err:
        found = broken_file(Path(folder))
        if found is None:
            raise
        raise ModelLoadError(f"{found[0]} is corrupt ({found[1]}): re-save the model with save_pretrained or copy "
                             f"that file again") from err


#: Parts of a diffusers pipeline the suite never runs (it samples with its own loop and judges with its own judges):
#: not loaded. Stable Diffusion 1.x's safety checker alone is a ~300 M-parameter CLIP vision tower, which every Ray
#: worker would otherwise load and move to its GPU; and a folder whose user deleted it still loads.
UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")


def _unused_parts(index: dict) -> dict:
    """``from_pretrained`` keyword arguments that skip the :data:`UNUSED_PARTS` a ``model_index.json`` lists."""
    kw = {part: None for part in UNUSED_PARTS if isinstance(index.get(part), list) and index[part][0] is not None}
    # a part saved as absent (SD3 without its T5: [null, null]) is passed as None, as the folder was made (diffusers
    # otherwise asks for it by name)
    kw.update({part: None for part, spec in index.items()
               if not part.startswith("_") and isinstance(spec, list) and spec[:1] == [None]})
    if kw and "requires_safety_checker" in index:
        kw["requires_safety_checker"] = False  # else diffusers warns that the checker is off, which is the point
    return kw


def _check_parts(folder: Path, index: dict) -> None:
    """Every part ``model_index.json`` lists and the suite loads has its subfolder (diffusers' own error names the
    pipeline folder and a weights file, not the missing part)."""
    for part, spec in index.items():
        if part.startswith("_") or part in UNUSED_PARTS or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / part).is_dir():
            raise ModelLoadError(f"{folder} lists a {part} ({spec[1]}) in model_index.json but has no {part}/ folder: "
                                 f"copy that folder from the original pipeline, or save the pipeline again with "
                                 f"save_pretrained")


def _weights_variant(folder: Path, index: dict) -> str | None:
    """The weights variant to load from a pipeline folder: None when every part the suite loads has default weight
    files (``model.safetensors``, ``diffusion_pytorch_model-00001-of-00002.safetensors``); else the one variant (e.g.
    ``fp16``, as in ``model.fp16.safetensors``) that every part without them has, so a folder downloaded with only
    its fp16 files loads (diffusers asks for ``variant=`` and otherwise names a missing file)."""
    missing: list[set[str]] = []
    for part, spec in index.items():
        if part.startswith("_") or part in UNUSED_PARTS or not isinstance(spec, list) or not (folder / part).is_dir():
            continue
        names = [re.sub(r"-\d{5}-of-\d{5}$", "", f.name[: -len(f.suffix)])
                 for f in (folder / part).iterdir() if f.suffix in (".safetensors", ".bin")]
        if names and not any("." not in n for n in names):  # weights, but none under the default name
            missing.append({n.split(".", 1)[1] for n in names})
    if not missing:
        return None
    common = set.intersection(*missing)
    if len(common) != 1:
        raise ModelLoadError(f"{folder} has no default weight files in some parts, and they share no single variant "
                             f"(found {sorted(set.union(*missing))}): save the pipeline again with save_pretrained")
    return common.pop()


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "float64": torch.float64}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> CUDA if available, else Apple's MPS, else the CPU; other names are checked to exist."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}: use one of {list(DEVICES)} (or 'cuda:N')")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this torch has no CUDA device; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A precision name (``float32``, ``bfloat16``, ``float16``, ``float64``) or torch dtype -> torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in PRECISIONS.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {list(PRECISIONS)}")
        return dtype
    if str(dtype) not in PRECISIONS:
        raise ValueError(f"unknown precision {dtype!r}; use one of {list(PRECISIONS)}")
    return PRECISIONS[str(dtype)]


def load_model(spec="concept-world", device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = torch.float32) -> DiffusionModel:
    """Load a model into the suite.

    ``spec``: ``"concept-world"``; a folder written by the concept-world trainer or by ``save_pretrained`` of a
    diffusers text-to-image pipeline of a known family (Stable Diffusion 1.x/2.x, SDXL, PixArt-α/Σ, SD3, FLUX.1:
    :mod:`interp.core.families`); a hub id (``"org/name"``: downloaded into the Hugging Face cache when online, read
    from it otherwise); or a pipeline object. ``device``: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``,
    ``"cuda[:N]"`` or ``"mps"``;
    ``dtype``: the precision of the forward passes (``float32``, ``bfloat16``, ``float16``, or ``float64`` for ground
    truth); objective values and statistics are accumulated in float32 whatever it is. On the CPU it tunes glibc's
    allocator for the process (:func:`interp.core.runtime.tune_cpu_allocator`; ``INTERP_TUNE_MALLOC=0`` opts out).
    Raises :class:`FileNotFoundError` for a missing folder and :class:`ModelLoadError` for a name that is neither
    shipped,
    nor a folder, nor a hub id.
    """
    from diffusers import DiffusionPipeline

    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if device.type == "cpu":  # passes reuse their activations' memory instead of faulting it in again
        tune_cpu_allocator()
    load_plugins()
    extras: dict = {}
    folder_kind = None  # the kind a folder was recognised as: it wins over matching the loaded pipeline

    if isinstance(spec, DiffusionPipeline):
        pipe, name, source = spec, type(spec).__name__, None
    elif isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        shipped = next((k for k in KINDS.values() if text in k.shipped), None)
        if shipped is not None:
            folder = shipped.shipped[text]
            if not shipped.matches_folder(folder):
                raise FileNotFoundError(f"the shipped {text!r} checkpoint is missing from {folder}; "
                                        f"{shipped.missing_hint or 'reinstall the package'}")
        else:
            folder = Path(text).expanduser()
        name = text
        source = text if shipped is not None else str(folder.resolve())
        if folder.exists():
            kind = next((k for k in KINDS.values() if k.matches_folder(folder)), None)
            if kind is not None:
                with _naming_broken_files(folder):
                    pipe, extras = kind.load_folder(folder, dtype)
                folder_kind = kind
            elif (folder / "model_index.json").exists():
                with _naming_broken_files(folder):
                    index = json.loads((folder / "model_index.json").read_text())  # a malformed index, named
                    _check_parts(folder, index)
                    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                             variant=_weights_variant(folder, index),
                                                             **_unused_parts(index))
            else:
                raise ModelLoadError(
                    f"{folder} is not a diffusers pipeline folder (no model_index.json): point at the folder that "
                    f"`save_pretrained` wrote"
                )
        elif _looks_like_hub_id(text):
            try:
                pipe = DiffusionPipeline.from_pretrained(text, dtype=dtype,
                                                         **_unused_parts(DiffusionPipeline.load_config(text)))
            except Exception as err:  # the hub is out of reach or the id is wrong: say both fixes
                reason = " ".join(str(err).split())[:300]
                raise ModelLoadError(
                    f"no folder {text!r} exists under {Path.cwd()}, and as a hub id it could not be loaded "
                    f"({type(err).__name__}: {reason}); pass an existing save_pretrained folder, or download the "
                    f"pipeline where there is network access"
                ) from err
            source = text
        elif any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~")):
            raise FileNotFoundError(f"model folder {text!r} does not exist (looked under {Path.cwd()}); pass the folder "
                                    f"that save_pretrained wrote")
        else:
            raise ModelLoadError(
                f"unknown model {text!r}: use one of {sorted(shipped_models())}, a folder written by save_pretrained, "
                f"or a hub id like 'org/name'"
            )
    else:
        raise TypeError(f"load_model takes a name, a folder or a DiffusionPipeline, not {type(spec).__name__}")

    try:
        family = family_of(pipe)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    encoders = family.encoders(pipe)
    for part in (family.denoiser, "scheduler", *[e.part for e in encoders], *[e.tokenizer for e in encoders]):
        if getattr(pipe, part, None) is None:
            raise ModelLoadError(f"the {type(pipe).__name__} has no {part}: the suite needs every part a "
                                 f"{family.label} pipeline conditions its {family.denoiser} with; load the full "
                                 f"pipeline (save_pretrained writes every part)")
    # A kind whose pipeline is a plain diffusers class (the latent world's StableDiffusionPipeline) is known only by
    # its folder; a user's SD pipeline matches no kind and stays a plain model.
    kind = folder_kind or next((k for k in KINDS.values() if k.matches_pipeline(pipe)), None)
    classifier = extras.get("classifier")
    denoiser = getattr(pipe, family.denoiser)
    if denoiser.dtype != dtype or denoiser.device != torch.device(device):
        pipe.to(device=device, dtype=dtype)
    if classifier is not None:
        classifier.to(device=device, dtype=dtype)
    return DiffusionModel(
        name=name,
        unet=denoiser,
        text_encoder=getattr(pipe, encoders[0].part),
        tokenizer=getattr(pipe, encoders[0].tokenizer),
        scheduler=pipe.scheduler,
        vae=getattr(pipe, "vae", None),
        classifier=classifier,
        world=None if kind is None else kind.provider,
        pipeline=pipe,
        source=source,
        default_guidance=extras.get("default_guidance"),
        family=family,
        text_encoders={e.part: getattr(pipe, e.part) for e in encoders},
        tokenizers={e.part: getattr(pipe, e.tokenizer) for e in encoders},
    )


FULL_HASH_LIMIT = 100_000_000


def model_fingerprint(model) -> str:
    """The identity of what a model computes by default, for cache keys: a hash of every weight's bytes and of the
    guidance scale it samples at when a caller names none (generation-based results depend on it).

    Models above :data:`FULL_HASH_LIMIT` parameters (Stable Diffusion) hash every 101st value of each parameter
    plus its shape instead, which takes a fraction of a second; an edit of a few scalars of such a model can go
    unnoticed, so caches of edited large models should use their own store.
    """
    params = list(model.parameters())
    total = sum(p.numel() for _, p in params)
    h = hashlib.sha256(model.name.encode())
    h.update(f"guidance={model.default_guidance}".encode())
    for name, p in params:
        flat = p.detach().reshape(-1).cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        # a strided 1-element slice counts as contiguous but cannot be viewed as bytes: copy to stride 1
        h.update((flat if total <= FULL_HASH_LIMIT else flat[::101]).clone(memory_format=torch.contiguous_format)
                 .view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def module_digest(modules) -> str:
    """A hash of every parameter (name, shape, dtype, bytes) of ``modules``, for cache keys."""
    h = hashlib.sha256()
    for k, mod in enumerate(modules):
        for name, p in mod.named_parameters():
            h.update(f"{k}.{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
