"""svdiff: personalize text-to-image diffusion models by training only the singular values of their weights."""

__version__ = "0.1.0"  # first, so submodules can read it while the package is importing

from .errors import SvdiffError
from .spectral import add_shifts, fuse, get_deltas, remove_shifts, set_deltas, set_scales, unfuse

__all__ = [
    "SvdiffError",
    "__version__",
    "add_shifts",
    "fuse",
    "get_deltas",
    "remove_shifts",
    "set_deltas",
    "set_scales",
    "unfuse",
]
