"""Concepts: what a method localizes. A concept is a small spec of target prompts, anchor prompts and, in the
concept world, the attribute it refers to.

In the concept world a concept is one attribute value ("red", "circle", "striped", "white"); its target prompts are
full captions of scenes with that value and its anchor prompts are the same captions with the concept word left
out (the anchors' prototype convention: the anchor differs from the target by the concept alone). On another model a
concept is any phrase; its default prompts come from a few templates, with an empty anchor as in CAD.
"""

from __future__ import annotations

import warnings
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
    #: What an image judge weighs the concept against (CLIP zero-shot: softmax over the concept and these). Concept
    #: world: the other values of its attribute. Text concepts: given by the user, else the judge uses its generic
    #: default (:data:`interp.judges.GENERIC_ALTERNATIVES`), which says little: give real alternatives.
    alternatives: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a concept needs a non-empty name, got {self.name!r}")
        for field_name in ("target_prompts", "anchor_prompts", "alternatives"):
            v = getattr(self, field_name)
            if isinstance(v, str):  # a plain string would be split into one prompt per character
                raise ValueError(f"concept {self.name!r}: {field_name} must be a sequence of strings, got the string "
                                 f"{v!r}; write ({v!r},)")
            v = tuple(v)
            if not all(isinstance(p, str) for p in v):
                raise ValueError(f"concept {self.name!r}: {field_name} must hold strings, got {v!r}")
            object.__setattr__(self, field_name, v)
        if not self.target_prompts:
            raise ValueError(f"concept {self.name!r} has no target prompts")
        empty = [i for i, p in enumerate(self.target_prompts) if not p.strip()]
        if empty:  # an empty target equals the empty anchor: J would be zero for every component
            raise ValueError(f"concept {self.name!r}: target prompts {empty} are empty; every target prompt must "
                             f"name the concept (anchors may be empty)")
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
    others = tuple(v for v in ATTRIBUTES[attribute] if v != word)
    return Concept(word, tuple(targets), tuple(anchors), attribute, word, seed, others)


def text_concept(phrase: str, n: int = 4, anchor: str = "", alternatives=()) -> Concept:
    """A concept on a general model: templates around ``phrase``, with a fixed anchor (default empty, as in CAD).

    ``alternatives``: phrases an image judge weighs the concept against ("van gogh" vs "monet", "picasso").
    """
    if not phrase.strip():
        raise ValueError("the concept phrase is empty")
    alternatives = (alternatives,) if isinstance(alternatives, str) else tuple(alternatives)
    if phrase in alternatives:
        raise ValueError(f"the concept {phrase!r} is among its own alternatives")
    targets = tuple(DEFAULT_TEMPLATES[i % len(DEFAULT_TEMPLATES)].format(phrase) for i in range(n))
    return Concept(phrase, targets, (anchor,) * n, alternatives=alternatives)


def resolve(model, concept: str | Concept, n: int = 8, seed: int = 0) -> Concept:
    """A Concept from a word (concept world: must be an attribute value) or a phrase (other models)."""
    if isinstance(concept, Concept):
        if not model.is_concept_world:
            check_tokenization(model.tokenizer, concept.value or concept.name)
        return concept
    if model.is_concept_world:
        return world_concept(concept, n=n, seed=seed)
    check_tokenization(model.tokenizer, concept)
    return text_concept(concept, n=min(n, len(DEFAULT_TEMPLATES)))


class FragmentedConceptWarning(UserWarning):
    """A concept word the tokenizer only knows letter by letter."""


def check_tokenization(tokenizer, phrase: str) -> None:
    """Warn when the tokenizer splits a word of ``phrase`` into single characters: the text encoder then sees its
    letters, not a word it learned, and every method localizes whatever those letters evoke."""
    for word in phrase.split():
        pieces = tokenizer.tokenize(word)
        bare = [p.replace("</w>", "").lstrip("Ġ▁") for p in pieces]
        if len(word) > 1 and len(pieces) > 1 and all(len(b) <= 1 for b in bare):
            warnings.warn(
                f"the tokenizer splits {word!r} into single characters {pieces}: the text encoder knows no such "
                f"word, so attributions will follow its letters; check the spelling or use a word it knows",
                FragmentedConceptWarning, stacklevel=3)


def concept_words() -> list[str]:
    return [v for vals in ATTRIBUTES.values() for v in vals]
