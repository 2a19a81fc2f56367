"""Weights held in one byte: float8 values with a float32 scale per row, read back in a 16-bit dtype.

The SVD factors can be held so (`--factor_dtype float8_e4m3fn`), and so can a frozen base's linear layers
(`--base_dtype float8_e4m3fn`, `hold_in_fp8`): half of bf16's memory, which is what puts a 12 B Flux and its
training state on a 48 GB card. The delta form keeps δ = 0 exact whatever the precision: the update
U·diag(0)·Vᵀ is zero, and the layer computes with exactly the weight the base computes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_fp8(t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (2-D) as float8 values and a float32 scale per row, the row's largest magnitude at fp8's largest."""
    scale = t.detach().abs().amax(dim=1).float().clamp_min(1e-30) / torch.finfo(dtype).max
    return (t.detach().float() / scale[:, None]).to(dtype), scale


def from_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return values.to(dtype) * scale[:, None].to(dtype)


class HeldLinear(nn.Linear):
    """A frozen nn.Linear whose weight is held in fp8 (`weight_fp8`, `weight_scale`). `weight` reads it back in the
    dtype it had, so code that reads a layer's weight works unchanged; the forward reads it back per call and its
    backward again, so no 16-bit copy of the weight outlives the call."""

    @property
    def weight(self) -> torch.Tensor:
        return from_fp8(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HeldLinearFn.apply(x, self.weight_fp8, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts the bias (and the compute dtype) but keeps the fp8 values and their scales."""
        kept = {"weight_fp8": self.weight_fp8.dtype, "weight_scale": torch.float32}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            self._buffers[name] = self._buffers[name].to(dtype)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", held={self.weight_fp8.dtype}"


class _HeldLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, scale, bias):
        ctx.save_for_backward(values, scale)
        ctx.has_bias = bias is not None and bias.requires_grad
        return F.linear(x, from_fp8(values, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        values, scale = ctx.saved_tensors
        gx = grad @ from_fp8(values, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return gx, None, None, gb


@torch.no_grad()
def hold_in_fp8(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Holds every frozen nn.Linear of `model` in fp8 (in place; a shifted layer keeps its shifts, whose factors
    were taken from the full-precision weight). Returns how many layers it converted."""
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.requires_grad:
            continue
        weight = module._parameters.pop("weight")
        values, scale = to_fp8(weight, dtype)
        module.register_buffer("weight_fp8", values)
        module.register_buffer("weight_scale", scale)
        module.compute_dtype = weight.dtype
        module.__class__ = HeldLinear
        count += 1
    return count
