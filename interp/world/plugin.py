"""The concept world as a plugin of the core.

The core (models, components, objectives, methods, engine) knows nothing of the concept world: this module registers
it as a model kind (its shipped name, its folder layout and pipeline class), a concept provider (concept words,
their prompts and scenes, the renders an objective's evaluation set is built from, a word-level prompt check) and,
through the model's ``classifier``, the image judge of :mod:`interp.judges`. The core finds it through the
``interp.plugins`` entry point declared in ``pyproject.toml``, the way any other model family would register.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"


class ConceptWorldProvider:
    """What a loaded concept-world model provides beyond the pipeline (``DiffusionModel.world``)."""

    name = "concept-world"
    #: The concept world samples best unguided (measured: guidance 1.5 already costs 15 points of color fidelity).
    default_guidance = 1.0

    def check_prompts(self, prompts, tokenizer) -> list[str]:
        from .vocab import check_prompts

        return check_prompts(prompts, tokenizer.get_vocab())

    def concept(self, word: str, n: int, seed: int):
        from .concepts import world_concept

        return world_concept(word, n=n, seed=seed)

    def check_concept_words(self, words) -> None:
        from .vocab import attribute_of

        for w in words:
            attribute_of(w)  # a KeyError naming the word and listing the known ones

    def evaluation_images(self, concept, n: int, device, dtype) -> torch.Tensor | None:
        """Renders of the scenes behind a concept-world concept, in [-1, 1]; None for any other concept."""
        if concept.scenes_seed is None or concept.attribute is None:
            return None
        from .render import ConceptWorld

        world = ConceptWorld(n, seed=concept.scenes_seed, **{concept.attribute: concept.value})
        return torch.stack([world[i]["image"] for i in range(n)]).to(device, dtype) * 2 - 1


WORLD = ConceptWorldProvider()


def is_world_folder(path: Path) -> bool:
    """A trainer's checkpoint (``pipeline/`` + the classifier) or a saved ``ConceptWorldPipeline``."""
    if (path / "pipeline" / "model_index.json").exists() and (path / "classifier.safetensors").exists():
        return True
    index = path / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name") == "ConceptWorldPipeline"
        except (OSError, ValueError, AttributeError):
            return False  # a malformed index is reported, with its file named, when the model loads
    return False


def load_world_folder(path: Path, dtype) -> tuple[object, dict]:
    from .classifier import ConceptClassifier
    from .model import ConceptWorldPipeline

    if (path / "pipeline" / "model_index.json").exists():
        pipe = ConceptWorldPipeline.from_pretrained(path / "pipeline", dtype=dtype)
    else:
        pipe = ConceptWorldPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    extras = {}
    if (path / "classifier.safetensors").exists():
        extras["classifier"] = ConceptClassifier.load(path)
    return pipe, extras


def is_world_pipeline(pipe) -> bool:
    from .model import ConceptWorldPipeline

    return isinstance(pipe, ConceptWorldPipeline)


def register() -> None:
    """Entry point ``interp.plugins``: register the concept world with the core."""
    from ..models import ModelKind, register_kind

    register_kind(ModelKind(
        name="concept-world", shipped={"concept-world": ASSETS / "concept-world"}, matches_folder=is_world_folder,
        load_folder=load_world_folder, matches_pipeline=is_world_pipeline, provider=WORLD,
        missing_hint="reinstall the package or retrain it with `python -m analyses.train_world`",
    ))
