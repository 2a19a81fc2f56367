"""What each kind of target layer needs: its weight as a c_out × rest matrix, its op with a given weight, that op's
backward, the factored update on activations, and the FLOPs that decide how each call applies the update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd


class Route(Enum):
    """How a call applies W' = W + U·diag(d)·Vᵀ to activations (forward) or to their gradient (grad_x):
    REBUILD   the layer's op with W + ΔW, ΔW = (U·d)·Vᵀ (forward); g through W + ΔW, rebuilt again (grad_x)
    FACTORED  op(x, W) + ((x·V)·d)·Uᵀ (forward); g through W, plus ((g·U)·d)·Vᵀ (grad_x)
    SPECTRAL  ((x·V)·(σ + d))·Uᵀ (forward); ((g·U)·(σ + d))·Vᵀ (grad_x): the base op not run at all"""

    REBUILD = "rebuild"
    FACTORED = "factored"
    SPECTRAL = "spectral"


class DeltaGrad(Enum):
    """How a call computes δ's gradient: WEIGHT, diag(Uᵀ·G·V) from the weight gradient G; FACTORED,
    Σ (g·U) ⊙ (x·V)."""

    WEIGHT = "weight"
    FACTORED = "factored"


@dataclass(frozen=True)
class Plan:
    """How one call applies W' = W + U·diag(d)·Vᵀ: its forward and x's gradient each take a `Route`, δ's gradient a
    `DeltaGrad`.

    Every route but SPECTRAL is exact. SPECTRAL (forward and grad_x together) computes with U·diag(σ)·Vᵀ in
    place of W, equal to it up to the factorization's round-off; it is only chosen while δ trains, with float32
    or float64 factors and activations, so a δ of zero still reproduces the base layer bit for bit everywhere
    else (inference, fused weights, low-precision runs). It spares a convolution's weight gradient: x·V is
    V's convolution, which the forward computes anyway, and Σ (g·U) ⊙ (x·V) then costs almost nothing.
    """

    forward: Route
    grad_x: Route
    grad_delta: DeltaGrad


SPECTRAL = Plan(Route.SPECTRAL, Route.SPECTRAL, DeltaGrad.FACTORED)
# On a CPU, a convolution with V's filters over at most UNFOLD_POSITIONS output positions and with at least
# UNFOLD_VALUES filter values runs as a product of unfolded patches (`Conv._unfolds`; benchmarks/conv_paths.py).
UNFOLD_POSITIONS = 64
UNFOLD_VALUES = 1 << 23


class Kind:
    is_vector = False
    can_factor = True

    def to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)

    def from_matrix(self, mat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return mat.reshape(shape)

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def plan(self, module, shift, x: torch.Tensor, train: bool) -> Plan:
        """The cheapest way to apply the update in this call (see `Plan`), by FLOPs added to the frozen layer.

        With m × n the matrix, r its rank and t the tokens: rebuilding ΔW costs R = 2mnr, a product of
        activations with U costs A = 2tmr and with V costs B = 2trn, the weight gradient (or the base op) G = 2tmn."""
        m, n, r = shift.U.shape[0], shift.Vh.shape[1], shift.length
        t = self.tokens(module, x)
        need_x = x.requires_grad and torch.is_grad_enabled()
        R, A, B, G = 2 * m * n * r, 2 * t * m * r, 2 * t * r * n, 2 * t * m * n

        def cost(p: Plan) -> int:
            if p.forward is Route.SPECTRAL:  # replaces the base op (and its x-gradient); g·U serves δ's gradient
                return (A + B - G) * (2 if need_x else 1) + (0 if need_x else A)
            total = R if p.forward is Route.REBUILD else A + B
            if need_x:
                total += R if p.grad_x is Route.REBUILD else A + B  # g·U (kept for δ) then (g·U·d)·Vᵀ
            if train and p.grad_delta is DeltaGrad.WEIGHT:
                total += G + R  # diag(Uᵀ·G·V)
            elif train:  # Σ (g·U) ⊙ (x·V): reuse g·U from grad_x and x·V from a factored forward
                reused_gu = need_x and p.grad_x is Route.FACTORED
                total += (0 if reused_gu else A) + (0 if p.forward is Route.FACTORED else B)
            return total

        choices = (Route.REBUILD, Route.FACTORED) if self.can_factor else (Route.REBUILD,)
        grads = (DeltaGrad.WEIGHT, DeltaGrad.FACTORED) if self.can_factor else (DeltaGrad.WEIGHT,)
        plans = [Plan(f, gx, gd) for f in choices for gx in choices for gd in grads]
        precise = (torch.float32, torch.float64)
        if self.can_factor and train and shift.U.dtype in precise and x.dtype in precise:
            plans.append(SPECTRAL)
        return min(plans, key=cost)

    def factored(self, module, shift, x, d):
        return self.up(module, shift, self.scale(self.down(module, shift, x), d))


class Linear(Kind):
    def tokens(self, module, x):
        return x.numel() // module.in_features

    def forward(self, module, x, w):
        return F.linear(x, w, module.bias)

    def backward(self, module, g, x, w, need_x, need_w, need_b):
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ w.to(g.dtype)).reshape(x.shape) if need_x else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]).to(g.dtype) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gx, gw, gb

    def scale(self, h, d):
        return h * _cast(d, h.dtype)

    def down(self, module, shift, x):  # x·V
        return F.linear(x, _cast(shift.Vh, x.dtype))

    def up(self, module, shift, h, bias=None):  # h·Uᵀ (+ bias)
        return F.linear(h, _cast(shift.U, h.dtype), None if bias is None else _cast(bias, h.dtype))

    def up_transpose(self, module, shift, g):  # g·U
        return g @ _cast(shift.U, g.dtype)

    def down_transpose(self, module, shift, gh, x):  # gradient of x·V with respect to x
        return gh @ _cast(shift.Vh, gh.dtype)

    def channel_sum(self, h):
        return h.reshape(-1, h.shape[-1]).sum(0)


class Conv(Kind):
    """Conv1d/2d/3d (reshaped c_out × c_in·k…) and ConvTranspose (reshaped along its output dim)."""

    def __init__(self, module: _ConvNd):
        self.transposed = isinstance(module, _ConvTransposeNd)
        self.dims = len(module.kernel_size)
        # The factored path needs a plain convolution with V's filters followed by a 1×1 convolution with U.
        self.can_factor = not self.transposed and module.groups == 1
        # A 1×1 convolution with stride 1 and no padding is one matrix product over all positions.
        ones = all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
        self.pointwise = self.can_factor and ones and (isinstance(module.padding, str) or not any(module.padding))

    def to_matrix(self, w):
        return (w.transpose(0, 1) if self.transposed else w).flatten(1)

    def from_matrix(self, mat, shape):
        if self.transposed:
            return mat.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
        return mat.reshape(shape)

    def _explicit_padding(self, module) -> bool:
        return module.padding_mode != "zeros" or isinstance(module.padding, str)

    def prepare(self, module, x):
        """Apply non-zero padding modes and string padding ('same', 'valid') up front, as torch itself does for
        non-zero modes, so every op below takes int padding."""
        if not self._explicit_padding(module):
            return x
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)

    def _padding(self, module):
        return (0,) * self.dims if self._explicit_padding(module) else module.padding

    def tokens(self, module, x):
        spatial = math.prod(x.shape[-self.dims :]) // math.prod(module.stride)
        return max(1, spatial * (x.numel() // math.prod(x.shape[-self.dims - 1 :])))

    def forward(self, module, x, w):
        padding = self._padding(module)
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
            return fn(
                x,
                w,
                module.bias,
                module.stride,
                padding,
                module.output_padding,
                module.groups,
                module.dilation,
            )
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, w, module.bias, module.stride, padding, module.dilation, module.groups)

    def backward(self, module, g, x, w, need_x, need_w, need_b):
        out_pad = module.output_padding if self.transposed else (0,) * self.dims
        bias_sizes = [w.shape[1] * module.groups if self.transposed else w.shape[0]] if need_b else None
        return torch.ops.aten.convolution_backward(
            g,
            x.to(g.dtype),
            w.to(g.dtype),
            bias_sizes,
            module.stride,
            self._padding(module),
            module.dilation,
            self.transposed,
            out_pad,
            module.groups,
            [need_x, need_w, need_b],
        )

    def _filters(self, module, shift, dtype):
        return _cast(shift.Vh, dtype).reshape(shift.length, *module.weight.shape[1:])

    def _mix(self, mat, h, bias=None):
        """A 1×1 convolution with the matrix `mat` (out × in channels): one matrix product over all positions."""
        y = _per_image(_cast(mat, h.dtype), h.flatten(2))
        if bias is not None:
            y = y + _cast(bias, h.dtype)[:, None]
        return y.view(h.shape[0], mat.shape[0], *h.shape[2:])

    def scale(self, h, d):
        return h * _cast(d, h.dtype).reshape(1, -1, *(1,) * self.dims)

    def _unfolds(self, module, shift, x) -> bool:
        """Whether V's convolution runs as one matrix product over unfolded patches: 2-D, on a CPU, a large filter
        bank over few output positions (all images together). There oneDNN, torch's CPU convolution, re-lays out
        the whole bank on every call, which costs 1.6–4× the product at SD's deepest layers (8×8 and 4×4 at
        256 px); smaller banks it keeps in cache, and it is faster."""
        return (
            self.dims == 2
            and x.device.type == "cpu"
            and shift.Vh.numel() >= UNFOLD_VALUES
            and self.tokens(module, x) <= UNFOLD_POSITIONS
        )

    def _patches(self, module):  # F.unfold's arguments, in this order
        return {
            "kernel_size": module.kernel_size,
            "dilation": module.dilation,
            "padding": self._padding(module),
            "stride": module.stride,
        }

    def down(self, module, shift, x):  # convolution with V's filters
        if self.pointwise:
            return self._mix(shift.Vh, x)
        if self._unfolds(module, shift, x):
            patches = self._patches(module)
            h = _per_image(_cast(shift.Vh, x.dtype), F.unfold(x, **patches))
            size = [
                (n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, k, d, p, s in zip(x.shape[-2:], *patches.values(), strict=True)
            ]
            return h.view(x.shape[0], shift.length, *size)
        return (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1](
            x,
            self._filters(module, shift, x.dtype),
            None,
            module.stride,
            self._padding(module),
            module.dilation,
        )

    def up(self, module, shift, h, bias=None):  # 1×1 convolution with U (+ bias)
        return self._mix(shift.U, h, bias)

    def up_transpose(self, module, shift, g):  # 1×1 convolution with Uᵀ
        return self._mix(shift.U.T, g)

    def down_transpose(self, module, shift, gh, x):
        if self.pointwise:
            return self._mix(shift.Vh.T, gh)
        if self._unfolds(module, shift, x):  # the adjoint of unfolding is folding
            patches = _per_image(_cast(shift.Vh, gh.dtype).T, gh.flatten(2))
            return F.fold(patches, x.shape[-2:], **self._patches(module))
        filters = self._filters(module, shift, gh.dtype)
        return torch.ops.aten.convolution_backward(
            gh,
            x.to(gh.dtype),
            filters,
            None,
            module.stride,
            self._padding(module),
            module.dilation,
            False,
            (0,) * self.dims,
            1,
            [True, False, False],
        )[0]

    def channel_sum(self, h):
        return h.transpose(0, 1).reshape(h.shape[1], -1).sum(1)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype. On every layer's path, where even a no-op `.to()` costs a call."""
    return t if t.dtype == dtype else t.to(dtype)


