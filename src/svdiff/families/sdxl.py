"""SDXL: a UNet conditioned on two CLIP text encoders' penultimate hidden states side by side, plus the second
encoder's pooled projection and the size/crop "time ids" as added embeddings."""

from __future__ import annotations

import torch

from .sd import CLIP_ATTENTION, UNET_ATTENTION, StableDiffusion


class StableDiffusionXL(StableDiffusion):
    pipelines = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}

    def encode(self, prompts: list[str]) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        # trained images are square crops at the training size: original size = target size, crop at the corner
        size = (noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor)
        projection = self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, noisy.dtype, text_encoder_projection_dim=projection)
        extra = {"text_embeds": conditioning["text_embeds"], "time_ids": ids.to(noisy.device).repeat(len(noisy), 1)}
        return self.model(noisy, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=extra).sample
