"""Image judges: what says whether a generated image shows a concept.

One interface (:class:`Judge`) behind everything in the suite that looks at images: the ``classifier`` objective,
causal tracing's end-to-end score and edit evaluation. Images are ``(N, 3, H, W)`` in ``[0, 1]`` of any size (the
judge resizes them); every method is differentiable where it can be (the classifier objective takes gradients
through the judge).

``probability(images, concept)``
    ``(N,)``: how sure the judge is that each image shows the concept.
``predict(images, {attribute: [values]})``
    per attribute, ``(N, n_values)`` class probabilities over the given values (edit evaluation's rates).
``features(images)``
    an image embedding, for the Frechet distance of edit evaluation.

Judges:

:class:`CLIPJudge`
    zero-shot scoring with any transformers ``CLIPModel`` (Radford et al., ICML 2021), the judge Stable Diffusion
    erasure papers use: each class is the mean of the normalized text embeddings of a few prompt templates
    ("a photo of {value}", ...; CLIP's prompt ensembling), and the probabilities are the softmax of the model's
    logit scale times the cosine similarity between image and class embeddings. ``probability`` weighs the concept
    against its alternatives (:attr:`interp.core.concepts.Concept.alternatives`: the other values of a concept-world
    attribute, or what the user gives for a text concept); without any it uses :data:`GENERIC_ALTERNATIVES`, a
    weak fallback (the number then says "more like the concept than like something else", nothing finer).
    A folder may carry a ``judge.json`` with its own templates per attribute (the shipped concept-world CLIP does:
    its vocabulary only knows the world's words) and a ``preprocessor_config.json`` with the image mean and std.

judges of a registered kind (:class:`JudgeKind`, :func:`register_judge_kind`)
    a plugin's own judges: the concept world registers its concept classifier (``interp.world.judge``), the judge
    its models carry, and its shipped small CLIP by name.

:func:`load_judge` turns a spec into a judge: ``"classifier"`` (the model's own: a concept-world model's
classifier), a name a judge kind ships (``"concept-world-clip"``), a folder, or a hub id. This module never imports
a plugin.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interp.core.models import load_plugins


def _no_folder(folder: Path) -> bool:
    """A judge kind that loads no folders (it only ships judges by name)."""
    return False


@dataclass(frozen=True)
class JudgeKind:
    """A family of judges a plugin teaches the core: the judges it ships by name, how to recognise and load its
    folders, and the folder ``load_judge("classifier")`` means without a model."""

    name: str
    shipped: dict[str, Path] = field(default_factory=dict)
    matches_folder: Callable[[Path], bool] = _no_folder
    #: ``folder, name -> Judge`` (on the CPU; load_judge moves it)
    load_folder: Callable[[Path, str], "Judge"] | None = None
    default_classifier: Path | None = None


JUDGE_KINDS: dict[str, JudgeKind] = {}


def register_judge_kind(kind: JudgeKind) -> None:
    """Teach :func:`load_judge` a kind of judge (plugins call this from their ``interp.plugins`` entry point)."""
    JUDGE_KINDS[kind.name] = kind


def shipped_judges() -> dict[str, Path]:
    """Every judge a registered kind ships, by name (``"concept-world-clip"``) -> its folder."""

    load_plugins()
    return {name: path for kind in JUDGE_KINDS.values() for name, path in kind.shipped.items()}

#: Zero-shot templates of a CLIP folder without a ``judge.json``.
DEFAULT_TEMPLATES = ("a photo of {}", "a picture of {}", "an image of {}", "a rendering of {}")
#: What a concept without alternatives is weighed against by a CLIP judge (a weak fallback; see the docstring).
GENERIC_ALTERNATIVES = ("something else",)
#: CLIP's own image normalization (used when a folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class JudgeLoadError(ValueError):
    """A judge spec that names nothing loadable."""


def concept_target(concept) -> tuple[str, str | None, tuple[str, ...]]:
    """``(value, attribute, alternatives)`` of a :class:`~interp.core.concepts.Concept` or a plain word."""
    if isinstance(concept, str):
        return concept, None, ()
    value = concept.value or concept.name
    return value, concept.attribute, tuple(concept.alternatives)


class Judge(ABC):
    """An image judge: how sure it is that images show a concept (see the module docstring).

    Subclasses implement :meth:`probability`, :meth:`predict`, :meth:`features` and :meth:`to`, and may refuse a
    concept early in :meth:`check`. Images are ``(N, 3, H, W)`` in ``[0, 1]`` of any size. Pass an instance wherever a
    judge is taken, or load one by name with :func:`load_judge`.
    """

    name: str = "judge"

    @abstractmethod
    def probability(self, images: torch.Tensor, concept) -> torch.Tensor:
        """``(N,)`` probability that each image shows ``concept`` (a Concept or a word); differentiable."""

    @abstractmethod
    def predict(self, images: torch.Tensor, attribute_values: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        """Per attribute, ``(N, n_values)`` probabilities over the given values (rows sum to 1)."""

    @abstractmethod
    def features(self, images: torch.Tensor) -> np.ndarray:
        """``(N, D)`` float64 image features (for Frechet distances between image sets)."""

    def weights(self) -> list[torch.nn.Module]:
        """The modules whose weights decide the verdicts (their fingerprint keys cached results)."""
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    @abstractmethod
    def to(self, device) -> "Judge":
        """Move the judge to ``device``; returns itself."""

    def check(self, concept) -> None:
        """Raise a clear ``ValueError`` if the judge cannot score ``concept`` (cheap; no image needed)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"a judge takes images of shape (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    down = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=down)


