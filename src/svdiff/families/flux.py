"""Flux.1 dev/schnell: double- and single-stream transformer blocks on latents packed 2×2 into tokens, conditioned
on T5's hidden states and CLIP-L's pooled output, with rotary position ids for text and image tokens and, on dev,
the guidance scale as an embedded input; rectified flow. T5 is never shifted; diffusers' Flux DreamBooth script
trains the CLIP encoder at most, and so does svdiff."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb

from .base import select, token_positions
from .sd import CLIP_ATTENTION
from .transformer import (
    CONTEXT_ATTENTION,
    JOINT_ATTENTION,
    FlowTransformer,
    attention_probabilities,
    dynamic_shift,
    first_half,
)

# diffusers' Flux DreamBooth LoRA targets: attention of both streams and the feed-forwards.
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
# diffusers' Flux DreamBooth default for the guidance embedded in Flux-dev's input.
GUIDANCE = 3.5
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default


class Flux(FlowTransformer):
    pipelines = ("FluxPipeline",)
    text_encoders = ("text_encoder",)
    patch = 2
    lora_targets = {"transformer": JOINT_ATTENTION + CONTEXT_ATTENTION + FEED_FORWARD, "text_encoder": CLIP_ATTENTION}

    def __init__(self, pipe, config=None):
        super().__init__(pipe, config)
        given = getattr(config, "guidance_scale", None)
        self.guidance = GUIDANCE if given is None else given

    def embeds_guidance(self) -> bool:
        return bool(self.model.config.guidance_embeds)

    def geometry_layers(self) -> list[str]:
        return first_half(self.model, ("transformer_blocks", "single_transformer_blocks"))

    def set_sampling_timesteps(self, steps: int, latents: torch.Tensor) -> None:
        # FluxPipeline's schedule: σ evenly from 1 to 1/steps, shifted by μ of the packed token count
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = dynamic_shift(self.pipe.scheduler, (latents.shape[-2] // 2) * (latents.shape[-1] // 2), max_shift=1.15)
        self.pipe.scheduler.set_timesteps(sigmas=sigmas, device=latents.device, mu=mu)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latents, *latents.shape)

    def native_resolution(self) -> int:
        # Flux's transformer config has no sample size: the pipeline's default (1024 px on the real model)
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def unmix_layers(self, pattern: str | None = None) -> list[str]:
        # by default the double-stream blocks, where text keeps a stream of its own; single-stream ones by pattern
        double = [f"transformer_blocks.{i}.attn" for i in range(len(self.model.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}.attn" for i in range(len(self.model.single_transformer_blocks))]
        return select(double + single, pattern, double)

    def text_positions(self, prompt: str, phrase: str) -> list[int]:
        return token_positions(self.pipe.tokenizer_2, prompt, phrase, MAX_SEQUENCE_LENGTH)

    def image_text_attention(self, attn: torch.nn.Module, inputs: dict) -> torch.Tensor:
        # as diffusers' FluxAttnProcessor: text tokens before image tokens, rotary embedding on both; a
        # single-stream block gets them already joined, its first MAX_SEQUENCE_LENGTH tokens the text
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        query, key = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
        words = MAX_SEQUENCE_LENGTH
        if text is not None:
            words = text.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), key], dim=1)
        rotary = inputs.get("image_rotary_emb")
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        return attention_probabilities(query[:, :, words:], key)[..., :words]

    def encode(self, prompts: list[str]) -> dict:
        # T5 padded to FluxPipeline's default 512 tokens: Flux attends to the padding too, so training, inversion
        # and sampling must see the same length
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompts, None, device=self.model.device, num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        b, c, h, w = noisy.shape
        packed = self.pipe._pack_latents(noisy, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = None
        if self.embeds_guidance():
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = self.model(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            img_ids=img_ids,
            return_dict=False,
            **conditioning,
        )[0]
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * factor, w * factor, factor)
