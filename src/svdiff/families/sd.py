"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's last hidden states; ε or v prediction."""

from __future__ import annotations

import torch

from .base import Family, select

# diffusers' DreamBooth LoRA targets: the attention projections of the UNet and of CLIP.
UNET_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusion(Family):
    pipelines = ("StableDiffusionPipeline",)
    lora_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION}

    def resolution_multiple(self) -> int:
        # every UNet downsampling halves the latents
        return self.pipe.vae_scale_factor * 2 ** (len(self.model.config.block_out_channels) - 1)

    def encode(self, prompts: list[str]) -> dict:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.model.device)
        return {"encoder_hidden_states": self.pipe.text_encoder(ids)[0]}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return self.model(noisy, timesteps, conditioning["encoder_hidden_states"]).sample

    def unmix_layers(self, pattern: str | None = None) -> list[str]:
        return unmix_layers(self.model, pattern)


def unmix_layers(unet, pattern: str | None = None) -> list[str]:
    """A UNet's cross-attention modules for the Unmix loss: those matching `pattern`, or by default those whose
    maps are at most half the latent side (SD 1.x/2.x at 512 px: the 32×32, 16×16 and 8×8 ones; the embedded
    base: 8×8 and 4×4). Coarse maps are where a layout is decided; the finest layers mostly refine texture and
    their maps are the most expensive to hold."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)]
    return select(names, pattern, [n for n in names if _scale(n, len(unet.up_blocks)) >= 2])


def _scale(name: str, levels: int) -> int:
    """By how much a layer's map is smaller than the latents, from its place in a UNet of `levels` blocks."""
    kind, _, rest = name.partition(".")
    if kind == "mid_block":
        return 2 ** (levels - 1)
    block = int(rest.split(".")[0])
    return 2**block if kind == "down_blocks" else 2 ** (levels - 1 - block)
