"""What each kind of target layer needs: its weight as a c_out × rest matrix, its op with a given weight, that op's
backward, the factored update on activations, and the FLOPs that decide between rebuilding and factoring."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd


class Kind:
    is_vector = False
    can_factor = True

    def to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)

    def from_matrix(self, mat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return mat.reshape(shape)

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def costs(self, module, shift, x: torch.Tensor, train: bool) -> dict[str, int]:
        """FLOPs each way of applying the update adds to this call on top of the frozen layer: forward, and when
        training the backward too. The rebuild path's backward has its own two choices, taken the same way:
        x's gradient from the rebuilt W' ("rebuild_gx") or from W plus a factored correction, and δ's gradient
        as diag(Uᵀ·G·V) from the weight gradient G ("weight_gd") or from the factored activations."""
        m, n, r = shift.U.shape[0], shift.Vh.shape[1], shift.length
        t = self.tokens(module, x)
        need_x = x.requires_grad and torch.is_grad_enabled()
        act = 2 * t * r * (m + n)  # x·V and h·Uᵀ (or g·U and gh·V in backward)
        c = {
            "rebuild_gx": 2 * m * n * r,
            "factored_gx": act,
            "weight_gd": 2 * t * m * n + 2 * m * n * r,
            "factored_gd": act,
        }
        c["rebuild"] = 2 * m * n * r + need_x * min(c["rebuild_gx"], c["factored_gx"])
        c["rebuild"] += train * min(c["weight_gd"], c["factored_gd"])
        c["factored"] = act + need_x * act + (train and not need_x) * 2 * t * m * r
        return c

    def prefers_rebuild(self, module, shift, x: torch.Tensor, train: bool) -> bool:
        """Rebuild ΔW = (U·d)·Vᵀ, or apply ((x·V)·d)·Uᵀ on activations: whichever adds fewer FLOPs."""
        if not self.can_factor:
            return True
        c = self.costs(module, shift, x, train)
        return c["rebuild"] < c["factored"]

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
        return h * d.to(h.dtype)

    def down(self, module, shift, x):  # x·V
        return x @ shift.Vh.to(x.dtype).T

    def up(self, module, shift, h):  # h·Uᵀ
        return h @ shift.U.to(h.dtype).T

    def up_transpose(self, module, shift, g):  # g·U
        return g @ shift.U.to(g.dtype)

    def down_transpose(self, module, shift, gh, x):  # gradient of x·V with respect to x
        return gh @ shift.Vh.to(gh.dtype)

    def channel_sum(self, h):
        return h.reshape(-1, h.shape[-1]).sum(0)


class Conv(Kind):
    """Conv1d/2d/3d (reshaped c_out × c_in·k…) and ConvTranspose (reshaped along its output dim)."""

    def __init__(self, module: _ConvNd):
        self.transposed = isinstance(module, _ConvTransposeNd)
        self.dims = len(module.kernel_size)
        # The factored path needs a plain convolution with V's filters followed by a 1×1 convolution with U.
        self.can_factor = not self.transposed and module.groups == 1

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
        return shift.Vh.to(dtype).reshape(shift.length, *module.weight.shape[1:])

    def _pointwise(self, u, dtype):
        return u.to(dtype).reshape(*u.shape, *(1,) * self.dims)

    def _conv(self):
        return (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]

    def scale(self, h, d):
        return h * d.to(h.dtype).reshape(1, -1, *(1,) * self.dims)

    def down(self, module, shift, x):  # convolution with V's filters
        return self._conv()(
            x,
            self._filters(module, shift, x.dtype),
            None,
            module.stride,
            self._padding(module),
            module.dilation,
        )

    def up(self, module, shift, h):  # 1×1 convolution with U
        return self._conv()(h, self._pointwise(shift.U, h.dtype))

    def up_transpose(self, module, shift, g):  # 1×1 convolution with Uᵀ
        return self._conv()(g, self._pointwise(shift.U.T, g.dtype))

    def down_transpose(self, module, shift, gh, x):
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


class Embedding(Kind):
    """Rows of the table are looked up, so the update is looked up too: W'[i] = W[i] + (U[i]·d)·Vᵀ."""

    def prefers_rebuild(self, module, shift, x, train):
        return False

    def factored(self, module, shift, x, d):
        rows = F.embedding(x, shift.U).to(module.weight.dtype)
        return (rows * d.to(rows.dtype)) @ shift.Vh.to(rows.dtype)


class Norm(Kind):
    """1-D scale of GroupNorm / LayerNorm / RMSNorm: a full-length additive shift, no SVD."""

    is_vector = True
    can_factor = False

    def forward(self, module, x, w):
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, w, module.bias, module.eps)
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, w, module.bias, module.eps)
        return F.rms_norm(x, module.normalized_shape, w, module.eps)


NORMS = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


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
    if isinstance(module, NORMS) and weight.ndim == 1:
        return Norm()
    return None
