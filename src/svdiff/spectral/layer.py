"""Spectral shifts of one weight, in delta form.

For a matrix weight W = U·diag(σ)·Vᵀ (reshaped c_out × rest) and shift sets δ_k with scales s_k:

    W' = W + U · diag(d) · Vᵀ,    d = ReLU(σ + Σ_k s_k·δ_k) − σ

d = 0 exactly when every δ or every scale is 0, so the base weight is reproduced bit for bit and the factors may be
held in low precision (their error only touches the small update). 1-D norm weights get `w' = w + Σ_k s_k·δ_k`.

The update is applied one of two ways, whichever costs fewer FLOPs for this call:
- rebuild: ΔW = (U·d)·Vᵀ, then the layer's own op with W + ΔW (cheap when many tokens share one weight);
- factored: y = base(x) + ((x·V)·d)·Uᵀ on activations (cheap for big matrices applied to few tokens).
The rebuild path is a custom autograd function that keeps only x and d for backward (ΔW is rebuilt there), so
training holds no out × in tensor beyond the base weight; δ's gradient is diag(Uᵀ·G·V) with G the weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .basis import SpectralBasis
from .kinds import Kind


class SpectralShift(nn.Module):
    """The shift state of one target weight: frozen factors (buffers, not saved in state dicts) and named δ sets."""

    def __init__(self, kind: Kind, basis: SpectralBasis | None, length: int, factor_dtype: torch.dtype | None):
        super().__init__()
        self.kind = kind
        self.length = length  # number of δ values: min(c_out, rest) for matrices, the weight's length for 1-D
        if basis is not None:
            dtype = factor_dtype or basis.U.dtype
            self.register_buffer("U", basis.U.to(dtype), persistent=False)
            self.register_buffer("S", basis.S.float(), persistent=False)
            self.register_buffer("Vh", basis.Vh.to(dtype), persistent=False)
        self.deltas = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.original: torch.Tensor | None = None  # the base weight while fused (kept on the CPU)

    def add_set(self, name: str, device: torch.device, scale: float = 1.0) -> nn.Parameter:
        """A new zero δ set (float32 whatever the base dtype: it is what gets trained)."""
        self.deltas[name] = nn.Parameter(torch.zeros(self.length, device=device))
        self.scales[name] = float(scale)
        return self.deltas[name]

    def active(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.deltas[n], s) for n, s in self.scales.items() if s != 0.0 and n in self.deltas]

    def combined(self) -> torch.Tensor | None:
        """Σ_k s_k·δ_k in float32, or None when no set contributes (the layer is then the base layer)."""
        terms = self.active()
        if not terms:
            return None
        total = terms[0][0] * terms[0][1]
        for delta, scale in terms[1:]:
            total = total + delta * scale
        return total

    def d(self) -> torch.Tensor | None:
        """d = ReLU(σ + Σ s·δ) − σ for matrices, Σ s·δ for 1-D weights; None when nothing is active."""
        total = self.combined()
        if total is None or self.kind.is_vector:
            return total
        return F.relu(self.S + total) - self.S

    def delta_weight(self, d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ΔW in the shape and dtype of the base weight `like`."""
        if self.kind.is_vector:
            return d.to(like.dtype)
        mat = (self.U.to(like.dtype) * d.to(like.dtype)) @ self.Vh.to(like.dtype)
        return self.kind.from_matrix(mat, like.shape)

    def forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = None if self.original is not None else self.d()
        if d is None:
            return type(module).forward(module, x, *args, **kwargs)
        if self.kind.is_vector:
            return self.kind.forward(module, x, module.weight + d.to(module.weight.dtype))
        padded = self.kind.prepare(module, x)
        if self.kind.prefers_rebuild(module, self, padded, d.requires_grad and torch.is_grad_enabled()):
            return _Rebuilt.apply(padded, d, module.weight, module.bias, self, module)
        return type(module).forward(module, x, *args, **kwargs) + self.kind.factored(module, self, padded, d)


class _Rebuilt(torch.autograd.Function):
    """y = op(x, W + ΔW(d)) without keeping W + ΔW alive for backward."""

    @staticmethod
    def forward(ctx, x, d, weight, bias, shift: SpectralShift, module: nn.Module):
        w = weight + shift.delta_weight(d, weight)
        ctx.save_for_backward(x, d)
        ctx.shift, ctx.module = shift, module
        return shift.kind.forward(module, x, w)

    @staticmethod
    def backward(ctx, grad):
        x, d = ctx.saved_tensors
        shift, module = ctx.shift, ctx.module
        kind = shift.kind
        need_x, need_d, need_w, need_b = ctx.needs_input_grad[:4]
        c = kind.costs(module, shift, x, need_d) if kind.can_factor else {}
        rebuild_gx = not kind.can_factor or c["rebuild_gx"] <= c["factored_gx"]
        weight_gd = not kind.can_factor or c["weight_gd"] <= c["factored_gd"]
        w = module.weight
        if need_x and rebuild_gx:
            w = w + shift.delta_weight(d, w)
        gx, gw, gb = kind.backward(module, grad, x, w, need_x, need_w or (need_d and weight_gd), need_b)
        gd = None
        if need_x and not rebuild_gx:  # W' = W + U·diag(d)·Vᵀ: add the update's share of x's gradient
            gx = gx + kind.down_transpose(module, shift, kind.scale(kind.up_transpose(module, shift, grad), d), x)
        if need_d and weight_gd:
            g = kind.to_matrix(gw).float()
            gd = ((shift.U.float().T @ g) * shift.Vh.float()).sum(1)  # diag(Uᵀ·G·V)
        elif need_d:
            gu = kind.up_transpose(module, shift, grad)
            gd = kind.channel_sum((gu * kind.down(module, shift, x.to(gu.dtype))).float())
        return gx, gd, gw if need_w else None, gb, None, None
