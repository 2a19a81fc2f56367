"""One way to declare a command-line flag: `--snake_case` as diffusers' scripts spell it, with the
`--dashed-spelling` accepted too."""

from __future__ import annotations

import argparse


def spellings(name: str) -> list[str]:
    """The option strings of one name: "o" → -o; "max_train_steps" → --max_train_steps, --max-train-steps."""
    if len(name) == 1:
        return [f"-{name}"]
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def flag(parser: argparse._ActionsContainer, name: str, *aliases: str, **kw) -> argparse.Action:
    """Add the flag `name` to a parser or an argument group, stored as `args.<name>`, with its dashed spelling and
    those of `aliases` (other names: "o" for -o, "pretrained_model_name_or_path" for --base's long spelling).
    `kw` goes to `add_argument` as it is."""
    names = [s for n in (name, *aliases) for s in spellings(n)]
    return parser.add_argument(*names, dest=name, **kw)


def base_flag(parser: argparse._ActionsContainer) -> argparse.Action:
    """--base, also spelled --pretrained_model_name_or_path as in diffusers' scripts: the pipeline a command runs on."""
    return flag(
        parser,
        "base",
        "pretrained_model_name_or_path",
        default=None,
        help="sd15, sd21, sdxl, sd3-medium, sd35-medium, sd35-large, flux-dev, flux-schnell (built-in "
        "architectures), a diffusers folder, a hub id, or embedded:unet / embedded:flow (the embedded tiny pipelines); "
        "default: embedded:unet",
    )
