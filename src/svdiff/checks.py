"""Ranges of the numbers a user gives: one function, so every command refuses an out-of-range, NaN or infinite
value in the same one line before any work starts."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import SvdiffError

# Above the step counts any diffusers scheduler trains with (1000), so a sampling schedule always fits.
MAX_INFERENCE_STEPS = 1000
# torch, numpy and every device generator accept seeds in this range.
MAX_SEED = 2**32 - 1
# The largest |scale| of a shift file in `generate --shifts F:S`, a `merge --weights` entry or an `--alpha`: far
# beyond any useful strength (1 is the trained one), well below what turns the weights into noise.
MAX_SCALE = 100.0


def check_range(
    flag: str,
    value,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Refuses `value` of `flag` (e.g. "--learning_rate") unless low ≤ value ≤ high (< with the *_open ends);
    NaN and ±inf are outside every range; `integer` also refuses non-integers."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
        what = "an integer in" if integer else "in"
        raise SvdiffError(f"{flag} {value} must be {what} {interval}")


def png_path(flag: str, text) -> Path:
    """A picture file to write: a name ending in .png (`dir/.png` is a hidden file without a name, refused)."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise SvdiffError(f"{flag} must name a .png file, not {str(text)!r}")
    return path


def within(a, b) -> bool:
    """Whether folder `a` is `b` or lies inside it (symbolic links followed)."""
    a, b = (Path(os.path.realpath(p)) for p in (a, b))  # realpath, unlike resolve, accepts a symlink loop
    return a == b or b in a.parents


def overlaps(a, b) -> bool:
    """Whether folders `a` and `b` are the same or one lies inside the other (symbolic links followed)."""
    return within(a, b) or within(b, a)


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
