"""Token-KV components: the concept token's key and value in each cross-attention head.

A cross-attention layer reads the prompt through its key and value projections (``attn2.to_k``, ``attn2.to_v``), one
row per context token. The rows at the concept word's tokens are what LocoGen intervenes on and UCE edits
(:mod:`interp.studies.editing.uce`). A token-KV component is one head of one cross-attention at those rows
(``unet....attn2#kv3``); its multiplier ``m`` moves that head's slice of the key and the value, at the concept's
positions only, between the prompt's own (``m = 1``, the model exactly) and the **anchor prompt's** (``m = 0``):

    k[row, p, head h] = m * k + (1 - m) * k_anchor          at the concept's positions p of a row with the concept

(the same for ``v``); every other position, head and row is untouched. Mean-ablation (``mode="mean"``) puts the
unit's mean over a reference set in place of ``k_anchor`` (:func:`interp.core.objectives.reference_means`).

**Token-span components** (granularity ``tokenspan``, ``unet....attn2#kvs3``) are the same heads over a longer span:
the concept's tokens **and every later context position**, through the end of the padded context (end-of-text and
padding states included). The text encoder is causal, so every state after the concept word has seen it, and the
cross-attention reads the concept there too: on the shipped pixel model the concept's own tokens carry 2-12% of J,
the span 70-100% (``benchmarks/token_kv_share.py``); UCE edits exactly those columns. Ablated, each position of the
span takes the anchor's key and value at its aligned position: the concept's own positions as a token-KV unit's, a
later position ``q`` the anchor's ``q - d``, where ``d`` is the prompt's count of real tokens minus the anchor's (their
common suffix, end-of-text and padding align); a position whose partner falls outside the context is left out of the
span (:func:`span_positions`). A component set holds a cross-attention either through ``#kv`` or through ``#kvs``
units, not both.

**The anchor** of a prompt is the concept's own anchor for one of its target prompts (the objective's: on the concept
world the caption with the word left out, or ``shape`` for a shape, ``on white`` dropped for a background; the empty
prompt for a phrase on other models); for any other prompt (an erasure's held-out captions) the substitution the
concept's anchors make (:func:`substitution`: ``circle`` -> ``shape``), else the prompt with the phrase left out
(:func:`anchor_prompt`). Positions align by the two prompts' token difference (:func:`positions`): where the anchor
puts a word in the concept's place, the concept's tokens take that word's keys and values; where it leaves the word
out, they take those of the anchor's last token before the difference (the state of the same prefix without the
concept, the position UCE and Diff-QuickFix align the concept's last token to,
:func:`interp.studies.editing.edits.aligned_positions`; against the empty anchor, its start token). The anchor's keys and
values are those of the intact model, read in one denoiser pass over the anchor prompts (a cross-attention's keys
and values depend on the prompt only, not on the latents or the timestep); that pass is not counted among a run's
UNet rows.

Rows without the concept are never changed: the anchor branch of the erase objective, guidance's unconditional
branch, and, in generation, prompts that do not name the concept (an erasure's other prompts). An objective's target
prompts must all name it (:func:`check_concept` refuses one that does not, before any work).

**Families.** Stable Diffusion 1.x/2.x (and the concept world's two UNets), SDXL (two CLIPs side by side, whose
tokenizers place every token alike: the first one's positions are used) and PixArt (T5, after its caption
projection). SD3 and FLUX read the text through joint attention, whose context keys and values depend on the image
and the timestep and on every earlier block: they have no token-KV components (the component space refuses them by
name and points at their context projections, ``attn_context``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interp.core import diffusion
from interp.core.components import no_token_kv_message
from interp.core.concepts import resolve
from interp.core.interventions import TokenRows, run_text, run_unet

#: Families whose denoiser reads the text through cross-attention keys and values that the prompt alone decides.
CROSS_FAMILIES = ("sd", "sdxl", "pixart")


def anchor_prompt(prompt: str, phrase: str) -> str | None:
    """``prompt`` without the last whole-word occurrence of ``phrase`` (case-insensitive, whitespace collapsed);
    None when the phrase does not occur (so also: whether a prompt names the concept)."""
    hits = list(re.finditer(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", prompt, flags=re.IGNORECASE))
    if not hits:
        return None
    a, b = hits[-1].span()
    return " ".join((prompt[:a] + " " + prompt[b:]).split())


def subject_forms(tokenizer, concept: str) -> list[list[int]]:
    """The concept's token ids as the tokenizer writes it alone and after a space (a SentencePiece tokenizer, T5's,
    writes a word differently at the start of a text and mid-prompt); empty and repeated spellings dropped."""
    forms = []
    for text in (concept, " " + concept):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids and ids not in forms:
            forms.append(ids)
    return forms


def _affixes(a: Sequence, b: Sequence) -> tuple[int, int]:
    """How many leading and (after those) trailing items two sequences share."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    e = 0
    while e < min(len(a), len(b)) - k and a[-1 - e] == b[-1 - e]:
        e += 1
    return k, e