class CLIPJudge(Judge):
    """Zero-shot judge with a transformers ``CLIPModel`` (see the module docstring)."""

    def __init__(self, model, tokenizer, name: str = "clip", templates: Mapping[str, Sequence[str]] | None = None,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.name = tokenizer, name
        self.templates = {k: tuple(v) for k, v in (templates or {"default": DEFAULT_TEMPLATES}).items()}
        if "default" not in self.templates:
            self.templates["default"] = DEFAULT_TEMPLATES
        for k, ts in self.templates.items():
            if not ts or any("{}" not in t for t in ts):
                raise ValueError(f"templates for {k!r} must be non-empty strings with a '{{}}' slot, got {ts}")
        size = model.config.vision_config.image_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)
        self._classes: dict[tuple[str, str | None], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, name: str | None = None, device=None) -> "CLIPJudge":
        """A CLIP judge from a folder written by ``save_pretrained`` (model + tokenizer) or a hub id."""
        from transformers import AutoTokenizer, CLIPModel

        local = Path(spec).exists()
        # HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import): no network retries offline
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        kw = {"local_files_only": True} if local or offline else {}
        model = CLIPModel.from_pretrained(str(spec), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(spec), **kw)
        templates, mean, std = None, CLIP_MEAN, CLIP_STD
        if local:
            folder = Path(spec)
            if (folder / "judge.json").exists():
                templates = json.loads((folder / "judge.json").read_text()).get("templates")
            if (folder / "preprocessor_config.json").exists():
                pre = json.loads((folder / "preprocessor_config.json").read_text())
                mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        else:
            from transformers import CLIPImageProcessor

            try:
                pre = CLIPImageProcessor.from_pretrained(str(spec))
                mean, std = pre.image_mean, pre.image_std
            except OSError:
                pass
        judge = cls(model, tokenizer, name or str(spec), templates, mean, std)
        return judge.to(device) if device is not None else judge

    # -- text side ---------------------------------------------------------------------------------------------
    def prompts(self, value: str, attribute: str | None = None) -> list[str]:
        """The prompts of class ``value``: the templates of ``attribute`` (or the default ones) filled in."""
        return [t.format(value) for t in self.templates.get(attribute or "default", self.templates["default"])]

    def _check_vocabulary(self, prompts: list[str]) -> None:
        """Word-level tokenizers without an unknown token (the concept world's) refuse unknown words by name."""
        backend = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        if getattr(self.tokenizer, "unk_token", None) is not None or type(backend).__name__ != "WordLevel":
            return
        vocab = self.tokenizer.get_vocab()
        # words as a word-level tokenizer splits them: lower case, commas and periods as spaces
        unknown = sorted({w for p in prompts for w in re.sub(r"[,.]", " ", p.lower()).split() if w not in vocab})
        if unknown:
            raise ValueError(
                f"the judge {self.name!r} does not know the word(s) {unknown}: its vocabulary is "
                f"{sorted(w for w in vocab if not w.startswith('<'))}; give concepts and alternatives in those words"
            )

    def class_embedding(self, value: str, attribute: str | None = None) -> torch.Tensor:
        """Unit-norm mean of the unit-norm text embeddings of ``value``'s prompts (cached)."""
        key = (value, attribute)
        if key not in self._classes:
            prompts = self.prompts(value, attribute)
            self._check_vocabulary(prompts)
            enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            dev = self.model.logit_scale.device
            with torch.no_grad():
                out = self.model.get_text_features(input_ids=enc.input_ids.to(dev),
                                                   attention_mask=enc.attention_mask.to(dev))
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            emb = F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1)
            self._classes[key] = emb
        return self._classes[key]

    # -- image side --------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` normalized CLIP image embeddings of ``images`` (resized and normalized as CLIP expects)."""
        dev = self.model.logit_scale.device
        x = _resize(images, self.size).to(dev, torch.float32)
        x = (x - self.mean.to(dev)) / self.std.to(dev)
        out = self.model.get_image_features(pixel_values=x)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(emb, dim=-1)

    def logits(self, images: torch.Tensor, classes: Sequence[tuple[str, str | None]]) -> torch.Tensor:
        """``(N, K)``: logit scale x cosine similarity of each image with each (value, attribute) class."""
        text = torch.stack([self.class_embedding(v, a) for v, a in classes])
        return self.model.logit_scale.exp() * self.image_embeddings(images) @ text.T

    def _classes_of(self, concept) -> list[tuple[str, str | None]]:
        value, attribute, alternatives = concept_target(concept)
        alternatives = alternatives or GENERIC_ALTERNATIVES
        if value in alternatives:
            raise ValueError(f"the concept {value!r} is among its own alternatives {alternatives}")
        return [(value, attribute)] + [(v, attribute) for v in alternatives]

    def check(self, concept):
        """Refuse a concept whose prompts the tokenizer cannot read (a word-level vocabulary's unknown words).

        Raises:
            ValueError: naming the words the vocabulary lacks.
        """
        for v, a in self._classes_of(concept):
            self.class_embedding(v, a)  # refuses words a word-level vocabulary does not know

    def probability(self, images, concept):
        """``(N,)`` softmax probability of ``concept`` against its alternatives on each image; differentiable."""
        p = self.logits(images, self._classes_of(concept)).softmax(-1)[:, 0]
        return p.to(images.device, images.dtype if images.is_floating_point() else torch.float32)

    def predict(self, images, attribute_values):
        """Per attribute, ``(N, n_values)`` zero-shot probabilities over the given values."""
        out = {}
        with torch.no_grad():
            for a, values in attribute_values.items():
                if len(values) < 2:
                    raise ValueError(f"attribute {a!r} needs at least two values to choose from, got {values}")
                out[a] = self.logits(images, [(v, a) for v in values]).softmax(-1).cpu()
        return out

    def features(self, images):
        """``(N, D)`` float64 CLIP image embeddings (for Fréchet distances)."""
        with torch.no_grad():
            return self.image_embeddings(images).double().cpu().numpy()

    def to(self, device):
        """Move the CLIP model to ``device``; returns this judge."""
        self.model.to(device)
        return self


