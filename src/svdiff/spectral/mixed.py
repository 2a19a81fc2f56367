"""Mixed-subject batches in one layer: each sample of one batch with its own shift sets and scales, in one forward
(`batches.per_sample` says which sample gets which).

Sample b gets d_b = ReLU(σ + Σ_k s_bk·δ_k) − σ, applied on the activation path, where a per-sample d costs what a
shared one costs: y_b = op(x_b, W) + ((x_b·V)·d_b)·Uᵀ for linear and conv layers, the looked-up rows for
embeddings, and for norms norm(x_b)·(w + Σ s_bk·δ_k) + bias. Layers that cannot be factored (grouped or transposed
convs) run each sample's own W + ΔW on its part of the batch.

The assignment lists one entry per sample; a call whose batch is a multiple of it repeats it (classifier-free
guidance runs the unconditional half and the conditional half as one batch), and a batch of one (CLIP's position
ids) is broadcast to every sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SvdiffError
from .kinds import Conv, Embedding, Norm


def _totals(shift, assignment: list[dict[str, float]]) -> torch.Tensor | None:
    """Σ_k s_bk·δ_k per sample (n × length, float32), or None when no sample shifts this layer."""
    if not any(s for entry in assignment for name, s in entry.items() if name in shift.deltas):
        return None
    device = next(iter(shift.deltas.values())).device
    rows = []
    for entry in assignment:
        row = torch.zeros(shift.length, device=device)
        for name, s in entry.items():
            if name in shift.deltas and s != 0.0:
                row = row + shift.deltas[name] * s
        rows.append(row)
    return torch.stack(rows)


def _rows(totals: torch.Tensor, batch: int, broadcast: bool = False) -> torch.Tensor:
    """Each sample's row for a call of `batch` samples; `broadcast`: a batch of one is every sample's."""
    n = totals.shape[0]
    if broadcast and batch == 1:
        return totals
    if batch % n:
        raise SvdiffError(f"a batch of {batch} cannot hold a mixed batch of {n} samples")
    return totals.repeat(batch // n, 1)


def _along(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """rows (B × C) shaped to broadcast over `like` with C along `dim`."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = rows.shape[0], rows.shape[1]
    return rows.to(like.dtype).reshape(shape)


def forward(shift, module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`module`'s output for a mixed batch (see the module docstring)."""
    totals = _totals(shift, shift.per_sample)
    base = type(module).forward
    if totals is None:
        return base(module, x, *args, **kwargs)
    kind = shift.kind
    if isinstance(kind, Embedding):
        rows = _rows(totals, x.shape[0], broadcast=True)
        d = F.relu(shift.S + rows) - shift.S
        looked = F.embedding(x, shift.U).to(module.weight.dtype)
        return base(module, x, *args, **kwargs) + (looked * _along(d, looked, -1)) @ shift.Vh.to(looked.dtype)
    if isinstance(kind, Norm) and isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.RMSNorm):
        rows = _rows(totals, x.shape[0])
        w = module.weight + rows.to(module.weight.dtype)
        if isinstance(module, nn.GroupNorm):
            y = F.group_norm(x, module.num_groups, None, None, module.eps) * _along(w, x, 1)
            return y if module.bias is None else y + _along(module.bias[None], x, 1)
        if isinstance(module, nn.LayerNorm):
            y = F.layer_norm(x, module.normalized_shape, None, None, module.eps) * _along(w, x, -1)
            return y if module.bias is None else y + module.bias
        return F.rms_norm(x, module.normalized_shape, None, module.eps) * _along(w, x, -1)
    unbatched = isinstance(kind, Conv) and x.dim() == kind.dims + 1
    xb = x.unsqueeze(0) if unbatched else x
    rows = _rows(totals, xb.shape[0])
    if kind.is_vector or not kind.can_factor:  # each sample's own weight on its part of the batch
        y = _per_group(shift, module, xb, rows)
        return y.squeeze(0) if unbatched else y
    xb = kind.prepare(module, xb)
    d = F.relu(shift.S + rows) - shift.S
    h = kind.down(module, shift, xb)
    update = kind.up(module, shift, h * _along(d, h, 1 if isinstance(kind, Conv) else -1))
    y = kind.forward(module, xb, module.weight) + update
    return y.squeeze(0) if unbatched else y


def _per_group(shift, module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    kind = shift.kind
    x = kind.prepare(module, x)
    outputs = [None] * x.shape[0]
    for row in torch.unique(rows, dim=0):
        idx = (rows == row).all(1).nonzero().flatten()
        d = row if kind.is_vector else F.relu(shift.S + row) - shift.S
        y = kind.forward(module, x[idx], module.weight + shift.delta_weight(d, module.weight))
        for j, i in enumerate(idx.tolist()):
            outputs[i] = y[j]
    return torch.stack(outputs)
