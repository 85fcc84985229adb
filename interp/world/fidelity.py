"""Fidelity of a concept-world model: does it draw what the prompt says, as judged by the concept classifier?

For held-out scenes (a seed stream the training never used), generate one image per full caption and report, per
attribute, the fraction of images whose classifier prediction equals the prompt's value; also per value. And a
grid of samples next to their prompts, for the README.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from interp.core import diffusion
from interp.core.generation import generate
from interp.world.judge import ClassifierJudge
from interp.world.render import ConceptWorld, random_caption
from interp.world.vocab import ATTRIBUTES

HELDOUT_SEED = 10_000


@torch.no_grad()
def measure_fidelity(model, n: int = 360, seed: int = HELDOUT_SEED, steps: int = 25, guidance: float | None = None,
                     batch: int = 120, progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Generate ``n`` images of held-out scenes with full captions; returns (summary dict, per-image frame)."""
    from tqdm.auto import tqdm

    if model.classifier is None:
        raise ValueError("fidelity needs the concept classifier: load the model with load_model('concept-world')")

    judge = ClassifierJudge(model.classifier)
    world = ConceptWorld(n, seed=seed)
    rng = np.random.default_rng([seed, 1])
    scenes = [world.scene(i) for i in range(n)]
    prompts = [random_caption(rng, s) for s in scenes]
    rows = []
    for s in tqdm(range(0, n, batch), desc="fidelity", disable=not progress):
        images = generate(model, prompts[s : s + batch], seed=seed + s, steps=steps, guidance=guidance)
        probs = judge.predict(images, ATTRIBUTES)  # resized to the classifier's input (16 px) if need be
        for j in range(len(images)):
            scene = scenes[s + j]
            rec = {"prompt": prompts[s + j]}
            for a in ATTRIBUTES:
                rec[a] = getattr(scene, a)
                rec[f"pred_{a}"] = ATTRIBUTES[a][int(probs[a][j].argmax())]
                rec[f"p_{a}"] = float(probs[a][j][ATTRIBUTES[a].index(getattr(scene, a))])
            rows.append(rec)
    df = pd.DataFrame(rows)
    summary = {
        "accuracy": {a: float((df[a] == df[f"pred_{a}"]).mean()) for a in ATTRIBUTES},
        "per_value": {a: {v: float((g[a] == g[f"pred_{a}"]).mean()) for v, g in df.groupby(a)} for a in ATTRIBUTES},
        "all_four": float(np.mean([all(r[a] == r[f"pred_{a}"] for a in ATTRIBUTES) for _, r in df.iterrows()])),
        "n_images": n, "seed": seed, "steps": steps, "guidance": model.default_guidance if guidance is None else guidance,
    }
    return summary, df


@torch.no_grad()
def reconstruction_accuracy(model, size: int, n: int = 2000, seed: int = HELDOUT_SEED, batch: int = 250) -> dict:
    """The classifier's per-attribute accuracy on VAE reconstructions (posterior mean, decoded) of ``n`` held-out
    renders at ``size``: what the latent model loses before its UNet is involved."""

    judge = ClassifierJudge(model.classifier)
    world = ConceptWorld(n, seed=seed, size=size)
    correct = {a: 0 for a in ATTRIBUTES}
    for s in range(0, n, batch):
        items = [world[i] for i in range(s, min(n, s + batch))]
        x = torch.stack([it["image"] for it in items]).to(model.device, model.dtype)
        rec = diffusion.decode(diffusion.encode(x * 2 - 1, model.vae), model.vae)
        probs = judge.predict(rec, ATTRIBUTES)
        labels = torch.stack([it["labels"] for it in items])
        for j, a in enumerate(ATTRIBUTES):
            correct[a] += int((probs[a].argmax(-1).cpu() == labels[:, j]).sum())
    return {a: c / n for a, c in correct.items()}


@torch.no_grad()
def sample_grid(model, prompts: list[str], n_seeds: int = 6, seed: int = HELDOUT_SEED, steps: int = 25,
                guidance: float | None = None):
    """A matplotlib figure: one row per prompt, ``n_seeds`` samples each, the prompt written beside the row."""
    from matplotlib.figure import Figure

    rep = [p for p in prompts for _ in range(n_seeds)]

    latents = diffusion.initial_noise(model.unet, len(rep), torch.Generator().manual_seed(seed))
    images = generate(model, rep, steps=steps, guidance=guidance, latents=latents.to(model.dtype))
    fig = Figure(figsize=(1.1 * n_seeds + 3.2, 1.1 * len(prompts)))  # no pyplot: never touches the backend
    axes = fig.subplots(len(prompts), n_seeds, squeeze=False)
    for i, p in enumerate(prompts):
        for j in range(n_seeds):
            ax = axes[i][j]
            ax.imshow(images[i * n_seeds + j].permute(1, 2, 0).float().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(p, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


GRID_PROMPTS = [
    "a red solid circle on black", "a green striped square on white", "a blue hollow triangle on black",
    "a yellow solid diamond on black", "a purple striped cross on white", "a cyan hollow circle on white",
    "a photo of a red square", "a picture of a striped shape on white", "an image of a hollow blue diamond on a black background",
]
