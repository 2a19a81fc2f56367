"""Model families: SD 1.x/2.x, SDXL, SD3/3.5 and Flux.1, one file each (see base.py for what a family says)."""

from __future__ import annotations

from ..errors import SvdiffError
from .base import Family
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def _family(pipe) -> type[Family] | None:
    name = type(pipe).__name__
    return next((family for family in FAMILIES if name in family.pipelines), None)


def family_of(pipe, config=None) -> Family:
    """The family of a loaded pipeline, set up for the run's `config` (its objective's settings)."""
    family = _family(pipe)
    if family is None:
        supported = ", ".join(p for f in FAMILIES for p in f.pipelines)
        raise SvdiffError(f"{type(pipe).__name__} is not a supported pipeline; svdiff trains {supported}")
    return family(pipe, config)


def call_arguments(pipe) -> dict:
    """The keywords svdiff gives every call of `pipe` (none for a pipeline of no family)."""
    family = _family(pipe)
    return family(pipe).call_arguments() if family else {}


__all__ = ["FAMILIES", "Family", "call_arguments", "family_of"]
