"""A small CLIP trained on concept-world renders and captions: the zero-shot judge of the concept world.

Stable Diffusion users judge generated images with CLIP zero-shot scoring (the image against "a photo of {concept}"
and its alternatives). The suite ships a CLIP of the same classes, trained here on the concept world, so that the
CLIP path of :mod:`interp.core.judges` runs on real concepts and can be checked against the concept classifier.

Model: a transformers ``CLIPModel`` built from a ``CLIPConfig`` (a small ViT over 16x16 renders with 4x4 patches; a
small causal text transformer over the world's word-level tokenizer, :func:`~interp.world.vocab.build_tokenizer`),
trained with CLIP's symmetric contrastive loss (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021). Two departures from plain CLIP, both because captions of this world repeat:

- Captions name a random subset of the attributes (each left out with probability ``p_omit``), so the model learns
  what "a red shape" or "a shape on white" means: those are the zero-shot prompts.
- Any caption consistent with an image is a positive for it (all attributes the caption names match the image), so
  the targets of the contrastive softmax are spread uniformly over the consistent pairs of the batch instead of
  the diagonal (duplicates in a batch would otherwise be pushed apart).

Images are augmented as the concept classifier's (mild noise and blur), so the judge reads imperfect generations by
their content. Training and the held-out check draw from different seed streams (:data:`TRAIN_STREAM`,
:data:`HELDOUT_SEED`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from interp.core.generation import generate
from interp.world.classifier import _augment
from interp.world.fitting import Recipe, fit
from interp.world.render import ConceptWorld, random_caption, random_scene, render
from interp.world.vocab import (
    ATTRIBUTES,
    BOS,
    EOS,
    MAX_LENGTH,
    PAD,
    TEMPLATES,
    build_tokenizer,
    caption,
    vocabulary,
)

#: Seed-stream tag of the training batches (``default_rng([seed, TRAIN_STREAM])``).
TRAIN_STREAM = 31
#: Seed of the held-out renders (``ConceptWorld(n, seed=HELDOUT_SEED + seed)``); training never draws from it.
HELDOUT_SEED = 40_000


@dataclass(frozen=True)
class CLIPTrainConfig(Recipe):
    """Architecture and training of the concept-world CLIP. The defaults are the shipped model's."""

    image_size: int = 16
    patch_size: int = 4
    hidden: int = 64
    layers: int = 3
    text_layers: int | None = None  # the text tower's depth (None: ``layers``, as the image tower)
    heads: int = 4
    intermediate: int = 128
    projection_dim: int = 64
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    p_omit: float = 0.5
    seed: int = 0
    log_every: int = 50
    save_every: int = 250  # with a state path (the latent model's phase 0)


def build_clip(cfg: CLIPTrainConfig = CLIPTrainConfig()):
    """An untrained ``CLIPModel`` of the configured size over the world's vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    vocab = vocabulary()
    text = dict(vocab_size=len(vocab), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                num_hidden_layers=cfg.text_layers or cfg.layers, num_attention_heads=cfg.heads,
                max_position_embeddings=MAX_LENGTH,
                bos_token_id=vocab.index(BOS), eos_token_id=vocab.index(EOS), pad_token_id=vocab.index(PAD),
                projection_dim=cfg.projection_dim)
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, hidden_size=cfg.hidden,
                  intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  projection_dim=cfg.projection_dim)
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def world_templates() -> dict[str, list[str]]:
    """Zero-shot prompt templates per attribute: every caption template naming only that attribute ("a {} shape",
    "a photo of a {}", "a shape on {}", ...); ``"default"`` (a concept of unknown attribute) names it as a shape."""
    out = {a: [caption({**dict.fromkeys(ATTRIBUTES), a: "{}"}, k) for k in range(len(TEMPLATES))] for a in ATTRIBUTES}
    out["default"] = list(out["shape"])
    return out


def _batch(rng: np.random.Generator, n: int, size: int, p_omit: float):
    """Renders, captions naming a random subset of attributes, labels and the named-attribute mask."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(s, size) for s in scenes]))
    names = list(ATTRIBUTES)
    labels = torch.tensor([[ATTRIBUTES[a].index(getattr(s, a)) for a in names] for s in scenes])
    named = torch.from_numpy(rng.random((n, len(names))) >= p_omit)
    captions = [caption({a: (getattr(s, a) if named[i, j] else None) for j, a in enumerate(names)},
                        int(rng.integers(len(TEMPLATES)))) for i, s in enumerate(scenes)]
    return images, captions, labels, named


