"""Cut-Mix-Unmix collages (SVDiff §3): two subjects side by side in one training image, with the prompt that says
which stands where, and the regions each occupies (for the Unmix attention loss).

The cut is fixed at the middle. Each side holds its subject's image scaled by `scale` (`--cut_mix_scale`),
centred vertically, with the bands above and below filled by that image's border color, and R/2 columns of it
kept. At 0.5 (the default on bases other than the embedded one, whose default is 1) that is the whole image.
Larger scales draw the subjects larger and keep a strip of the copy: the one that holds most of what differs
from the image's border color (the subject, in a photo of one), the middle one when nothing stands out — so a
subject that stands off-centre is followed rather than cut.
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


def identifier(prompt: str) -> str:
    """The identifier word of an instance prompt: the first word of what it names ("sks" in "a photo of sks dog")."""
    return phrase(prompt).split()[0]


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
    """3 × R × R → 3 × R × R/2: R/2 columns of the image scaled by `scale` (where its subject is), centred
    vertically on its border color."""
    _, size, _ = image.shape
    half, scaled = size // 2, round(size * scale)
    border = border_color(image)
    out = border[:, None, None].expand(3, size, half).clone()
    small = F.interpolate(image[None], size=(scaled, scaled), mode="area")[0]
    top = (size - scaled) // 2
    left = _subject_strip((small - border[:, None, None]).abs().sum(dim=(0, 1)), half)
    out[:, top : top + scaled] = small[:, :, left : left + half]
    return out


def _subject_strip(mass: torch.Tensor, width: int) -> int:
    """The first column of the `width`-wide window holding the most of `mass` (per column); of equal windows, the
    one nearest the middle."""
    cum = torch.cat([mass.new_zeros(1), mass.double().cumsum(0)])
    sums = cum[width:] - cum[:-width]
    centre = (mass.numel() - width) / 2
    best = sums >= sums.max() - 1e-6 * (1 + sums.max())
    return min((abs(k - centre), k) for k in best.nonzero().flatten().tolist())[1]


def collage(left: torch.Tensor, right: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Two model inputs (3 × R × R, R even) side by side in one, each scaled by `scale` (0.5 … 1)."""
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
