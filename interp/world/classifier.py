"""The concept classifier: a small CNN that names every attribute of a concept-world image.

It is trained on ground-truth renders only (never on generated images) and is the judge of generated images in all
later evaluation: fidelity, erasure and amplification, and causal tracing's end-to-end score. Training adds mild
Gaussian noise and blur so that it judges slightly imperfect generations by their content, not by their texture
of noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from interp.world.render import ConceptWorld, render_batch
from interp.world.vocab import ATTRIBUTES


class ConceptClassifier(nn.Module):
    """Shared conv trunk, one linear head per attribute; input (B, 3, H, W) in [0, 1]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(128), nn.GELU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(images * 2 - 1)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per attribute."""
        return {a: logits.softmax(-1) for a, logits in self(images).items()}

    def concept_probability(self, images: torch.Tensor, attribute: str, value: str) -> torch.Tensor:
        """P(attribute = value | image) per image (differentiable)."""
        idx = ATTRIBUTES[attribute].index(value)
        return self(images)[attribute].softmax(-1)[:, idx]

    def save(self, path: str | Path, metrics: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "classifier.safetensors")
        (path / "classifier.json").write_text(json.dumps({"width": self.width, "metrics": metrics or {}}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ConceptClassifier":
        path = Path(path)
        weights = path / "classifier.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"no concept classifier at {weights}; train one with `python -m analyses.train_world`")
        meta = json.loads((path / "classifier.json").read_text())
        model = cls(meta["width"])
        model(torch.zeros(1, 3, 16, 16))  # materialize the lazy layer
        model.load_state_dict(load_file(weights))
        return model.eval().requires_grad_(False)


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = torch.rand(len(images), 1, 1, 1, generator=gen) * 0.12
    images = images + sigma * torch.randn(images.shape, generator=gen)
    blur = torch.rand(len(images), generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    return images.clamp(0, 1)


@torch.no_grad()
def accuracy(model: ConceptClassifier, data: ConceptWorld, batch: int = 512) -> dict[str, float]:
    """Per-attribute accuracy on a ConceptWorld data set."""
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    correct = {a: 0 for a in ATTRIBUTES}
    for s in range(0, len(images), batch):
        out = model(images[s : s + batch])
        for j, a in enumerate(ATTRIBUTES):
            correct[a] += int((out[a].argmax(-1) == labels[s : s + batch, j]).sum())
    return {a: c / len(images) for a, c in correct.items()}


def train_classifier(steps: int = 1500, batch_size: int = 256, seed: int = 0, size: int = 16, progress: bool = True,
                     n_test: int = 2000):
    """Train the classifier on renders; returns ``(model, held-out accuracy per attribute)``.

    The held-out renders come from a different seed stream (``seed + 1000``) than the training stream.
    """
    torch.manual_seed(seed)
    model = ConceptClassifier()
    model(torch.zeros(1, 3, size, size))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        images, _, labels = render_batch(rng, batch_size, size)
        out = model(_augment(images, gen))
        loss = sum(F.cross_entropy(out[a], labels[:, j]) for j, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    return model, accuracy(model, ConceptWorld(n_test, seed=seed + 1000, size=size))