def _per_image(mat: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """mat · flat[b] for every image b of flat (B × in × positions). One image is a plain matrix product:
    torch.matmul would broadcast it to a batched product, slower on CPUs."""
    return (mat @ flat[0])[None] if flat.shape[0] == 1 else torch.matmul(mat, flat)


class Embedding(Kind):
    """Rows of the table are looked up, so the update is looked up too: W'[i] = W[i] + (U[i]·d)·Vᵀ."""

    def factored(self, module, shift, x, d):
        rows = F.embedding(x, shift.U).to(module.weight.dtype)
        return (rows * d.to(rows.dtype)) @ shift.Vh.to(rows.dtype)


class Norm(Kind):
    """1-D scale of a normalization layer: a full-length additive shift, no SVD. torch's norms run their
    functional op; a library's own norm (diffusers' RMSNorm in SD3's qk-norm, T5's layer norm) runs its own
    forward with the shifted scale in place of its weight, so its numerics are exactly its own."""

    is_vector = True
    can_factor = False

    def forward(self, module, x, w):
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, w, module.bias, module.eps)
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, w, module.bias, module.eps)
        if isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, w, module.eps)
        weight = module._parameters["weight"]
        module._parameters["weight"] = w  # as torch.func.functional_call does, without its module-tree walk
        try:
            return type(module).forward(module, x)
        finally:
            module._parameters["weight"] = weight


NORMS = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _is_library_norm(module: nn.Module) -> bool:
    """A normalization layer of another library, known by what every one of them shares: "Norm" in its class
    name, a 1-D scale `weight`, no submodules but its own shift state (diffusers' AdaLayerNorm* hold a Linear
    and a norm: not one)."""
    return (
        "Norm" in type(module).__name__
        and set(module._modules) <= {"spectral_shift"}
        and isinstance(module._parameters.get("weight"), nn.Parameter)
    )


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of `module`'s `weight` as a shift target, or None if it is not one."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return Linear()
    if isinstance(module, _ConvNd):
        return Conv(module)
    if isinstance(module, nn.Embedding):
        return Embedding() if module.max_norm is None else None  # max_norm renormalizes rows in place
    if (isinstance(module, NORMS) or _is_library_norm(module)) and weight.ndim == 1:
        return Norm()
    return None
