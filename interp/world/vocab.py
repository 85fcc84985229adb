"""The concept world's vocabulary, caption templates and word-level tokenizer.

The world has four attributes with fixed value sets. Captions are drawn from a few templates; during training any
attribute word may be left out, so the model also learns what "a photo of a red circle" means with the other
attributes unspecified. The tokenizer is a real ``tokenizers`` WordLevel model wrapped in transformers'
``PreTrainedTokenizerFast``: it saves and loads with ``save_pretrained``/``from_pretrained`` offline. It has no
unknown token on purpose: a word outside the vocabulary is refused by :func:`check_prompts` with an error naming
the word, never mapped silently to an ``<unk>`` id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "shape": ("circle", "square", "triangle", "diamond", "cross"),
    # Styles of filling. A dot grid is at the Nyquist limit of a 16x16 canvas, so the third style is an outline.
    "texture": ("solid", "striped", "hollow"),
    "background": ("black", "white"),
}

#: Templates; ``{color}`` etc. are filled with attribute words (or removed when an attribute is left out).
TEMPLATES: tuple[str, ...] = (
    "a {color} {texture} {shape} on {background}",
    "a photo of a {color} {texture} {shape} on {background}",
    "an image of a {texture} {color} {shape} on a {background} background",
    "a picture of a {color} {texture} {shape} on {background}",
)

FILLER_WORDS: tuple[str, ...] = ("a", "an", "photo", "image", "picture", "of", "on", "background", "shape")
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
MAX_LENGTH = 16


def attribute_of(word: str) -> str:
    """The attribute a vocabulary word belongs to (``"red"`` -> ``"color"``)."""
    for attribute, values in ATTRIBUTES.items():
        if word in values:
            return attribute
    raise KeyError(
        f"{word!r} is not a concept word of the concept world; concept words are: "
        + "; ".join(f"{a}: {', '.join(v)}" for a, v in ATTRIBUTES.items())
    )


def vocabulary() -> list[str]:
    """All words, in a fixed order: special tokens first, so their ids are stable."""
    words = [BOS, EOS, PAD, *FILLER_WORDS]
    for values in ATTRIBUTES.values():
        words.extend(values)
    return words


def words_of(prompt: str) -> list[str]:
    """Split a prompt into words the way the tokenizer does (lower case; commas and periods are spaces)."""
    return re.sub(r"[,.]", " ", prompt.lower()).split()


class OutOfVocabularyError(ValueError):
    """A prompt uses a word the concept world's tokenizer does not know."""


def check_prompts(prompts: str | Sequence[str], known: Iterable[str] | None = None) -> list[str]:
    """Validate prompts against a word-level vocabulary; return them as a list.

    Raises :class:`OutOfVocabularyError` naming every unknown word and listing the vocabulary, and ``ValueError``
    for an empty prompt list or a prompt longer than the text encoder's context.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty: pass at least one prompt (use '' for the unconditional one)")
    vocab = set(known) if known is not None else set(vocabulary())
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        words = words_of(prompt)
        unknown = [w for w in words if w not in vocab]
        if unknown:
            listed = ", ".join(w for w in sorted(vocab) if not w.startswith("<"))
            raise OutOfVocabularyError(
                f"prompt {prompt!r} uses word(s) outside the concept world's vocabulary: {', '.join(map(repr, unknown))}. "
                f"The vocabulary is: {listed}"
            )
        if len(words) + 2 > MAX_LENGTH:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_LENGTH - 2} fit the text encoder")
    return prompts


def caption(attrs: dict[str, str | None], template: int = 0) -> str:
    """Fill a template; attributes set to ``None`` are left out (a missing shape becomes the word "shape")."""
    values = {k: (v or "") for k, v in attrs.items()}
    if not values.get("shape"):
        values["shape"] = "shape"
    text = " ".join(TEMPLATES[template].format(**values).split())
    if not attrs.get("background"):
        text = re.sub(r" on( a)?( background)?$", "", text)
    return text


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`, padding to :data:`MAX_LENGTH`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab))  # no unk_token: unknown words can never be mapped silently
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(",", " "), normalizers.Replace(".", " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )
