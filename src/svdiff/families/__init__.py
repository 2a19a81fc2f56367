"""Model families: SD 1.x/2.x, SDXL, SD3/3.5 and Flux.1, one file each (see base.py for what a family says)."""

from __future__ import annotations

from ..errors import SvdiffError
from .base import Family
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def family_of(pipe, config=None) -> Family:
    """The family of a loaded pipeline, set up for the run's `config` (its objective's settings)."""
    name = type(pipe).__name__
    for family in FAMILIES:
        if name in family.pipelines:
            return family(pipe, config)
    supported = ", ".join(p for f in FAMILIES for p in f.pipelines)
    raise SvdiffError(f"{name} is not a supported pipeline; svdiff trains {supported}")


def call_arguments(pipe) -> dict:
    """The keywords svdiff gives every call of `pipe` (none for a pipeline of no family)."""
    known = any(type(pipe).__name__ in family.pipelines for family in FAMILIES)
    return family_of(pipe).call_arguments() if known else {}


__all__ = ["FAMILIES", "Family", "call_arguments", "family_of"]
