"""Spectral shifts of one weight, in delta form.

For a matrix weight W = U·diag(σ)·Vᵀ (reshaped c_out × rest) and shift sets δ_k with scales s_k:

    W' = W + U · diag(d) · Vᵀ,    d = ReLU(σ + Σ_k s_k·δ_k) − σ

d = 0 exactly when every δ or every scale is 0, so the base weight is reproduced bit for bit and the factors may be
held in low precision (their error only touches the small update). 1-D norm weights get `w' = w + Σ_k s_k·δ_k`.

The update is applied the way that costs fewest FLOPs for this call (`kinds.Plan`): rebuild ΔW = (U·d)·Vᵀ and run
the layer's op with W + ΔW (cheap when many tokens share one weight), or work on activations,
y = op(x, W) + ((x·V)·d)·Uᵀ (cheap for big matrices applied to few tokens); the backward makes the same kind of
choice for x's gradient and for δ's, diag(Uᵀ·G·V) from the weight gradient G or Σ (g·U) ⊙ (x·V). While δ trains
with float32 factors, a layer may also run on its factors alone, y = ((x·V)·(σ + d))·Uᵀ (see `kinds.Plan`). One
autograd function does all of it and keeps only x, d, σ + d and x·V for backward, so training holds no out × in
tensor beyond the base weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import mixed
from .basis import SpectralBasis
from .fp8 import FP8, from_fp8, to_fp8
from .kinds import SPECTRAL, Conv, DeltaGrad, Embedding, Kind, Plan, Route


class SpectralShift(nn.Module):
    """The shift state of one target weight: frozen factors (buffers, not saved in state dicts) and named δ sets."""

    def __init__(self, kind: Kind, basis: SpectralBasis | None, length: int, factor_dtype: torch.dtype | None):
        super().__init__()
        self.kind = kind
        self.length = length  # number of δ values: min(c_out, rest) for matrices, the weight's length for 1-D
        if basis is not None:
            dtype = factor_dtype or basis.U.dtype
            for name, factor in (("U", basis.U), ("Vh", basis.Vh)):
                if dtype in FP8:  # one byte a value and a scale per row; read back as bf16 (see __getattr__)
                    values, scale = to_fp8(factor, dtype)
                    self.register_buffer(f"{name}_fp8", values, persistent=False)
                    self.register_buffer(f"{name}_scale", scale, persistent=False)
                else:
                    self.register_buffer(name, factor.to(dtype), persistent=False)
            self.register_buffer("S", basis.S.float(), persistent=False)
        self.deltas = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.original: torch.Tensor | None = None  # the base weight while fused (kept on the CPU)
        self.per_sample: list[dict[str, float]] | None = None  # sets and scales per sample of a mixed batch
        self._plans: dict[tuple, Plan] = {}

    def __getattr__(self, name: str):
        # Factors held in fp8 are read as bf16 rows times their scales, wherever U or Vh is used; δ = 0 stays
        # bit-exact whatever their precision (the update is U·diag(0)·Vᵀ = 0), and their error only touches ΔW.
        if name in ("U", "Vh"):
            buffers = self.__dict__["_buffers"]
            if f"{name}_fp8" in buffers:
                return from_fp8(buffers[f"{name}_fp8"], buffers[f"{name}_scale"])
        return super().__getattr__(name)

    def add_set(self, name: str, device: torch.device, scale: float = 1.0) -> nn.Parameter:
        """A new zero δ set (float32 whatever the base dtype: it is what gets trained)."""
        self.deltas[name] = nn.Parameter(torch.zeros(self.length, device=device))
        self.scales[name] = float(scale)
        return self.deltas[name]

    def active(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.deltas[n], s) for n, s in self.scales.items() if s != 0.0]

    def combined(self) -> torch.Tensor | None:
        """Σ_k s_k·δ_k in float32, or None when no set contributes (the layer is then the base layer)."""
        terms = self.active()
        if not terms:
            return None
        total = terms[0][0] if terms[0][1] == 1.0 else terms[0][0] * terms[0][1]
        for delta, scale in terms[1:]:
            total = total + delta * scale
        return total

    def diagonal_change(self) -> torch.Tensor | None:
        """d, what the active sets add on the diagonal: to the singular values for matrices, d = ReLU(σ + Σ s·δ) − σ
        (so W' = W + U·diag(d)·Vᵀ); to the weight itself for 1-D weights, d = Σ s·δ. None when nothing is active."""
        total = self.combined()
        if total is None or self.kind.is_vector:
            return total
        return self.spectrum(total) - self.S

    def spectrum(self, total: torch.Tensor) -> torch.Tensor:
        """The shifted singular values σ + d = ReLU(σ + total)."""
        return F.relu(self.S + total)

    def delta_weight(self, d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ΔW in the shape and dtype of the base weight `like`."""
        if self.kind.is_vector:
            return d.to(like.dtype)
        mat = (self.U.to(like.dtype) * d.to(like.dtype)) @ self.Vh.to(like.dtype)
        return self.kind.from_matrix(mat, like.shape)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()` move σ and δ but keep them in float32: d = ReLU(σ + δ) − σ cancels
        catastrophically in half precision. Factors held in fp8 stay fp8 (their values are exact in any wider
        float, so a cast there and back loses nothing)."""
        keep = {"S": getattr(self, "S", None)} | {f"d.{k}": p.data for k, p in self.deltas.items()}
        fp8 = {k: b.dtype for k, b in self._buffers.items() if k.endswith("_fp8")}
        super()._apply(fn, recurse)
        if keep["S"] is not None:
            self.S = keep["S"].to(self.S.device)
        for k, p in self.deltas.items():
            p.data = keep[f"d.{k}"].to(p.device)
        for k, dtype in fp8.items():
            self._buffers[k] = self._buffers[k].to(dtype)
        return self

    def forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.per_sample is not None:
            return mixed.forward(self, module, x, *args, **kwargs)
        total = self.combined()
        if total is None:
            return type(module).forward(module, x, *args, **kwargs)
        if self.kind.is_vector:
            return self.kind.forward(module, x, module.weight + total.to(module.weight.dtype))
        if isinstance(self.kind, Embedding):  # a lookup: the update is looked up too
            d = self.spectrum(total) - self.S
            return type(module).forward(module, x, *args, **kwargs) + self.kind.factored(module, self, x, d)
        unbatched = isinstance(self.kind, Conv) and x.dim() == self.kind.dims + 1
        x = self.kind.prepare(module, x.unsqueeze(0) if unbatched else x)
        train = total.requires_grad and torch.is_grad_enabled()
        key = (x.shape, x.requires_grad and torch.is_grad_enabled(), train)
        plan = self._plans.get(key)
        if plan is None:  # the choice depends on shapes and on what needs a gradient only: made once per kind of call
            plan = self._plans[key] = self.kind.plan(module, self, x, train)
        y = _Shifted.apply(x, total, module.weight, module.bias, self, module, plan)
        return y.squeeze(0) if unbatched else y


class _Shifted(torch.autograd.Function):
    """y = op(x, W + U·diag(d)·Vᵀ), d = ReLU(σ + total) − σ, computed and differentiated as `plan` says (the ReLU
    inside, so a layer adds one node to the autograd graph). Only x, d, σ + d and (for a factored forward) x·V are
    kept for backward: never an out × in tensor beyond the base weight."""

    @staticmethod
    def forward(ctx, x, total, weight, bias, shift: SpectralShift, module: nn.Module, plan: Plan):
        kind = shift.kind
        shifted = shift.spectrum(total)
        d = None if plan == SPECTRAL else shifted - shift.S  # a layer run on its factors alone needs only σ + d
        h = None
        if plan.forward is Route.REBUILD:
            y = kind.forward(module, x, weight + shift.delta_weight(d, weight))
        elif plan.forward is Route.SPECTRAL:
            h = kind.down(module, shift, x)
            y = kind.up(module, shift, kind.scale(h, shifted), bias)
        else:
            h = kind.down(module, shift, x)
            y = kind.forward(module, x, weight) + kind.up(module, shift, kind.scale(h, d))
        ctx.save_for_backward(x, d, shifted, h if plan.grad_delta is DeltaGrad.FACTORED else None)
        ctx.shift, ctx.module, ctx.plan = shift, module, plan
        return y

    @staticmethod
    def backward(ctx, grad):
        x, d, shifted, h = ctx.saved_tensors
        shift, module, plan = ctx.shift, ctx.module, ctx.plan
        kind = shift.kind
        need_x, need_d, need_w, need_b = ctx.needs_input_grad[:4]
        weight_gd = need_d and plan.grad_delta is DeltaGrad.WEIGHT
        w = module.weight
        if need_x and plan.grad_x is Route.REBUILD:
            w = w + shift.delta_weight(d, w)
        base_x = need_x and plan.grad_x is not Route.SPECTRAL  # x's gradient through the base op
        gx = gw = gb = gu = None
        if base_x or need_w or weight_gd or need_b:
            gx, gw, gb = kind.backward(module, grad, x, w, base_x, need_w or weight_gd, need_b)
        if need_x and plan.grad_x is Route.SPECTRAL:
            gu = kind.up_transpose(module, shift, grad)
            gx = kind.down_transpose(module, shift, kind.scale(gu, shifted), x)
        elif need_x and plan.grad_x is Route.FACTORED:
            gu = kind.up_transpose(module, shift, grad)
            gx = gx + kind.down_transpose(module, shift, kind.scale(gu, d), x)
        gd = None
        if weight_gd:
            # diag(Uᵀ·G·V) in the gradient's dtype (tensor cores under bf16/fp16), summed in float32
            g = kind.to_matrix(gw)
            gd = ((shift.U.to(g.dtype).T @ g) * shift.Vh.to(g.dtype)).sum(1, dtype=torch.float32)
        elif need_d:
            gu = kind.up_transpose(module, shift, grad) if gu is None else gu
            h = kind.down(module, shift, x.to(gu.dtype)) if h is None else h
            gd = kind.channel_sum((gu * h).float())
        if gd is not None:
            gd = torch.where(shifted > 0, gd, 0.0)  # through the ReLU
        return gx, gd, gw if need_w else None, gb, None, None, None
