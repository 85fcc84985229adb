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
    """What a method localizes: target prompts, matching anchor prompts, and what a judge weighs it against.

    Build one with :func:`text_concept` (a phrase on any model), ``interp.world.concepts.world_concept`` (a concept-world
    attribute value), or directly for full control over the prompts. Frozen; sequences are stored as tuples.

    Attributes:
        name: the concept's name (a word or phrase); it names cached results.
        target_prompts: prompts that show the concept; the objective's images cycle through them.
        anchor_prompts: one anchor per target prompt, the prompt the erase objective compares it with (the caption
            without the concept; may be empty strings, as in CAD).
        attribute: concept world: the attribute the concept's value belongs to (``color``, ``shape``, ...).
        value: concept world: the attribute value judged (``red``); None elsewhere.
        scenes_seed: concept world: the seed of the scenes behind the prompts.
        alternatives: what an image judge weighs the concept against (CLIP zero-shot: a softmax over the concept and
            these). Concept world: the other values of its attribute. Text concepts: given by the user, else the judge's
            generic default (:data:`interp.core.judges.GENERIC_ALTERNATIVES`), which says little.

    Raises:
        ValueError: an empty name, no or empty target prompts, a string where a sequence of prompts is expected, or
            anchor prompts not one per target.
    """

    name: str
    target_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]
    attribute: str | None = None
    value: str | None = None
    scenes_seed: int | None = None  # concept world: the seed of the scenes behind the prompts
    #: What an image judge weighs the concept against (CLIP zero-shot: softmax over the concept and these). Concept
    #: world: the other values of its attribute. Text concepts: given by the user, else the judge uses its generic
    #: default (:data:`interp.core.judges.GENERIC_ALTERNATIVES`), which says little: give real alternatives.
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
    """A concept on a general model: the phrase in a few prompt templates, with a fixed anchor (default empty, as in CAD).

    Args:
        phrase: the concept, e.g. ``"Van Gogh style"``.
        n: number of target prompts, cycling through the templates (``"a photo of {}"``, ``"an image of {}"``,
            ``"a picture of {}"``, ``"a painting of {}"``).
        anchor: the anchor prompt of every target.
        alternatives: phrases an image judge weighs the concept against (``("Monet style", "a photograph")``).

    Returns:
        The :class:`Concept`.

    Raises:
        ValueError: an empty phrase, or the phrase among its own alternatives.
    """
    if not phrase.strip():
        raise ValueError("the concept phrase is empty")
    alternatives = (alternatives,) if isinstance(alternatives, str) else tuple(alternatives)
    if phrase in alternatives:
        raise ValueError(f"the concept {phrase!r} is among its own alternatives")
    targets = tuple(DEFAULT_TEMPLATES[i % len(DEFAULT_TEMPLATES)].format(phrase) for i in range(n))
    return Concept(phrase, targets, (anchor,) * n, alternatives=alternatives)


def resolve(model, concept: str | Concept, n: int = 8, seed: int = 0) -> Concept:
    """The :class:`Concept` for ``concept``.

    Args:
        model: the loaded model.
        concept: a :class:`Concept` (returned as is, its words checked against a general model's tokenizer), a
            concept-world attribute value (on a model with its own concepts), or a phrase (other models: a
            :func:`text_concept`).
        n: number of target prompts (at most the four templates for a phrase).
        seed: seed of the concept world's scenes.

    Returns:
        The concept.

    Raises:
        KeyError: a word the concept world does not know.
    """
    if isinstance(concept, Concept):
        if not model.is_concept_world:
            check_tokenization(model.tokenizer, concept.value or concept.name)
        return concept
    if model.world is not None:  # a model kind with its own concepts (the concept world's attribute values)
        return model.world.concept(concept, n=n, seed=seed)
    check_tokenization(model.tokenizer, concept)
    return text_concept(concept, n=min(n, len(DEFAULT_TEMPLATES)))


def judged_concept(model, phrase: str, alternatives=(), n: int = 8) -> "str | Concept":
    """What an objective is built on for ``phrase`` when an image judge may weigh it against ``alternatives``.

    Args:
        model: the loaded model.
        phrase: the concept.
        alternatives: phrases to weigh it against (the phrase itself is left out).
        n: number of target prompts of the text concept.

    Returns:
        The word itself on a model with its own concepts (whose alternatives are the other values of the attribute) or
        when no alternatives are given; otherwise a :func:`text_concept` weighed against them.

    Raises:
        ValueError: alternatives given on the concept world.
    """
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
    """What held-out images of ``concept`` are judged against, and whose retention an erasure or edit measures.

    Args:
        model: the loaded model.
        concept: the concept.
        alternatives: phrases given by the user (``--alternatives``).
        concepts: the run's concepts.

    Returns:
        None on the concept world (the other values of its attribute); elsewhere ``alternatives``, else the other
        ``concepts`` of the run, the concept itself left out.

    Raises:
        ValueError: nothing remains to weigh the concept against.
    """
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
    """Warn when the tokenizer splits a word of ``phrase`` into single characters.

    The text encoder then sees its letters, not a word it learned, and every method localizes whatever those letters
    evoke.

    Args:
        tokenizer: the model's tokenizer.
        phrase: the concept phrase.

    Warns:
        FragmentedConceptWarning: naming the word and its pieces.
    """
    for word in phrase.split():
        pieces = tokenizer.tokenize(word)
        bare = [p.replace("</w>", "").lstrip("Ġ▁") for p in pieces]
        if len(word) > 1 and len(pieces) > 1 and all(len(b) <= 1 for b in bare):
            warnings.warn(
                f"the tokenizer splits {word!r} into single characters {pieces}: the text encoder knows no such "
                f"word, so attributions will follow its letters; check the spelling or use a word it knows",
                FragmentedConceptWarning, stacklevel=3)
