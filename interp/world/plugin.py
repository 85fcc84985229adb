"""The concept world as a plugin of the core.

The core (models, components, objectives, methods, engine) knows nothing of the concept world: this module registers
it as a model kind (its shipped name, its folder layout and pipeline class), a concept provider (concept words,
their prompts and scenes, the renders an objective's evaluation set is built from, a word-level prompt check) and,
through the model's ``classifier``, the image judge of :mod:`interp.core.judges`. The core finds it through the
``interp.plugins`` entry point declared in ``pyproject.toml``, the way any other model family would register.

It registers three kinds: ``concept-world`` (the pixel-space ``ConceptWorldPipeline``), ``concept-world-latent``
(:mod:`.latent`), a plain ``StableDiffusionPipeline`` folder that is loaded exactly as a user's SD folder is, and
``concept-world-dit`` (:mod:`.dit`), a plain ``StableDiffusion3Pipeline`` folder. Only their folders
(a ``world.json`` marker next to ``pipeline/``) tell the last two apart, and only the provider (the same concepts,
rendered at 32x32) and the classifier judge are added.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from interp.core.judges import JudgeKind, register_judge_kind
from interp.core.models import ModelKind, register_kind
from interp.world.classifier import ConceptClassifier
from interp.world.concepts import world_concept
from interp.world.judge import ClassifierJudge
from interp.world.model import ConceptWorldPipeline
from interp.world.render import ConceptWorld, random_caption, random_scene, render
from interp.world.vocab import ATTRIBUTES, attribute_of, check_prompts

ASSETS = Path(__file__).parent / "assets"


class ConceptWorldProvider:
    """What a loaded concept-world model provides beyond the pipeline (``DiffusionModel.world``)."""

    #: The concept world samples best unguided (measured: guidance 1.5 already costs 15 points of color fidelity).
    default_guidance = 1.0

    def __init__(self, name: str = "concept-world", image_size: int = 16):
        self.name, self.image_size = name, image_size

    def check_prompts(self, prompts, tokenizer) -> list[str]:
        return check_prompts(prompts, tokenizer.get_vocab())

    def concept(self, word: str, n: int, seed: int):
        return world_concept(word, n=n, seed=seed)

    def check_concept_words(self, words) -> None:
        for w in words:
            attribute_of(w)  # a KeyError naming the word and listing the known ones

    def classifier_judge(self, classifier):
        """The judge a model of this world carries: its concept classifier (:class:`interp.world.judge.ClassifierJudge`)."""

        return ClassifierJudge(classifier)

    @property
    def attributes(self) -> dict:
        """Attribute -> its values: what a judge of this world chooses among."""

        return dict(ATTRIBUTES)

    def heldout_prompts(self, concept: str, n_target: int, n_alone: int, n_other: int, seed: int):
        """The concept world's held-out sets of a concept-world value
        (:func:`interp.studies.editing.evaluate.heldout_set`): ``(attribute, rows, scenes)``, one row (set, prompt, the
        value asked for per attribute) and one scene per
        image: ``target`` (scenes with the value, full captions), ``alone`` (the value named alone, in the caption
        templates) and ``other`` (scenes without it), each from its own stream of ``seed``."""
        import numpy as np

        from interp.world.vocab import ATTRIBUTES, TEMPLATES, attribute_of, caption

        attribute = attribute_of(concept)  # a clear error for a word that is no concept-world value
        rows, scenes = [], []
        target = ConceptWorld(n_target, seed=seed, **{attribute: concept})
        for i in range(n_target):
            rng = np.random.default_rng([seed, 1, i])
            s = target.scene(i)
            rows.append({"set": "target", "prompt": random_caption(rng, s), **s.attributes()})
            scenes.append(s)
        for i in range(n_alone):
            s = random_scene(np.random.default_rng([seed, 2, i]), **{attribute: concept})
            named = {**dict.fromkeys(ATTRIBUTES), attribute: concept}
            rows.append({"set": "alone", "prompt": caption(named, i % len(TEMPLATES)), **named})
            scenes.append(s)
        for i in range(n_other):
            rng = np.random.default_rng([seed, 3, i])
            s = random_scene(rng)
            while getattr(s, attribute) == concept:  # the specificity set never asks for the target
                s = random_scene(rng)
            rows.append({"set": "other", "prompt": random_caption(rng, s), **s.attributes()})
            scenes.append(s)
        return attribute, rows, tuple(scenes)

    def references(self, concept: str) -> list[str]:
        """The other values of the concept's attribute: what a specific edit of it must leave alone."""
        from interp.world.vocab import ATTRIBUTES, attribute_of

        return [v for v in ATTRIBUTES[attribute_of(concept)] if v != concept]

    def swapped_captions(self, concept: str, anchor: str | None, n_per_template: int, seed: int):
        """(concept caption, anchor caption) pairs that differ only in the concept word: every caption template,
        ``n_per_template`` scenes with the concept's value (the other attributes from ``seed + template``) plus one
        caption naming the concept alone; the anchor caption leaves the word out (``None``) or puts ``anchor``
        (a value of the same attribute) in its place."""
        from interp.world.render import ConceptWorld
        from interp.world.vocab import ATTRIBUTES, TEMPLATES, attribute_of, caption

        attribute = attribute_of(concept)
        if anchor is not None and attribute_of(anchor) != attribute:
            raise ValueError(f"anchor {anchor!r} is not a {attribute} like {concept!r}")
        pairs = []
        for t in range(len(TEMPLATES)):
            world = ConceptWorld(n_per_template, seed=seed + t, **{attribute: concept})
            alone = {**dict.fromkeys(ATTRIBUTES), attribute: concept}  # the concept named without other words
            scenes = [world.scene(i).attributes() for i in range(n_per_template)] + [alone]
            for attrs in scenes:
                pairs.append((caption(attrs, t), caption({**attrs, attribute: anchor}, t)))
        return pairs

    def captions_without(self, concept: str, n: int, seed: int) -> list[str]:
        """Captions of ``n`` random scenes without the concept's value (an edit's preserved prompts)."""
        import numpy as np

        from interp.world.render import random_caption, random_scene

        attribute = attribute_of(concept)
        out = []
        for i in range(n):
            rng = np.random.default_rng([seed, 77, i])
            scene = random_scene(rng)
            while getattr(scene, attribute) == concept:
                scene = random_scene(rng)
            out.append(random_caption(rng, scene))
        return out

    def render(self, scenes, size: int | None = None) -> torch.Tensor:
        """Ground-truth renders of ``scenes`` (``(N, 3, size, size)`` in [0, 1]; default size: the model's)."""
        import numpy as np

        return torch.from_numpy(np.stack([render(s, size or self.image_size) for s in scenes]))

    def evaluation_images(self, concept, n: int, device, dtype) -> torch.Tensor | None:
        """Renders of the scenes behind a concept-world concept, in [-1, 1]; None for any other concept."""
        if concept.scenes_seed is None or concept.attribute is None:
            return None
        from interp.world.render import ConceptWorld

        world = ConceptWorld(n, seed=concept.scenes_seed, size=self.image_size, **{concept.attribute: concept.value})
        return torch.stack([world[i]["image"] for i in range(n)]).to(device, dtype) * 2 - 1


