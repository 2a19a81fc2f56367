"""What SD3 and Flux share: a transformer denoiser with joint attention over image and text tokens, trained by
rectified flow, sampled on a schedule that may shift with the image's token count."""

from __future__ import annotations

import torch

from ..errors import SvdiffError
from .base import Family
from .noise import RectifiedFlow

# diffusers' SD3 DreamBooth LoRA targets: the joint attention's projections, image and text streams.
JOINT_ATTENTION = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]
CONTEXT_ATTENTION = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias) over the keys, for (batch, heads, tokens, dim) queries and keys."""
    logits = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    return (logits if bias is None else logits + bias).softmax(dim=-1)


def dynamic_shift(scheduler, tokens: int, max_shift: float = 1.16) -> float:
    """The schedule's shift μ for an image of `tokens` tokens, as diffusers' SD3 and Flux pipelines compute it:
    linear in the token count from base_shift at base_image_seq_len to max_shift at max_image_seq_len (`max_shift`
    when the scheduler's config has none: SD3's pipeline assumes 1.16, Flux's 1.15)."""
    config = scheduler.config
    low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (top - base) / (high - low)
    return tokens * slope + (base - slope * low)  # in the pipelines' order of operations, to their last bit


def first_half(transformer, stacks: tuple[str, ...]) -> list[str]:
    """Style mixing on a transformer, which has no coarse and fine levels: the first half of its blocks in the
    order they run (`stacks`, e.g. Flux's double- then single-stream blocks) take the geometry file's shifts,
    the rest and everything outside the blocks the appearance file's. A default by analogy with the UNet, where
    the early, coarse layers lay out the picture; not measured on the real models."""
    blocks = [(stack, i) for stack in stacks for i in range(len(getattr(transformer, stack)))]
    chosen = blocks[: len(blocks) // 2 or 1]
    return [rf"^transformer\.{stack}\.{i}\." for stack, i in chosen]


class FlowTransformer(Family):
    denoiser = "transformer"
    cross_attention = False  # joint attention: text and image tokens attend to each other

    def objective(self, scheduler_config, config) -> RectifiedFlow:
        """Rectified flow with the run's timestep density and loss weighting (diffusers' defaults without a run)."""
        if config is None:
            return RectifiedFlow(scheduler_config)
        if config.snr_gamma:
            raise SvdiffError("--snr_gamma weighs DDPM timesteps; SD3 and Flux train by flow: use --weighting_scheme")
        settings = {k: getattr(config, k) for k in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")}
        return RectifiedFlow(scheduler_config, **settings)
