"""Mixed-subject batches on whole models: which shift sets and scales each sample of a batch is drawn with. How a
shifted layer computes such a batch is `mixed.py`."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..errors import SvdiffError
from .shifts import shift_sets, shifted_modules


@contextmanager
def per_sample(models: list[nn.Module], assignment: list[dict[str, float]]):
    """Within the block, sample b of every call to `models` is shifted by the sets and scales of assignment[b]
    (an empty dict: the base). The sets must be loaded and the models not fused."""
    if not assignment:
        raise SvdiffError("a mixed batch needs at least one sample")
    known = set().union(*(shift_sets(m) for m in models))
    for entry in assignment:
        unknown = set(entry) - known
        if unknown:
            raise SvdiffError(f"no shift set named {sorted(unknown)[0]!r} is loaded")
    layers = [shift for m in models for _, shift in shifted_modules(m).values()]
    if any(shift.original is not None for shift in layers):
        raise SvdiffError("the model is fused: unfuse it before drawing a mixed batch")
    for shift in layers:
        shift.per_sample = assignment
    try:
        yield
    finally:
        for shift in layers:
            shift.per_sample = None
