"""The Unmix regularizer (SVDiff §3.4): on a Cut-Mix collage, the tokens that name each subject ("sks heart":
what its instance prompt names) should attend to its own side only. An attention processor keeps the
cross-attention probabilities of a few layers; the loss is the mean square of each subject's attention (its
tokens' mean) over the other subject's half, the attention taken relative to its mean over the picture: on the
raw probabilities the loss falls as well when the names are attended to less everywhere, and training takes that
way. The whole phrase is watched, not the identifier alone: the class word after the identifier, which a causal
text encoder reads with it, names the subject too (docs/experiments/2026-12-03-multi-subject.md).

Which layers: the cross-attention layers whose maps are at most half the latent side (SD 1.x/2.x at 512 px: the
32×32, 16×16 and 8×8 ones; the embedded base: 8×8 and 4×4). Coarse maps are where a layout is decided; the finest
layers mostly refine texture and their maps are the most expensive to hold. Only these layers leave the fast
attention path, and only while training with Unmix."""

from __future__ import annotations

import contextlib
import math
import re

import torch

from ..data.cutmix import side_masks


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


def unmix_layers(unet, pattern: str | None = None) -> list[str]:
    """Names of the cross-attention modules to watch: those matching `pattern`, or by default those whose maps
    are at most half the latent side."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)]
    if pattern is not None:
        return [n for n in names if re.search(pattern, n)]
    return [n for n in names if _scale(n, len(unet.up_blocks)) >= 2]


def _scale(name: str, levels: int) -> int:
    """By how much a layer's map is smaller than the latents, from its place in an SD UNet of `levels` blocks."""
    kind, _, rest = name.partition(".")
    if kind == "mid_block":
        return 2 ** (levels - 1)
    block = int(rest.split(".")[0])
    return 2**block if kind == "down_blocks" else 2 ** (levels - 1 - block)


class Unmix:
    """Installs capture processors on the watched layers (the others keep theirs). Maps are kept only inside
    `with unmix.capturing_maps():` (a training forward, not sampling); `loss` reads and clears them."""

    def __init__(self, unet, pattern: str | None = None):
        self.sink: list[torch.Tensor] = []
        self.capturing = False
        self.layers = unmix_layers(unet, pattern)
        if not self.layers:
            raise ValueError("no cross-attention layer to watch for the Unmix loss")
        modules = dict(unet.named_modules())
        self.replaced = {name: modules[name].processor for name in self.layers}
        for name in self.layers:
            modules[name].set_processor(CaptureProcessor(self))
        self.modules = {name: modules[name] for name in self.layers}

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


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Where `word`'s tokens stand in the tokenized prompt (padded as for training)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(piece) + 1):
        if ids[i : i + len(piece)] == piece:
            return list(range(i, i + len(piece)))
    raise ValueError(f"{word!r} is not in the tokenized prompt {prompt!r}")