def _span(row: list[int], forms: list[list[int]]) -> tuple[int, int] | None:
    """First and last position of the last occurrence of the first spelling in ``forms`` that occurs in ``row``."""
    for sub in forms:
        hits = [p for p in range(len(row) - len(sub) + 1) if row[p : p + len(sub)] == sub]
        if hits:
            return hits[-1], hits[-1] + len(sub) - 1
    return None


def check_family(model) -> None:
    """Refuse, in one line, a family without token-KV components (SD3, FLUX: joint attention)."""
    if model.family.name not in CROSS_FAMILIES:
        raise ValueError(no_token_kv_message(model.denoiser))


def concept_word(concept) -> str:
    """The phrase whose tokens a token-KV component reads: a concept's value (concept world), else its name."""
    return concept if isinstance(concept, str) else (concept.value or concept.name)


def check_concept(model, concept) -> None:
    """Before any work: the family has token-KV components and every target prompt of ``concept`` (a
    :class:`~interp.core.concepts.Concept`) names the concept word, as a whole word its tokenizer writes as in the prompt."""
    check_family(model)
    positions(model, concept, list(concept.target_prompts), strict=True)


def _replace_last(prompt: str, old: str, new: str) -> str | None:
    hits = list(re.finditer(rf"(?<!\w){re.escape(old)}(?!\w)", prompt, flags=re.IGNORECASE))
    if not hits:
        return None
    a, b = hits[-1].span()
    return " ".join((prompt[:a] + " " + new + " " + prompt[b:]).split())


def substitution(concept) -> tuple[str, str] | None:
    """What the concept's anchors do to its prompts, as a rule for other prompts: the words of its first target prompt
    that its anchor replaces (the concept world: ``circle`` -> ``shape``, ``red`` -> nothing, ``on white`` ->
    nothing), learned from the words they share before and after; None when they share none (an empty anchor)."""
    if isinstance(concept, str) or not concept.target_prompts:
        return None
    tw, aw = concept.target_prompts[0].split(), concept.anchor_prompts[0].split()
    k, e = _affixes(tw, aw)
    old, new = " ".join(tw[k : len(tw) - e]), " ".join(aw[k : len(aw) - e])
    if k + e == 0 or not old or _replace_last(old, concept_word(concept), "") is None:
        return None
    return old, new


def anchor_prompts(concept, prompts: Sequence[str]) -> list[str | None]:
    """The anchor of each prompt: the concept's own anchor for one of its target prompts, else the prompt with the
    concept's :func:`substitution` made, else the prompt without the concept phrase (:func:`anchor_prompt`); None
    when the prompt does not name the concept."""
    word = concept_word(concept)
    pairs = {} if isinstance(concept, str) else dict(zip(concept.target_prompts, concept.anchor_prompts))
    rule = substitution(concept)
    out = []
    for p in prompts:
        if anchor_prompt(p, word) is None:
            out.append(None)
        elif p in pairs:
            out.append(pairs[p])
        else:
            made = _replace_last(p, *rule) if rule else None
            out.append(made if made is not None else anchor_prompt(p, word))
    return out


def _real(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt).input_ids


def positions(model, concept, prompts: Sequence[str], strict: bool = True):
    """Per prompt: its anchor prompt (:func:`anchor_prompts`), the context positions of the concept's tokens, and the
    anchor positions whose keys and values replace them, one each (``(prompt, [], [])`` for a prompt without the
    concept when not ``strict``).

    The alignment is the two prompts' token difference: after their common prefix the anchor either puts other tokens
    (the concept world's ``shape`` for a shape: the concept's ``i``-th token takes the anchor's ``i``-th, or its last)
    or none (a word left out: every concept token takes the anchor's last token before the difference, the state of
    the same prefix without the concept; the position UCE aligns the concept's last token to)."""
    part = model.text_parts[0]  # SDXL: both CLIPs' tokenizers place every token alike
    tok = model.tokenizers[part]
    word = concept_word(concept)
    forms = subject_forms(tok, word)
    anchors = anchor_prompts(concept, prompts)
    ids = model.split_ids(model.tokenize(list(prompts)))[part]
    out = []
    for i, (p, a) in enumerate(zip(prompts, anchors)):
        span = _span(ids[i].tolist(), forms) if a is not None else None
        if span is None:
            if strict:
                raise ValueError(f"prompt {p!r} does not name the concept {word!r} (as a whole word its tokenizer "
                                 f"writes as in the prompt): token-KV components read the concept's tokens, so every "
                                 f"target prompt must contain it")
            out.append((p, [], []))
            continue
        t, r = _real(tok, p), _real(tok, a)
        k, e = _affixes(t, r)
        m = len(r) - e - k  # the anchor's own tokens where the prompt has the concept
        first, last = span
        pos = list(range(first, last + 1))
        apos = [k + min(max(q - k, 0), m - 1) if m > 0 else max(k - 1, 0) for q in pos]
        out.append((a, pos, apos))
    return out


