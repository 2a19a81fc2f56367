"""Stable parameter names: the names of the published checkpoints, whatever library version is installed.

transformers 5 flattened `CLIPTextModel` (`encoder.layers.0…`), while every published SD text encoder, every
LoRA tool and transformers 4 name its weights `text_model.encoder.layers.0…`. Files svdiff writes use the published
names; reading maps a name onto the model's live one, so files written with or without the level load under
either version.
"""

from __future__ import annotations

from torch import nn

# Classes whose published checkpoints nest every weight under this level, which some library versions drop.
NESTED = {"CLIPTextModel": "text_model"}


def checkpoint_prefix(model: nn.Module) -> str:
    """The level (with its dot) the published checkpoints of `model` have and its installed class lacks, or ''."""
    level = NESTED.get(type(model).__name__)
    return f"{level}." if level and not hasattr(model, level) else ""


def checkpoint_name(model: nn.Module, live: str) -> str:
    """The published name of `model`'s parameter `live`."""
    return checkpoint_prefix(model) + live


def live_name(model: nn.Module, stored: str, live: set[str] | dict) -> str:
    """The name in `live` (the model's own names) that `stored`, written with or without the level, stands for;
    `stored` itself when none fits (the caller reports it as unknown)."""
    if stored in live:
        return stored
    level = NESTED.get(type(model).__name__)
    if level:
        bare = stored.removeprefix(f"{level}.")
        for candidate in (bare, f"{level}.{bare}"):
            if candidate in live:
                return candidate
    return stored


def bare_name(model: nn.Module, live: str) -> str:
    """`model`'s parameter `live` without the level, as transformers 5 names it."""
    level = NESTED.get(type(model).__name__)
    return live.removeprefix(f"{level}.") if level else live
