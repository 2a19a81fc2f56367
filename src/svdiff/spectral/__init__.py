"""The math of spectral shifts. Imports torch only (no diffusers, no transformers)."""

from .basis import SpectralBasis, decompose
from .cache import SVDCache, cache_dir
from .layer import SpectralShift
from .shifts import (
    add_shifts,
    fingerprint,
    fuse,
    get_deltas,
    remove_shifts,
    set_deltas,
    set_scales,
    shift_sets,
    shifted_modules,
    unfuse,
)
from .targets import PRESETS, Target, find_targets

__all__ = [
    "PRESETS",
    "SVDCache",
    "SpectralBasis",
    "SpectralShift",
    "Target",
    "add_shifts",
    "cache_dir",
    "decompose",
    "find_targets",
    "fingerprint",
    "fuse",
    "get_deltas",
    "remove_shifts",
    "set_deltas",
    "set_scales",
    "shift_sets",
    "shifted_modules",
    "unfuse",
]
