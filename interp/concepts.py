"""Concepts: what a method localizes. A concept is a small spec of target prompts, anchor prompts and, in the
concept world, the attribute it refers to.

In the concept world a concept is one attribute value ("red", "circle", "striped", "white"); its target prompts are
full captions of scenes with that value and its anchor prompts are the same captions with the concept word left
out (the anchors' prototype convention: the anchor differs from the target by the concept alone). On another model a
concept is any phrase; its default prompts come from a few templates, with an empty anchor as in CAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world.render import ConceptWorld
from .world.vocab import ATTRIBUTES, TEMPLATES, attribute_of, caption

DEFAULT_TEMPLATES = ("a photo of {}", "an image of {}", "a picture of {}", "a painting of {}")


@dataclass(frozen=True)
class Concept:
    """Target prompts, matching anchor prompts, and (concept world) the attribute and value judged."""

    name: str
    target_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]
    attribute: str | None = None
    value: str | None = None
    scenes_seed: int | None = None  # concept world: the seed of the scenes behind the prompts

    def __post_init__(self):
        if not self.target_prompts:
            raise ValueError(f"concept {self.name!r} has no target prompts")
        if len(self.anchor_prompts) != len(self.target_prompts):
            raise ValueError(
                f"concept {self.name!r}: {len(self.anchor_prompts)} anchor prompts for {len(self.target_prompts)} "
                f"targets; give one anchor per target"
            )


def world_concept(word: str, n: int = 8, seed: int = 0, template: int | None = None) -> Concept:
    """A concept-world concept: ``n`` scenes with attribute value ``word``, captioned in full and without the word."""
    attribute = attribute_of(word)  # raises a clear KeyError listing the concept words
    world = ConceptWorld(n, seed=seed, **{attribute: word})
    rng = np.random.default_rng([seed, 7])
    targets, anchors = [], []
    for i in range(n):
        attrs = world.scene(i).attributes()
        k = int(rng.integers(len(TEMPLATES))) if template is None else template
        targets.append(caption(attrs, k))
        anchors.append(caption({**attrs, attribute: None}, k))
    return Concept(word, tuple(targets), tuple(anchors), attribute, word, seed)


def text_concept(phrase: str, n: int = 4, anchor: str = "") -> Concept:
    """A concept on a general model: templates around ``phrase``, with a fixed anchor (default empty, as in CAD)."""
    if not phrase.strip():
        raise ValueError("the concept phrase is empty")
    targets = tuple(DEFAULT_TEMPLATES[i % len(DEFAULT_TEMPLATES)].format(phrase) for i in range(n))
    return Concept(phrase, targets, (anchor,) * n)


def resolve(model, concept: str | Concept, n: int = 8, seed: int = 0) -> Concept:
    """A Concept from a word (concept world: must be an attribute value) or a phrase (other models)."""
    if isinstance(concept, Concept):
        return concept
    if model.is_concept_world:
        return world_concept(concept, n=n, seed=seed)
    return text_concept(concept, n=n)


def concept_words() -> list[str]:
    return [v for vals in ATTRIBUTES.values() for v in vals]