WORLD = ConceptWorldProvider()


LATENT_WORLD = ConceptWorldProvider(name="concept-world-latent", image_size=32)
LATENT_KIND = "concept-world-latent"
DIT_WORLD = ConceptWorldProvider(name="concept-world-dit", image_size=32)
DIT_KIND = "concept-world-dit"


def _pipeline_class(index: Path) -> str | None:
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_world_folder(path: Path) -> bool:
    """A trainer's checkpoint (``pipeline/`` + the classifier) or a saved ``ConceptWorldPipeline``."""
    if ((path / "pipeline" / "model_index.json").exists() and (path / "classifier.safetensors").exists()
            and not is_latent_world_folder(path)):
        return True
    index = path / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name") == "ConceptWorldPipeline"
        except (OSError, ValueError, AttributeError):
            return False  # a malformed index is reported, with its file named, when the model loads
    return False


def load_world_folder(path: Path, dtype) -> tuple[object, dict]:
    if (path / "pipeline" / "model_index.json").exists():
        pipe = ConceptWorldPipeline.from_pretrained(path / "pipeline", dtype=dtype)
    else:
        pipe = ConceptWorldPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    extras = {}
    if (path / "classifier.safetensors").exists():
        extras["classifier"] = ConceptClassifier.load(path)
    return pipe, extras


