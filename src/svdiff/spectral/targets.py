"""Which weights get spectral shifts: every supported `weight`, narrowed by a preset and include/exclude regexes.

The presets are the parameter subsets of the SVDiff paper's Table 1, written for diffusers' UNet naming
(`down_blocks.*`, `mid_block.*`, `up_blocks.*`, cross-attention = the `attn2` module: to_q, to_k, to_v, to_out),
plus the ones a transformer denoiser needs: `attn` and `mlp` by layer role in diffusers' SD3/Flux naming (the
context stream's `add_*_proj`/`to_add_out`, `ff_context`, Flux's single-block `proj_mlp`/`proj_out`) and block
ranges (`blocks:0-9`, `single:10-37`). Presets naming blocks or attention select nothing in a model without
them; `all` and the dimension presets (1-D, 2-D, 4-D, `norm`) select by what a weight is, in any model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import SvdiffError
from .kinds import Kind, kind_of

_CA = re.compile(r"(^|\.)attn2\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_CA_KV = re.compile(r"(^|\.)attn2\.(to_k|to_v)\.weight$")
_ATTN = re.compile(
    r"\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|q_proj|k_proj|v_proj|out_proj)\.weight$"
)
_MLP = re.compile(
    r"\.((ff|ff_context)\.net\.(0\.proj|2)|mlp\.fc[12]|proj_mlp)\.weight$|^single_transformer_blocks\.\d+\.proj_out\.weight$"
)
# preset "<range>:A-B" -> the module prefix whose numbered blocks A..B it selects
RANGES = {
    "blocks": ("transformer_blocks.", "transformer blocks A to B (Flux: double-stream; SD3: MMDiT), e.g. blocks:0-9"),
    "single": ("single_transformer_blocks.", "Flux single-stream blocks A to B, e.g. single:0-18"),
}
_RANGE = re.compile(r"^(\w+):(\d+)-(\d+)$")


def _block(prefix: str, ca: bool = False) -> Callable[[str, int], bool]:
    return lambda name, ndim: name.startswith(prefix) and (not ca or bool(_CA.search(name)))


PRESETS: dict[str, tuple[Callable[[str, int], bool], str]] = {
    "all": (lambda name, ndim: True, "every weight: linear, conv, embedding, norm scales"),
    "unet-ca": (lambda name, ndim: bool(_CA.search(name)), "cross-attention q, k, v, out (attn2)"),
    "unet-ca-kv": (lambda name, ndim: bool(_CA_KV.search(name)), "cross-attention k and v"),
    "attn": (
        lambda name, ndim: bool(_ATTN.search(name)),
        "attention q, k, v, out of the denoiser and the text encoder (the layers LoRA adapts)",
    ),
    "mlp": (lambda name, ndim: bool(_MLP.search(name)), "feed-forward layers of the denoiser and the text encoder"),
    "norm": (lambda name, ndim: ndim == 1, "norm scales (1-D weights; the same as unet-1d)"),
    "unet-1d": (lambda name, ndim: ndim == 1, "1-D weights (norm scales)"),
    "unet-2d": (lambda name, ndim: ndim == 2, "2-D weights (linear layers)"),
    "unet-4d": (lambda name, ndim: ndim == 4, "4-D weights (conv kernels)"),
    "up": (_block("up_blocks."), "the up blocks"),
    "down": (_block("down_blocks."), "the down blocks"),
    "mid": (_block("mid_block."), "the mid block"),
    "up-ca": (_block("up_blocks.", ca=True), "cross-attention of the up blocks"),
    "down-ca": (_block("down_blocks.", ca=True), "cross-attention of the down blocks"),
    "mid-ca": (_block("mid_block.", ca=True), "cross-attention of the mid block"),
}


@dataclass
class Target:
    name: str  # the model's parameter name, e.g. "down_blocks.0.resnets.0.conv1.weight"
    module: nn.Module
    kind: Kind

    @property
    def length(self) -> int:
        """Number of δ values: one per singular value, or one per element of a 1-D weight."""
        w = self.module.weight
        return w.shape[0] if self.kind.is_vector else min(self.kind.to_matrix(w).shape)


def preset_rule(preset: str) -> Callable[[str, int], bool]:
    """The test a preset puts to each (parameter name, ndim); an unknown preset is a one-line error."""
    if preset in PRESETS:
        return PRESETS[preset][0]
    m = _RANGE.match(preset)
    if m and m[1] in RANGES and int(m[2]) <= int(m[3]):
        prefix, first, last = RANGES[m[1]][0], int(m[2]), int(m[3])
        block = re.compile(rf"^{re.escape(prefix)}(\d+)\.")

        def keep(name: str, ndim: int) -> bool:
            hit = block.match(name)
            return hit is not None and first <= int(hit[1]) <= last

        return keep
    ranges = ", ".join(f"{r}:A-B" for r in RANGES)
    raise SvdiffError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}, {ranges}")


def find_targets(
    model: nn.Module, preset: str = "all", include: list[str] | None = None, exclude: list[str] | None = None
) -> list[Target]:
    """The shift targets of `model` in module order. `include` keeps only names matching one of its regexes,
    `exclude` drops names matching any of its regexes (both `re.search` on the parameter name)."""
    keep = preset_rule(preset)
    try:
        inc = [re.compile(p) for p in include or []]
        exc = [re.compile(p) for p in exclude or []]
    except re.error as e:
        raise SvdiffError(f"bad include/exclude pattern {e.pattern!r}: {e}") from None
    targets, seen = [], set()
    for module_name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None or id(module.weight) in seen:  # a tied weight is shifted once, where it first appears
            continue
        seen.add(id(module.weight))
        name = f"{module_name}.weight" if module_name else "weight"
        if not keep(name, module.weight.ndim):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        targets.append(Target(name, module, kind))
    return targets
