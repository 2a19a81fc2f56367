"""Cut-Mix-Unmix collages (SVDiff §3): two subjects side by side in one training image, with the prompt that says
which stands where, and the regions each occupies (for the Unmix attention loss).

The cut is fixed at the middle. Each side holds its subject's image scaled by `scale` (`--cut_mix_scale`: 0.5
fits the whole image in a half, 1 keeps its size; 1 is the default on the embedded base, 0.5 on others), laid on
the image's border color and moved so that its subject — the centre of mass of what differs from the border
color, the middle when nothing does — stands in the middle of its half, where a base draws "on the left" and "on
the right". What moves out of the half is cut; what it uncovers is border color.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LEFT_RIGHT = "a photo of a {left} on the left and a {right} on the right"
AND = "a photo of a {left} and a {right}"
_PREFIX = re.compile(r"^\s*(an? )?(photo|picture|image) of (an? |the )?", re.IGNORECASE)


def draw_concepts(n_concepts: int, seed: int, step: int, prob: float) -> tuple[int, ...]:
    """The concept(s) a step trains on, a pure function of (seed, step): one at random, or, with probability
    `prob` when there are two or more, an ordered pair drawn without replacement (left, right)."""
    rng = random.Random(f"{seed}-concept-{step}")
    if n_concepts >= 2 and prob > 0 and rng.random() < prob:
        return tuple(rng.sample(range(n_concepts), 2))
    return (rng.randrange(n_concepts),)


def phrase(prompt: str) -> str:
    """What a prompt names: "a photo of sks heart" → "sks heart", "a photo of a heart" → "heart"."""
    return _PREFIX.sub("", prompt).strip()


def pair_prompt(left: str, right: str, seed: int, step: int) -> str:
    """The collage's prompt from the two prompts it combines: the left/right template or, half the time, the
    "… and …" one (the same choice for the instance and the class collage of a step)."""
    template = AND if random.Random(f"{seed}-template-{step}").random() < 0.5 else LEFT_RIGHT
    return template.format(left=phrase(left), right=phrase(right))


def border_color(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """The median color of an image's outermost pixels, in [-1, 1] (a model input's range). Of a photo only its
    four edges are read, so matching collage partners costs little at every step."""
    if isinstance(image, Image.Image):
        w, h = image.size
        edges = [
            image.crop(box).convert("RGB") for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))
        ]
        pixels = np.concatenate([np.asarray(e, dtype=np.float32).reshape(-1, 3) for e in edges])
        return (torch.from_numpy(pixels) / 127.5 - 1).median(dim=0).values
    return torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1).median(dim=1).values


def nearest_background(image: Image.Image, candidates: list[Image.Image]) -> int:
    """Which candidate's border color is nearest `image`'s (the first of equals): the partner that makes the
    least seam in a collage."""
    target = border_color(image)
    return min(range(len(candidates)), key=lambda i: float((border_color(candidates[i]) - target).abs().sum()))


def _fit_half(image: torch.Tensor, scale: float) -> torch.Tensor:
    """3 × R × R → 3 × R × R/2: the image scaled by `scale` on its border color, moved so that its subject's
    centre of mass lands in the middle of the half (what moves out is cut)."""
    _, size, _ = image.shape
    half, scaled = size // 2, round(size * scale)
    border = border_color(image)[:, None, None]
    out = border.expand(3, size, half).clone()
    small = F.interpolate(image[None], size=(scaled, scaled), mode="area")[0]
    row, col = _centre_of_mass((small - border).abs().sum(dim=0))
    top, left = round(size / 2 - row), round(half / 2 - col)
    rows, cols = slice(max(0, top), min(size, top + scaled)), slice(max(0, left), min(half, left + scaled))
    out[:, rows, cols] = small[:, rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
    return out


def _centre_of_mass(mass: torch.Tensor) -> tuple[float, float]:
    """(row, column) of a 2-D mass's centre in pixel units (a pixel's centre at +0.5); the middle when the mass is
    all zero."""
    h, w = mass.shape
    total = float(mass.sum())
    if total <= 0:
        return h / 2, w / 2
    rows = torch.arange(h, dtype=mass.dtype) + 0.5
    cols = torch.arange(w, dtype=mass.dtype) + 0.5
    return float(mass.sum(dim=1) @ rows) / total, float(mass.sum(dim=0) @ cols) / total


def collage(left: torch.Tensor, right: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Two model inputs (3 × R × R, R even) side by side in one, each scaled by `scale` (0.5 … 1), its subject in
    the middle of its half."""
    if left.shape != right.shape or left.shape[-1] % 2:
        raise ValueError(f"collage needs two equal square inputs with an even side, got {left.shape}, {right.shape}")
    if not 0.5 <= scale <= 1:
        raise ValueError(f"collage scale {scale} is outside [0.5, 1]")
    return torch.cat([_fit_half(left, scale), _fit_half(right, scale)], dim=2)


def side_masks(height: int, width: int) -> torch.Tensor:
    """2 × height × width: the left and the right half (a middle column, when width is odd, belongs to neither)."""
    cols = torch.arange(width)
    left = (cols < width // 2).float().expand(height, width)
    right = (cols >= width - width // 2).float().expand(height, width)
    return torch.stack([left, right])
