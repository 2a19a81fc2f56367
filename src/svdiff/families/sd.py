"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's last hidden states; ε or v prediction."""

from __future__ import annotations

import math

import torch

from .base import Family

# diffusers' DreamBooth LoRA targets: the attention projections of the UNet and of CLIP.
UNET_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusion(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline",)
    lora_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION}

    def resolution_multiple(self) -> int:
        # every UNet downsampling halves the latents, and diffusers' pipelines check multiples of 8
        levels = len(self.model.config.block_out_channels) - 1
        return math.lcm(8, self.pipe.vae_scale_factor * 2**levels)

    def encode(self, prompts: list[str]) -> dict:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.model.device)
        return {"encoder_hidden_states": self.pipe.text_encoder(ids)[0]}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return self.model(noisy, timesteps, conditioning["encoder_hidden_states"]).sample
