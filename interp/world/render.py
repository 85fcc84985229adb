"""Deterministic renderer of the concept world: one object with known attributes on a plain background.

Every image is a pure function of its attributes and a small jitter (position, size, color) drawn from a seeded
generator, drawn at 4x supersampling and averaged down so that edges are anti-aliased. Stripes are aligned to the
pixel grid (two rows on, one off) so a 16x16 canvas shows them crisply.

The geometry (radius, jitter, outline width, stripe period) is defined in units of a 16-px canvas and scaled by
``size / 16``: a 32x32 render (the latent model's) shows the same scene at twice the resolution, with stripes of two
pixel rows on and two off, still on the pixel grid. At size 16 the scale is exactly 1, so 16-px renders are
bit-identical to those of the unscaled renderer (evaluation sets and cached results depend on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from interp.world.vocab import ATTRIBUTES, TEMPLATES, caption

RGB = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.12),
    "blue": (0.16, 0.24, 0.92),
    "yellow": (0.94, 0.86, 0.08),
    "purple": (0.62, 0.16, 0.80),
    "cyan": (0.08, 0.82, 0.86),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}

SS = 4  # supersampling factor


@dataclass(frozen=True)
class Scene:
    """What one image shows: the four attributes plus the jitter that makes images of one caption differ."""

    color: str
    shape: str
    texture: str
    background: str
    dx: int = 0
    dy: int = 0
    radius: float = 5.2
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "texture": self.texture, "background": self.background}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in coordinates normalized by the radius (y grows downwards)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.82
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.12
    if shape == "triangle":
        return (v <= 0.8) & (abs(u) <= (v + 1.0) / 1.8 * 1.0)
    if shape == "cross":
        return ((abs(u) <= 0.4) & (abs(v) <= 1.0)) | ((abs(v) <= 0.4) & (abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; shapes are {ATTRIBUTES['shape']}")


_DISK = ndimage.generate_binary_structure(2, 1)


def render(scene: Scene, size: int = 16) -> np.ndarray:
    """Render one scene as a float32 array (3, size, size) in [0, 1]."""
    n = size * SS
    scale = size / 16  # the scene's geometry is in 16-px units
    coords = (np.arange(n) + 0.5) / SS  # pixel-unit coordinates of the supersamples
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = size / 2 + scene.dx * scale, size / 2 + scene.dy * scale
    radius = scene.radius * scale
    mask = _shape_mask(scene.shape, (x - cx) / radius, (y - cy) / radius)
    if scene.texture == "hollow":
        inner = ndimage.binary_erosion(mask, structure=_DISK, iterations=int(1.4 * SS * scale))
        mask = mask & ~inner
    elif scene.texture == "striped":
        # rows of ``scale`` pixels: crisp on the pixel grid whenever size is a multiple of 16
        mask = mask & ((np.floor(y / scale).astype(int) % 3) < 2)
    elif scene.texture != "solid":
        raise ValueError(f"unknown texture {scene.texture!r}; textures are {ATTRIBUTES['texture']}")
    cover = mask.reshape(size, SS, size, SS).mean(axis=(1, 3)).astype(np.float32)
    fg = np.clip(np.asarray(RGB[scene.color]) + np.asarray(scene.tint), 0, 1).astype(np.float32)
    bg = np.asarray(RGB[scene.background], dtype=np.float32)
    img = cover[None] * fg[:, None, None] + (1 - cover[None]) * bg[:, None, None]
    return img.astype(np.float32)


def random_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a scene with uniform attributes (those in ``fixed`` are kept) and a small jitter."""
    attrs = {a: fixed.get(a) or str(rng.choice(vals)) for a, vals in ATTRIBUTES.items()}
    for a, v in fixed.items():
        if a not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {a!r}; attributes are {list(ATTRIBUTES)}")
        if v not in ATTRIBUTES[a]:
            raise ValueError(f"{v!r} is not a {a}; {a}s are {ATTRIBUTES[a]}")
    dx, dy = (int(d) for d in rng.integers(-1, 2, size=2))
    radius = float(rng.uniform(4.6, 5.8))
    tint = tuple(float(t) for t in rng.uniform(-0.05, 0.05, size=3))
    return Scene(**attrs, dx=dx, dy=dy, radius=radius, tint=tint)


def random_caption(rng: np.random.Generator, scene: Scene, p_omit: float = 0.0) -> str:
    """A caption of ``scene`` from a random template; each attribute word is left out with probability ``p_omit``."""
    attrs: dict[str, str | None] = dict(scene.attributes())
    for a in attrs:
        if rng.random() < p_omit:
            attrs[a] = None
    return caption(attrs, template=int(rng.integers(len(TEMPLATES))))


ATTRIBUTE_INDEX = {a: {v: i for i, v in enumerate(vals)} for a, vals in ATTRIBUTES.items()}


def labels_of(scene: Scene) -> torch.Tensor:
    """Attribute labels as class indices, in the order of :data:`ATTRIBUTES`."""
    return torch.tensor([ATTRIBUTE_INDEX[a][getattr(scene, a)] for a in ATTRIBUTES])


class ConceptWorld(torch.utils.data.Dataset):
    """A seeded, indexable dataset of concept-world images with captions and attribute labels.

    Item ``i`` depends only on ``(seed, i)``: ``{"image": (3,H,W) in [0,1], "caption": str, "labels": LongTensor[4],
    "attributes": dict}``. ``fixed`` pins attributes (e.g. ``color="red"``) for concept-specific sets.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 16, p_omit: float = 0.0, **fixed: str):
        if n <= 0:
            raise ValueError(f"a ConceptWorld needs n > 0 images, got {n}")
        self.n, self.seed, self.size, self.p_omit, self.fixed = n, seed, size, p_omit, fixed
        random_scene(np.random.default_rng(0), **fixed)  # validates ``fixed`` now, not at first access

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        return random_scene(np.random.default_rng([self.seed, i]), **self.fixed)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)  # the index alone, as a sequence's IndexError (iteration stops on it)
        rng = np.random.default_rng([self.seed, i])
        scene = random_scene(rng, **self.fixed)
        return {
            "image": torch.from_numpy(render(scene, self.size)),
            "caption": random_caption(rng, scene, self.p_omit),
            "labels": labels_of(scene),
            "attributes": scene.attributes(),
        }


def render_batch(rng: np.random.Generator, n: int, size: int = 16, p_omit: float = 0.0, **fixed: str):
    """``n`` random images, captions and labels: the training stream."""
    scenes = [random_scene(rng, **fixed) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(s, size) for s in scenes]))
    captions = [random_caption(rng, s, p_omit) for s in scenes]
    labels = torch.stack([labels_of(s) for s in scenes])
    return images, captions, labels
