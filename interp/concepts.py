"""Concepts: what a method localizes. A concept is a small spec of target prompts, anchor prompts, the alternatives
an image judge weighs it against and, for a model kind with its own concepts, the attribute it refers to.

On a general model a concept is any phrase; its default prompts come from a few templates, with an empty anchor as in
CAD. A model kind may provide its own concepts (``model.world.concept``): in the concept world
(:mod:`interp.world.concepts`) a concept is one attribute value ("red", "circle", "striped", "white"), its target
prompts full captions of scenes with that value and its anchor prompts the same captions without the word.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


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
    if model.world is not None:  # a model kind with its own concepts (the concept world's attribute values)
        return model.world.concept(concept, n=n, seed=seed)
    check_tokenization(model.tokenizer, concept)
    return text_concept(concept, n=min(n, len(DEFAULT_TEMPLATES)))


def judged_concept(model, phrase: str, alternatives=(), n: int = 8) -> "str | Concept":
    """What an objective is built on for ``phrase`` when an image judge may weigh it against ``alternatives``:
    the word itself on a model with its own concepts (whose alternatives are the other values of the attribute;
    giving any is an error) or when none are given; otherwise a text concept weighed against them, the phrase
    itself left out."""
    alternatives = tuple(a for a in alternatives if a != phrase)
    if model.is_concept_world:
        if alternatives:
            raise ValueError(f"alternatives are for models other than the concept world: on {model.name!r} a concept "
                             f"is weighed against the other values of its attribute; leave --alternatives out")
        return phrase
    if not alternatives:
        return phrase
    return text_concept(phrase, n=min(n, len(DEFAULT_TEMPLATES)), alternatives=alternatives)


def weighed_against(model, concept: str, alternatives=(), concepts=()) -> list[str] | None:
    """What held-out images of ``concept`` are judged against (and whose retention an erasure or edit measures):
    None on the concept world (the other values of its attribute); elsewhere ``alternatives``, else the other
    ``concepts`` of the run, the concept itself left out. A clear error when none remain."""
    if model.is_concept_world:
        return None
    alts = [a for a in (alternatives or concepts) if a != concept]
    if not alts:
        raise ValueError(f"on {model.name!r} (not the concept world) {concept!r} has nothing to be weighed against: "
                         f"give --alternatives (the phrases whose retention is measured) or more --concepts")
    return alts


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
