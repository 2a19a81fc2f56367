"""The Unmix regularizer (SVDiff §3.4): on a Cut-Mix collage, the tokens that name each subject ("sks heart":
what its instance prompt names) should attend to its own side only. An attention processor keeps the
cross-attention probabilities of a few layers; the loss is the mean square of each subject's attention (its
tokens' mean) over the other subject's half, the attention taken relative to its mean over the picture: on the
raw probabilities the loss falls as well when the names are attended to less everywhere, and training takes that
way. The whole phrase is watched, not the identifier alone: the class word after the identifier, which a causal
text encoder reads with it, names the subject too (docs/experiments/2026-12-03-multi-subject.md).

Which layers the family says (`Family.unmix_layers`): on a UNet the coarse cross-attention layers, which leave
the fast attention path while training with Unmix; on SD3 and Flux, whose attention is joint over image and text
tokens, the image-query-to-text-key part of chosen blocks' attention, recomputed from the block's own inputs
(the block itself keeps its fast path)."""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.cutmix import side_masks
from ..families import Family


class CaptureProcessor:
    """diffusers' plain cross-attention; while its owner captures, the softmax probabilities are kept in the
    owner's sink (batch × heads × pixels × tokens) for the loss of the current forward."""

    def __init__(self, owner: Unmix):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        probs = attn.get_attention_scores(query, key, mask)
        if self.owner.capturing:
            self.owner.sink.append(probs.view(batch, attn.heads, *probs.shape[1:]))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class Unmix:
    """Watches the family's Unmix layers. Maps are kept only inside `with unmix.capturing_maps():` (a training
    forward, not sampling); `loss` reads and clears them."""

    def __init__(self, family: Family, pattern: str | None = None):
        self.sink: list[torch.Tensor] = []
        self.capturing = False
        self.layers = family.unmix_layers(pattern)
        if not self.layers:
            raise ValueError("no attention layer to watch for the Unmix loss")
        modules = dict(family.model.named_modules())
        self.modules = {name: modules[name] for name in self.layers}
        self.replaced, self.hooks = {}, []
        for name, module in self.modules.items():
            if family.cross_attention:
                self.replaced[name] = module.processor
                module.set_processor(CaptureProcessor(self))
            else:
                self.hooks.append(module.register_forward_pre_hook(self._joint(family), with_kwargs=True))

    def _joint(self, family: Family):
        def capture(module, args, kwargs):
            if self.capturing:
                self.sink.append(family.image_text_attention(module, kwargs))

        return capture

    @contextlib.contextmanager
    def capturing_maps(self):
        self.sink.clear()
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    def clear(self) -> None:
        self.sink.clear()

    def remove(self) -> None:
        """Puts the layers' own processors back."""
        for name, processor in self.replaced.items():
            self.modules[name].set_processor(processor)
        for hook in self.hooks:
            hook.remove()
        self.sink.clear()

    def loss(self, tokens: list[tuple[int, list[int], list[int]] | None], latent_size: tuple[int, int]) -> torch.Tensor:
        """Mean over watched layers and collage examples of MSE(A_left ⊙ M_right, 0) + MSE(A_right ⊙ M_left, 0),
        A being a subject's attention (mean over heads and its tokens) divided by its mean over the picture, and M
        a half of the picture.
        `tokens[b]` is (b, left subject's token positions, right subject's) for a collage example."""
        maps, self.sink[:] = list(self.sink), []
        examples = [t for t in tokens if t is not None]
        if not examples or not maps:
            return torch.zeros((), device=maps[0].device if maps else "cpu")
        total = 0.0
        for probs in maps:
            pixels = probs.shape[2]
            s = math.isqrt(latent_size[0] * latent_size[1] // pixels)
            h, w = latent_size[0] // s, latent_size[1] // s
            left_mask, right_mask = side_masks(h, w).flatten(1).to(probs)
            for b, left, right in examples:
                a_left = _relative(probs[b][..., left].mean(dim=(0, 2)))  # pixels
                a_right = _relative(probs[b][..., right].mean(dim=(0, 2)))
                total = total + (a_left * right_mask).square().mean() + (a_right * left_mask).square().mean()
        return total / (len(maps) * len(examples))


def _relative(attention: torch.Tensor) -> torch.Tensor:
    """A token's attention over the pixels divided by its mean: where the token looks, whatever its strength. On
    the raw probabilities the loss is also lowered by a token that is attended to less everywhere."""
    return attention / attention.mean().clamp_min(1e-12)