def consistency(labels: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """``C[i, j]`` = caption ``j`` is true of image ``i`` (every attribute it names matches image ``i``)."""
    same = labels[:, None, :] == labels[None, :, :]  # (image i, caption j, attribute)
    return (same | ~named[None, :, :]).all(-1)


def contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with every consistent pair a positive (targets uniform over positives)."""
    p = positives.float()
    t_img = p / p.sum(1, keepdim=True)
    t_txt = (p / p.sum(0, keepdim=True)).T
    li = -(t_img * logits_per_image.log_softmax(1)).sum(1).mean()
    lt = -(t_txt * logits_per_image.T.log_softmax(1)).sum(1).mean()
    return (li + lt) / 2


def train_clip(cfg: CLIPTrainConfig = CLIPTrainConfig(), progress: bool = True, state_path: Path | None = None):
    """Train the concept-world CLIP; returns ``(model, tokenizer, loss history)`` (model in eval mode, float32).
    History records are the mean loss of every ``log_every`` steps. With ``state_path`` the training resumes from
    that state, writes it every ``save_every`` steps and once done, so a finished training is loaded, not rerun."""

    model = build_clip(cfg)
    tok = build_tokenizer()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    rng = np.random.default_rng([cfg.seed, TRAIN_STREAM])
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()

    def batch_loss(step):
        images, captions, labels, named = _batch(rng, cfg.batch_size, cfg.image_size, cfg.p_omit)
        enc = tok(captions, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    pixel_values=_augment(images, gen) * 2 - 1)
        return contrastive_loss(out.logits_per_image, consistency(labels, named))

    def clamp_temperature():  # CLIP clips its learned temperature at 100
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    parts = {"clip": model, "opt": opt, "sched": sched}
    history, _ = fit(batch_loss, cfg, params, opt, sched, state_path, cfg.hash(), parts, rng, gen, "clip", progress,
                     mark_done=True, after_step=clamp_temperature)
    model.eval().requires_grad_(False)
    return model, tok, history


def heldout_renders(n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """``n`` renders of the held-out stream and their attribute values (per attribute, one value per image)."""
    world = ConceptWorld(n, seed=HELDOUT_SEED + seed)
    items = [world[i] for i in range(n)]
    truth = {a: [it["attributes"][a] for it in items] for a in ATTRIBUTES}
    return torch.stack([it["image"] for it in items]), truth


def zero_shot_accuracy(judge, images: torch.Tensor, truth: dict[str, list[str]], batch: int = 512) -> dict[str, float]:
    """Per-attribute accuracy of ``judge.predict`` (argmax over the attribute's values) against ``truth``."""
    values = {a: list(v) for a, v in ATTRIBUTES.items()}
    hits = {a: 0 for a in values}
    for s in range(0, len(images), batch):
        probs = judge.predict(images[s : s + batch], values)
        for a in values:
            pred = probs[a].argmax(-1).tolist()
            hits[a] += sum(values[a][p] == t for p, t in zip(pred, truth[a][s : s + batch]))
    return {a: h / len(images) for a, h in hits.items()}


#: Seed of the held-out prompts and noises of the agreement check on generated images (fidelity uses 10,000, edit
#: evaluation 20,000, edits 30,000, the held-out renders 40,000).
GENERATED_SEED = 50_000


@torch.no_grad()
def agreement_on_generated(model, judges: dict, n: int = 240, steps: int = 25, seed: int = GENERATED_SEED,
                           batch: int = 120) -> dict:
    """Generate ``n`` images of held-out full captions with ``model`` and let every judge name each attribute.

    Returns, per attribute, each judge's accuracy against the prompt and the agreement of every pair of judges
    (share of images where their argmax values are equal), plus the per-image frame.
    """
    import pandas as pd

    world = ConceptWorld(n, seed=seed)
    rng = np.random.default_rng([seed, 1])
    scenes = [world.scene(i) for i in range(n)]
    prompts = [random_caption(rng, s) for s in scenes]
    values = {a: list(v) for a, v in ATTRIBUTES.items()}
    rows = [{"prompt": p, **s.attributes()} for p, s in zip(prompts, scenes)]
    for s in range(0, n, batch):
        images = generate(model, prompts[s : s + batch], seed=seed + s, steps=steps).float()
        for jname, judge in judges.items():
            probs = judge.predict(images, values)
            for a in values:
                for j, k in enumerate(probs[a].argmax(-1).tolist()):
                    rows[s + j][f"{jname}_{a}"] = values[a][k]
    df = pd.DataFrame(rows)
    names = list(judges)
    out = {"n_images": n, "steps": steps, "seed": seed,
           "accuracy": {j: {a: float((df[f"{j}_{a}"] == df[a]).mean()) for a in values} for j in names},
           "agreement": {}}
    for i, a_name in enumerate(names):
        for b_name in names[i + 1 :]:
            out["agreement"][f"{a_name}~{b_name}"] = {
                a: float((df[f"{a_name}_{a}"] == df[f"{b_name}_{a}"]).mean()) for a in values}
    return out, df