def _marked(path: Path, kind: str) -> bool:
    marker = path / "world.json"
    if not (marker.is_file() and (path / "pipeline" / "model_index.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def is_latent_world_folder(path: Path) -> bool:
    """A ``concept-world-latent`` checkpoint: ``pipeline/`` (a StableDiffusionPipeline) and ``world.json`` naming
    the kind. A user's SD folder (``model_index.json`` at its top, no marker) never matches."""
    return _marked(path, LATENT_KIND)


def is_dit_world_folder(path: Path) -> bool:
    """A ``concept-world-dit`` checkpoint: ``pipeline/`` (a StableDiffusion3Pipeline) and ``world.json`` naming
    the kind."""
    return _marked(path, DIT_KIND)


def load_latent_world_folder(path: Path, dtype) -> tuple[object, dict]:
    """The pipeline exactly as a plain SD folder loads (:func:`interp.core.models.load_model`), plus the classifier:
    the folder's own if it ships one, else the pixel world's 16-px classifier (measured 100% on resized 32-px
    renders, see the README); and the guidance scale the model samples at, when ``world.json`` names one (the
    shipped model is sampled at guidance 2, as SD is sampled guided)."""
    from diffusers import DiffusionPipeline

    # an SD3 folder saved without its T5 loads as diffusers documents it (text_encoder_3=None, tokenizer_3=None)
    index = json.loads((path / "pipeline" / "model_index.json").read_text())
    absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if k in index and index[k][0] is None}
    pipe = DiffusionPipeline.from_pretrained(path / "pipeline", dtype=dtype, local_files_only=True, **absent)
    own = (path / "classifier.safetensors").exists()
    extras = {"classifier": ConceptClassifier.load(path if own else ASSETS / "concept-world")}
    guidance = json.loads((path / "world.json").read_text()).get("default_guidance")
    if guidance is not None:
        extras["default_guidance"] = float(guidance)
    return pipe, extras


def is_world_pipeline(pipe) -> bool:
    return isinstance(pipe, ConceptWorldPipeline)


def register() -> None:
    """Entry point ``interp.plugins``: register the concept world with the core."""

    register_kind(ModelKind(
        name="concept-world", shipped={"concept-world": ASSETS / "concept-world"}, matches_folder=is_world_folder,
        load_folder=load_world_folder, matches_pipeline=is_world_pipeline, provider=WORLD,
        missing_hint="reinstall the package or retrain it with `python -m analyses.train_world`",
    ))
    # A StableDiffusionPipeline object cannot be told from a user's: only the folder identifies the latent world.
    register_kind(ModelKind(
        name=LATENT_KIND, shipped={LATENT_KIND: ASSETS / LATENT_KIND}, matches_folder=is_latent_world_folder,
        load_folder=load_latent_world_folder, matches_pipeline=lambda pipe: False, provider=LATENT_WORLD,
        missing_hint="reinstall the package or retrain it with `python -m analyses.train_world --model "
                     "concept-world-latent`",
    ))
    register_kind(ModelKind(
        name=DIT_KIND, shipped={DIT_KIND: ASSETS / DIT_KIND}, matches_folder=is_dit_world_folder,
        load_folder=load_latent_world_folder, matches_pipeline=lambda pipe: False, provider=DIT_WORLD,
        missing_hint="reinstall the package or retrain it with `python -m analyses.train_world --model "
                     "concept-world-dit`",
    ))
    # Its judges: the concept classifier (a folder with classifier.safetensors; "classifier" without a model means
    # the pixel world's) and, by name, the small CLIP trained on its renders (a plain CLIPModel folder).

    register_judge_kind(JudgeKind(
        name="concept-world", shipped={"concept-world-clip": ASSETS / "concept-world-clip"},
        matches_folder=lambda folder: (folder / "classifier.safetensors").exists(), load_folder=_load_classifier_judge,
        default_classifier=ASSETS / "concept-world",
    ))


def _load_classifier_judge(folder: Path, name: str):
    return ClassifierJudge(ConceptClassifier.load(folder), name=name)
