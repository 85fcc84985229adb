"""Concept-world concepts: one attribute value ("red", "circle", "striped", "white") and the scenes behind it.

A concept's target prompts are full captions of scenes with that value and its anchor prompts the same captions with
the concept word left out (the anchor differs from the target by the concept alone); its alternatives, for an image
judge, are the other values of the same attribute.
"""

from __future__ import annotations

import numpy as np

from interp.core.concepts import Concept
from interp.world.render import ConceptWorld
from interp.world.vocab import ATTRIBUTES, TEMPLATES, attribute_of, caption


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
    others = tuple(v for v in ATTRIBUTES[attribute] if v != word)
    return Concept(word, tuple(targets), tuple(anchors), attribute, word, seed, others)


def concept_words() -> list[str]:
    return [v for vals in ATTRIBUTES.values() for v in vals]
