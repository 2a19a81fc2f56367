"""svdiff: personalize text-to-image diffusion models by training only the singular values of their weights."""

__version__ = "0.1.0"  # first, so submodules can read it while the package is importing

from .adapters import fuse, load_shifts, mixed_batch, set_scales, shift_sets_of, unfuse, unload_shifts
from .errors import SvdiffError
from .models import default_base
from .spectral import add_shifts, get_deltas, remove_shifts, set_deltas

__all__ = [
    "SvdiffError",
    "__version__",
    "add_shifts",
    "default_base",
    "fuse",
    "get_deltas",
    "load_shifts",
    "mixed_batch",
    "remove_shifts",
    "set_deltas",
    "set_scales",
    "shift_sets_of",
    "unfuse",
    "unload_shifts",
]
