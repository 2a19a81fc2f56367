"""Stable Diffusion 3/3.5: an MMDiT on patchified latents, conditioned on CLIP-L and CLIP-G penultimate states
(side by side, padded to T5's width) followed by T5's, plus both CLIPs' pooled projections; rectified flow.
T5 is never shifted (diffusers' SD3 DreamBooth script trains the CLIP encoders only); a pipeline loaded without
T5 conditions on zeros in its place, as diffusers' pipeline does, and svdiff computes those as one token
(`AbsentT5Attention`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def joint_projections(attn: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Query, key and value of an SD3 joint attention over image then text tokens, (batch, heads, tokens, dim),
    normalized as diffusers' JointAttnProcessor2_0 does."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    query, key, value = heads(attn.to_q(image)), heads(attn.to_k(image)), heads(attn.to_v(image))
    text_query, text_key = heads(attn.add_q_proj(text)), heads(attn.add_k_proj(text))
    if attn.norm_q is not None:
        query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    return (
        torch.cat([query, text_query], dim=2),
        torch.cat([key, text_key], dim=2),
        torch.cat([value, heads(attn.add_v_proj(text))], dim=2),
    )


def silent(t5) -> bool:
    """Whether a pipeline's T5 slot gives zeros whatever the prompt: no T5, or one whose final norm is zero (the
    embedded flow base's)."""
    if t5 is None:
        return True
    norm = getattr(getattr(t5, "encoder", None), "final_layer_norm", None)
    return norm is not None and not norm.weight.is_meta and not norm.weight.any()


class AbsentT5Attention:
    """Joint attention for an SD3 pipeline without T5 (or a silent one), whose text is its CLIP tokens and then
    T5_TOKENS tokens of zeros. Those are one token repeated: every op on the text stream is per token, so they stay
    equal through every block, and the image and text tokens attend to them as to one token of weight T5_TOKENS.
    So svdiff passes a single one (`max_sequence_length=1`) and this processor weighs the last text token for
    itself and the ones left out (log of their count added to its attention logits): the same result to rounding,
    at a fraction of the cost (SD3: 78 text tokens instead of 333). Given all T5_TOKENS it is diffusers' processor."""

    def __init__(self, clip_tokens: int):
        self.clip_tokens = clip_tokens

    def key_bias(self, tokens: int, text_tokens: int, device, dtype) -> torch.Tensor | None:
        """The additive attention bias over the `tokens` keys (image then text), or None when all are given."""
        weight = T5_TOKENS - (text_tokens - self.clip_tokens) + 1
        if text_tokens <= self.clip_tokens or weight == 1:
            return None
        bias = torch.zeros(1, tokens, device=device, dtype=dtype)
        bias[0, -1] = math.log(weight)
        return bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image_tokens = hidden_states.shape[1]
        query, key, value = joint_projections(attn, hidden_states, encoder_hidden_states)
        bias = self.key_bias(key.shape[2], encoder_hidden_states.shape[1], key.device, query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, text
        return image, attn.to_add_out(text)


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
        self.t5_tokens = T5_TOKENS
        if silent(pipe.text_encoder_3):
            self.t5_tokens = 1
            for module in self.model.modules():
                joint = getattr(module, "add_k_proj", None) is not None and hasattr(module, "set_processor")
                if joint and not isinstance(module.processor, AbsentT5Attention):
                    module.set_processor(AbsentT5Attention(pipe.tokenizer_max_length))

    def call_arguments(self) -> dict:
        return {"max_sequence_length": self.t5_tokens}

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
        if not silent(self.pipe.text_encoder_3):
            t5 = token_positions(self.pipe.tokenizer_3, prompt, phrase, T5_TOKENS)
            positions += [self.pipe.tokenizer_max_length + i for i in t5]
        return positions

    def image_text_attention(self, attn: torch.nn.Module, inputs: dict) -> torch.Tensor:
        image, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        query, key, _ = joint_projections(attn, image, text)
        bias = None
        if isinstance(attn.processor, AbsentT5Attention):
            bias = attn.processor.key_bias(key.shape[2], text.shape[1], key.device, key.dtype)
        probabilities = attention_probabilities(query[:, :, : image.shape[1]], key, bias)
        return probabilities[..., image.shape[1] :]

    def encode(self, prompts: list[str]) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.t5_tokens,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return self.model(hidden_states=noisy, timestep=timesteps, return_dict=False, **conditioning)[0]