def _later(tok, prompt: str, anchor: str, pos: list[int], apos: list[int], length: int):
    """``pos`` and ``apos`` with every position after the concept added, each aligned to the anchor's position
    shifted by the difference of the two prompts' real token counts; pairs outside ``[0, length)`` left out."""
    d = len(_real(tok, prompt)) - len(_real(tok, anchor))
    pairs = list(zip(pos, apos)) + [(q, q - d) for q in range(pos[-1] + 1, length)]
    pairs = [(q, r) for q, r in pairs if 0 <= q < length and 0 <= r < length]
    return [q for q, _ in pairs], [r for _, r in pairs]


def span_positions(model, concept, prompts: Sequence[str], length: int, strict: bool = True):
    """:func:`positions` extended to a token-span component's span: per prompt its anchor, the concept's positions and
    every later position of a context of ``length`` rows, and the anchor position each takes (the concept's own as
    :func:`positions` aligns them; a later position ``q`` the anchor's ``q - d``, ``d`` the prompt's real token count
    minus the anchor's, so that their common suffix, end-of-text and padding align). Pairs outside ``[0, length)`` are
    left out."""
    tok = model.tokenizers[model.text_parts[0]]
    return [(a, *_later(tok, p, a, pos, apos, length)) if pos else (a, pos, apos)
            for p, (a, pos, apos) in zip(prompts, positions(model, concept, prompts, strict))]


@dataclass
class TokenBinding:
    """The concept's token positions in ``P`` prompts and the anchors' keys and values there: ``mask`` (P, L),
    ``span_mask`` (P, L: the concept's positions and every later one, where token-span components act) and ``refs``
    per ``to_k``/``to_v`` path (P, L, features: the anchor's at the aligned position of every span position).
    :meth:`rows` makes the :class:`TokenRows` of a batch."""

    mask: torch.Tensor
    refs: dict
    span_mask: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> TokenRows:
        """The :class:`~interp.core.interventions.TokenRows` of a batch whose row ``j`` holds prompt ``index[j]`` (-1:
        none)."""
        return TokenRows(torch.as_tensor(index, dtype=torch.long), self.mask, self.refs, self.span_mask)


def kv_paths(model) -> list[str]:
    """The key and value projections of every cross-attention of the denoiser, in execution order."""
    attns = [p for p, i in model.space.modules.items() if "tokenkv" in i.rule.granularities]
    return sorted((f"{p}.{k}" for p in attns for k in ("to_k", "to_v")), key=lambda p: model.events[("out", p)])


@torch.no_grad()
def bind(model, concept, prompts: Sequence[str], strict: bool = True) -> TokenBinding:
    """The :class:`TokenBinding` of ``prompts`` for ``concept`` (a word or a Concept): one intact denoiser pass over
    the anchor prompts reads their keys and values at every cross-attention. ``strict``: a prompt without the concept
    raises ValueError; otherwise it gets no positions (its rows stay untouched)."""
    check_family(model)
    if isinstance(concept, str):  # a word: its concept (the concept world's anchors, or a phrase's templates)
        concept = resolve(model, concept)
    found = positions(model, concept, prompts, strict)
    anchors = [a for a, _, _ in found]
    paths = kv_paths(model)
    ctx = run_text(model, model.tokenize(anchors, model.device))[0]
    n = len(prompts)
    shape = diffusion.latent_shape(model, n)
    x = torch.zeros(shape, device=model.device, dtype=model.dtype)
    t = torch.full((n,), int(model.scheduler.config.get("num_train_timesteps", 1000)) // 2, device=model.device)
    before = dict(model.counters)
    _, saved = run_unet(model, x, t, ctx, saves=paths)
    for k in list(model.counters):  # a pass that reads keys and values, no J: not counted among the run's UNet rows
        model.counters[k] = before.get(k, 0)
    L = saved[paths[0]].shape[1]
    mask = torch.zeros(n, L, dtype=torch.bool)
    span = torch.zeros(n, L, dtype=torch.bool)
    refs = {p: torch.zeros_like(saved[p]) for p in paths}
    tok = model.tokenizers[model.text_parts[0]]
    for i, (a, pos, apos) in enumerate(found):
        pairs = [(q, r) for q, r in zip(pos, apos) if q < L and r < L]
        if not pairs:
            continue
        mask[i, [q for q, _ in pairs]] = True
        # the span: the concept's positions (their refs are the token-KV unit's) and every later one, aligned
        spos, sapos = _later(tok, prompts[i], a, pos, apos, L)
        span[i, spos] = True
        for p in paths:
            refs[p][i, spos] = saved[p][i, sapos]
    return TokenBinding(mask.to(model.device), refs, span.to(model.device))
