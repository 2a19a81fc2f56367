"""Stable Diffusion 3/3.5: an MMDiT on patchified latents, conditioned on CLIP-L and CLIP-G penultimate states
(side by side, padded to T5's width) followed by T5's, plus both CLIPs' pooled projections; rectified flow.
T5 is never shifted (diffusers' SD3 DreamBooth script trains the CLIP encoders only); a pipeline loaded without
T5 conditions on zeros in its place, as diffusers' pipeline does."""

from __future__ import annotations

import torch

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

T5_TOKENS = 256  # StableDiffusion3Pipeline's default T5 length


class StableDiffusion3(FlowTransformer):
    pipelines = ("StableDiffusion3Pipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets = {
        "transformer": JOINT_ATTENTION + CONTEXT_ATTENTION,
        "text_encoder": CLIP_ATTENTION,
        "text_encoder_2": CLIP_ATTENTION,
    }

    def __init__(self, pipe, config=None):
        super().__init__(pipe, config)
        self.patch = pipe.transformer.config.patch_size

    def geometry_layers(self) -> list[str]:
        return first_half(self.model, ("transformer_blocks",))

    def set_sampling_timesteps(self, steps: int, latents: torch.Tensor) -> None:
        scheduler, extra = self.pipe.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting"):  # SD3.5's schedule depends on the image's token count
            extra["mu"] = dynamic_shift(
                scheduler, (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)
            )
        scheduler.set_timesteps(steps, device=latents.device, **extra)

    def unmix_layers(self, pattern: str | None = None) -> list[str]:
        # by default the first half of the blocks, where the layout is decided (the geometry of style mixing)
        names = [f"transformer_blocks.{i}.attn" for i in range(len(self.model.transformer_blocks))]
        return select(names, pattern, names[: len(names) // 2 or 1])

    def text_positions(self, prompt: str, phrase: str) -> list[int]:
        # the joint sequence's text: the CLIP tokens (CLIP-L and CLIP-G side by side), then T5's
        positions = token_positions(self.pipe.tokenizer, prompt, phrase)
        if self.pipe.text_encoder_3 is not None:
            t5 = token_positions(self.pipe.tokenizer_3, prompt, phrase, T5_TOKENS)
            positions += [self.pipe.tokenizer_max_length + i for i in t5]
        return positions

    def image_text_attention(self, attn: torch.nn.Module, inputs: dict) -> torch.Tensor:
        # as diffusers' JointAttnProcessor2_0: (batch, heads, tokens, dim), image tokens before text tokens
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        image, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        query, key, text_key = heads(attn.to_q(image)), heads(attn.to_k(image)), heads(attn.add_k_proj(text))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        return attention_probabilities(query, torch.cat([key, text_key], dim=2))[..., key.shape[2] :]

    def encode(self, prompts: list[str]) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return self.model(hidden_states=noisy, timestep=timesteps, return_dict=False, **conditioning)[0]