_CACHE: dict[tuple[str, str], Judge] = {}


def load_judge(spec: str | os.PathLike | Judge = "classifier", device=None, model=None) -> Judge:
    """A judge from a spec.

    Args:
        spec: a :class:`Judge` (returned as is, moved to ``device`` if given); ``"classifier"``: ``model``'s concept
            classifier (without a model, the shipped concept world's); ``"concept-world-clip"``: the shipped small CLIP;
            a folder (a ``CLIPModel`` saved with ``save_pretrained``, or a concept-world folder with
            ``classifier.safetensors``); or a hub id of a CLIP model (downloaded when online).
        device: where it runs; default the model's, else the CPU.
        model: the model whose classifier ``"classifier"`` means.

    Returns:
        The judge. Loaded CLIP judges are cached per spec and device.

    Raises:
        ValueError: ``"classifier"`` for a model without one (the message names the CLIP judges to use instead).
        JudgeLoadError: a folder that holds no judge, or a hub id that cannot be loaded.
        FileNotFoundError: a shipped judge missing from the installation.
    """
    if isinstance(spec, Judge):
        return spec.to(device) if device is not None else spec
    device = torch.device(device) if device is not None else (model.device if model is not None else torch.device("cpu"))
    shipped = shipped_judges()  # (loads the plugins, which register their judge kinds)
    text = str(spec)
    if text == "classifier":
        if model is not None:
            make = getattr(getattr(model, "world", None), "classifier_judge", None)
            if getattr(model, "classifier", None) is None or make is None:
                raise ValueError(
                    f"model {model.name!r} has no concept classifier to judge images with: pass a CLIP judge "
                    f"(judge='concept-world-clip', a CLIPModel folder or a hub id; --judge on the command line)"
                )
            return make(model.classifier)
        default = next((k.default_classifier for k in JUDGE_KINDS.values() if k.default_classifier), None)
        if default is None:
            raise JudgeLoadError("'classifier' names a model's own classifier, and no model was given: pass model=, "
                                 "or a CLIP judge")
        text = str(default)
    folder = shipped.get(text, Path(text).expanduser())
    key = (str(folder), str(device))
    if key in _CACHE:
        return _CACHE[key]
    if folder.exists():
        kind = next((k for k in JUDGE_KINDS.values() if k.load_folder is not None and k.matches_folder(folder)), None)
        if kind is not None:
            judge: Judge = kind.load_folder(folder, text).to(device)
        elif (folder / "config.json").exists():
            judge = CLIPJudge.from_pretrained(folder, name=text, device=device)
        else:
            raise JudgeLoadError(f"{folder} holds no judge: point at a CLIPModel folder written by save_pretrained "
                                 f"(config.json) or a concept-world folder with classifier.safetensors")
    elif text in shipped:
        raise FileNotFoundError(f"the shipped judge {text!r} is missing from {folder}; rebuild it with "
                                f"`python -m analyses.train_clip`")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/", "~")):
        try:
            judge = CLIPJudge.from_pretrained(text, device=device)
        except Exception as err:  # the hub is out of reach or the id is wrong
            reason = " ".join(str(err).split())[:300]
            raise JudgeLoadError(
                f"could not load judge hub id {text!r} ({type(err).__name__}: {reason}); without network access, "
                f"download the CLIP model elsewhere and pass its folder"
            ) from err
    elif any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~")):
        raise FileNotFoundError(f"judge folder {text!r} does not exist")
    else:
        raise JudgeLoadError(f"unknown judge {text!r}: use 'classifier', {', '.join(map(repr, shipped))}, "
                             f"a CLIPModel folder or a hub id like 'openai/clip-vit-base-patch32'")
    _CACHE[key] = judge
    return judge
