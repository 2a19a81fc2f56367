"""The settings of one training run: one typed, frozen value.

Each field of `TrainConfig` carries what its command-line flag needs (group, help, choices, the range a number
must lie in) and how a resumed run treats it, so the flags of `svdiff train`, the range checks, the checkpoint's
identity and the record of a run all come from this one list. Names and defaults are diffusers' DreamBooth
scripts' where the concept is the same, plus SVDiff's own.

    config = TrainConfig(instance_data_dir="dog", instance_prompt="a photo of sks dog")
    config = resolve(config)     # checked, with what depends on other settings filled in: a new value

A value that depends on the base (the resolution) is filled in by the loop once the base is loaded, again as a
new value (`dataclasses.replace`); nothing changes a config in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import MAX_INFERENCE_STEPS, MAX_SEED, check_range
from ..errors import SvdiffError
from ..families.noise import WEIGHTING_SCHEMES
from ..flags import flag
from ..models import default_cut_mix_scale, default_guidance, embedded_name
from ..spectral.targets import preset_rule

METHODS = ("svdiff", "lora", "full")
# Per method, when --learning_rate is not given. On real bases: the paper's 1e-3 for spectral shifts, the
# DreamBooth scripts' defaults for LoRA and for full fine-tuning. On each embedded base, per method the highest
# rate of those probed at which the demo's 400 steps learn an example subject without drawing the bare class
# prompt as another class; at the real-base rates spectral shifts and full fine-tuning stop at about half the
# similarity (docs/experiments/2026-12-07-embedded-rates.md).
DEFAULT_LR = {"svdiff": 1e-3, "lora": 5e-4, "full": 5e-6}
EMBEDDED_LR = {
    "unet": {"svdiff": 1e-2, "lora": 5e-4, "full": 5e-5},
    "flow": {"svdiff": 1e-2, "lora": 1e-3, "full": 1e-4},
}


def default_learning_rate(method: str, base: str | Path | None) -> float:
    """The learning rate of `method` when none is given, on `base`."""
    name = embedded_name(base)
    return (DEFAULT_LR if name is None else EMBEDDED_LR[name])[method]


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DTYPES = ("fp32", "fp16", "bf16")
UNMIX_WEIGHT = 0.2

# How a resumed run treats a setting that differs from its checkpoint's:
SAME = "same"  # refused: the checkpoint's optimizer state, data or parameters would not fit
RECORD = "record"  # applied from the checkpoint's step on, and recorded in the summary, shift file and model card
IGNORE = "ignore"  # says how to run or where to write, not what is trained


def setting(
    group: str,
    default=None,
    help: str | None = None,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    resume: str = RECORD,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
):
    """A field of TrainConfig with what its flag and its checks need. `low`/`high` bound a number (open ends
    with `open_low`/`open_high`); None is always allowed for a field whose default is None (not set, or off)."""
    meta = dict(group=group, help=help, choices=choices, low=low, high=high, open_low=open_low)
    meta |= dict(open_high=open_high, resume=resume, metavar=metavar, aliases=aliases)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `svdiff train` takes; see `svdiff train --help` for each flag."""

    # --- model ---
    pretrained_model_name_or_path: str | None = setting(
        "model",
        None,
        "a diffusers folder or hub id of an SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1 pipeline (default: the embedded "
        "tiny pipeline)",
        resume=SAME,
        aliases=("base",),
    )
    revision: str | None = setting("model")
    variant: str | None = setting("model", None, "e.g. fp16, to load model.fp16.safetensors")
    method: str = setting(
        "model",
        "svdiff",
        "svdiff (spectral shifts), or the baselines lora (PEFT) and full (every weight)",
        choices=METHODS,
        resume=SAME,
    )
    preset: str = setting("model", "all", "which weights get shifts (see `svdiff targets --list`)", resume=SAME)
    include: tuple[str, ...] | None = setting("model", None, "keep only matching weights", metavar="REGEX", resume=SAME)
    exclude: tuple[str, ...] | None = setting("model", None, "drop matching weights", metavar="REGEX", resume=SAME)
    rank: int = setting("model", 4, "LoRA rank (--method lora)", low=1, high=4096, resume=SAME)
    train_text_encoder: bool = setting(
        "model", True, "train the text encoder too (on by default: the paper tunes it)", resume=SAME
    )
    factor_dtype: str | None = setting(
        "model",
        None,
        "how U and V are held (default: the weights' dtype; float8_e4m3fn: one byte a value with a scale per row, "
        "a quarter of fp32's memory; δ = 0 stays exact)",
        choices=(*DTYPES, "float8_e4m3fn"),
    )
    base_dtype: str | None = setting(
        "model",
        None,
        "how the frozen base's linear layers are held (default: the mixed-precision dtype; float8_e4m3fn: one byte "
        "a value with a scale per row, read back in the mixed-precision dtype per layer call; δ = 0 stays exact)",
        choices=("float8_e4m3fn",),
        resume=SAME,
    )

    # --- data ---
    instance_data_dir: str | None = setting("data", None, "folder of 3-5 images of the subject")
    instance_prompt: str | None = setting("data", None, 'e.g. "a photo of sks dog"')
    class_data_dir: str | None = setting("data", None, "class images for prior preservation (generated if missing)")
    class_prompt: str | None = setting("data", None, 'e.g. "a photo of a dog"')
    with_prior_preservation: bool = setting("data", False)
    prior_loss_weight: float = setting("data", 1.0, low=0.0, high=1e3)
    num_class_images: int = setting("data", 100, low=0, high=10**6)
    sample_batch_size: int = setting("data", 4, "batch size when generating class images", low=1, high=4096)
    concepts_list: str | None = setting(
        "data",
        None,
        "a JSON file: a list of {instance_prompt, instance_data_dir, class_prompt, class_data_dir}; "
        "one concept is drawn at random per step",
    )
    cut_mix_unmix_prob: float = setting(
        "data",
        0.6,
        "with two or more concepts: the share of steps that train on a collage of two subjects (the paper's 0.6)",
        low=0.0,
        high=1.0,
        resume=SAME,
    )
    cut_mix_scale: float | None = setting(
        "data",
        None,
        "scale of each image in a collage: 0.5 fits the whole image in a half, 1 keeps its size (its subject is "
        "moved to the middle of the half either way) (default: 1 on the embedded base, 0.5 on others)",
        low=0.5,
        high=1.0,
        resume=SAME,
    )
    cut_mix_match_background: bool = setting(
        "data",
        True,
        "pair each collage's left image with the right subject's image whose border color is nearest",
        resume=SAME,
    )
    unmix_weight: float = setting(
        "data",
        UNMIX_WEIGHT,
        "weight of the Unmix attention loss on collages (0: Cut-Mix without Unmix)",
        low=0.0,
        high=1e3,
        resume=SAME,
    )
    unmix_layers: str | None = setting(
        "data",
        None,
        "attention layers the Unmix loss watches (default: the family's, see docs/models.md)",
        metavar="REGEX",
    )
    # and, once the base is loaded, a multiple of what its denoiser needs, at most twice its size
    resolution: int | None = setting("data", None, "default: the base's native size", low=8, high=2**16)
    center_crop: bool = setting("data", False, "center crops (default: random crops)")
    random_flip: bool = setting("data", False)

    # --- optimization ---
    train_batch_size: int = setting("optimization", 1, "per process", low=1, high=4096)
    max_train_steps: int = setting("optimization", 500, low=1, high=10**8)
    gradient_accumulation_steps: int = setting("optimization", 1, low=1, high=4096)
    gradient_checkpointing: bool = setting("optimization", False)
    # The upper bounds are far above any useful value; they refuse a typo before it costs a run (a learning rate
    # of 1 already destroys what Adam trains, an ε above 1 freezes it). A rate of 0 is a frozen run: a reference
    # loss for what training gains.
    learning_rate: float | None = setting(
        "optimization",
        None,
        "default: 1e-3 for svdiff (the paper's), 5e-4 for lora, 5e-6 for full; 1e-2, 5e-4, 5e-5 on the embedded bases",
        low=0.0,
        high=1.0,
        resume=SAME,
    )
    learning_rate_1d: float = setting(
        "optimization", 1e-6, "for the shifts of 1-D (norm) weights", low=0.0, high=1.0, resume=SAME
    )
    lr_scheduler: str = setting("optimization", "constant", choices=LR_SCHEDULERS, resume=SAME)
    lr_warmup_steps: int = setting("optimization", 0, low=0, high=10**8, resume=SAME)
    lr_num_cycles: int = setting("optimization", 1, low=1, high=10**6, resume=SAME)
    lr_power: float = setting("optimization", 1.0, low=0.0, high=100.0, open_low=True, resume=SAME)
    use_8bit_adam: bool = setting("optimization", False, "bitsandbytes' AdamW8bit", resume=SAME)
    adam_beta1: float = setting("optimization", 0.9, low=0.0, high=1.0, open_high=True, resume=SAME)
    adam_beta2: float = setting("optimization", 0.999, low=0.0, high=1.0, open_high=True, resume=SAME)
    adam_weight_decay: float = setting(
        "optimization",
        0.0,
        "0 by default: decay would pull δ, and so the singular values, towards zero",
        low=0.0,
        high=10.0,
        resume=SAME,
    )
    adam_epsilon: float = setting("optimization", 1e-8, low=0.0, high=1.0, open_low=True, resume=SAME)
    max_grad_norm: float = setting("optimization", 1.0, low=0.0, high=1e6)
    snr_gamma: float | None = setting(
        "optimization", None, "Min-SNR loss weighting (5.0 is the usual choice)", low=0.0, high=1e3, open_low=True
    )
    noise_offset: float = setting("optimization", 0.0, low=0.0, high=1.0)
    # Flow-matching models (SD3, Flux): the timestep density and loss weighting of diffusers' DreamBooth scripts.
    weighting_scheme: str = setting(
        "optimization",
        "none",
        "SD3/Flux: how timesteps are drawn and the loss weighted (none: uniform; logit_normal and mode: SD3's "
        "densities; sigma_sqrt and cosmap: weightings)",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = setting("optimization", 0.0, "logit_normal's mean", low=-10.0, high=10.0)
    logit_std: float = setting("optimization", 1.0, "logit_normal's spread", low=0.0, high=10.0, open_low=True)
    mode_scale: float = setting("optimization", 1.29, "the mode density's scale", low=-10.0, high=10.0)
    guidance_scale: float | None = setting(
        "optimization",
        None,
        "Flux-dev: the guidance embedded in the transformer's input while training (default 3.5, as diffusers' "
        "Flux DreamBooth script)",
        low=0.0,
        high=100.0,
    )
    mixed_precision: str | None = setting("optimization", None, choices=("no", "fp16", "bf16"))
    seed: int = setting("optimization", 0, low=0, high=MAX_SEED, resume=SAME)

    # --- training step ---
    step_path: str = setting(
        "training step",
        "auto",
        "svdiff: merge the shifts into the weights once per step in shape groups, or apply them per layer call; "
        "auto: on a GPU times both per shape group at start-up and keeps the faster (runs may then differ in the "
        "last bits; choose one for bit-reproducible runs), on a CPU per call",
        choices=("auto", "merged", "per-call"),
    )
    compile: bool = setting(
        "training step",
        False,
        "torch.compile the denoiser (with --method svdiff, on merged weights: no graph break in the shifts)",
    )

    # --- output ---
    output_dir: str = setting("output", "svdiff-model", resume=IGNORE)
    overwrite: bool = setting(
        "output",
        False,
        "train into a folder that holds files svdiff did not write (its README.md is replaced)",
        resume=IGNORE,
    )
    save_dtype: str = setting("output", "fp16", "dtype of δ in the shift file", choices=DTYPES)
    checkpointing_steps: int | None = setting(
        "output",
        None,
        "0: never (default: every tenth of --max_train_steps, so a kill loses at most a tenth of the run)",
        low=0,
        high=10**8,
    )
    checkpoints_total_limit: int | None = setting("output", None, low=1, high=10**6)
    resume_from_checkpoint: str | None = setting("output", None, "latest, or a checkpoint-N folder", resume=IGNORE)
    validation_prompt: tuple[str, ...] | None = setting("output", None, "repeatable (default: the instance prompt)")
    num_validation_images: int = setting("output", 4, low=1, high=64)
    validation_steps: int = setting("output", 100, "0: only at the end", low=0, high=10**8)
    validation_guidance_scale: float | None = setting(
        "output", None, "default: 3 on the embedded base, 7.5 on others", low=0.0, high=100.0
    )
    validation_inference_steps: int = setting("output", 25, low=1, high=MAX_INFERENCE_STEPS)
    report_to: str = setting("output", "tensorboard", choices=("tensorboard", "wandb", "all", "none"))
    logging_dir: str = setting("output", "logs", "under --output_dir")
    progress: bool = setting("output", True, "progress bars", resume=IGNORE)

    def replace(self, **changes) -> TrainConfig:
        """A copy with some settings changed (an unknown name is a TypeError)."""
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)
# Settings that matter only with two or more subjects (collages) or only for LoRA: a checkpoint's identity
# records them only then, so a one-subject run does not depend on collage settings it never uses.
COLLAGE_SETTINGS = ("cut_mix_unmix_prob", "cut_mix_scale", "cut_mix_match_background", "unmix_weight")


def _kind(name: str) -> tuple[type, bool]:
    """(the scalar type of a field, whether it is a repeated flag)."""
    hint = _TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    inner = args[0]
    if typing.get_origin(inner) is tuple:
        return typing.get_args(inner)[0], True
    return inner, False


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `svdiff train`, one per field of TrainConfig (a `--dashed-spelling` accepted too)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, repeated = _kind(name)
        kw = dict(default=f.default, help=meta["help"])
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if kind is bool:
            # on by default: --no-… turns it off; off by default: the flag alone turns it on
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif repeated:
            kw["action"] = "append"
        else:
            kw["type"] = kind
            if meta["choices"]:
                kw["choices"] = meta["choices"]
        flag(group, name, *meta["aliases"], **kw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdiff train", description="Train spectral shifts on a few images.")
    add_train_flags(p)
    return p


def from_flags(namespace: argparse.Namespace | dict) -> TrainConfig:
    """The config of parsed flags (a namespace with other attributes too, e.g. the subcommand's, is fine)."""
    values = namespace if isinstance(namespace, dict) else vars(namespace)
    picked = {k: v for k, v in values.items() if k in FIELDS}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in picked.items()})


def to_flags(config: TrainConfig) -> list[str]:
    """The `svdiff train` flags that give `config` (those of its settings that differ from the defaults)."""
    out = []
    for name, f in FIELDS.items():
        value = getattr(config, name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, tuple):
            out += [x for item in value for x in (f"--{name}", item)]
        else:
            out += [f"--{name}", str(value)]
    return out


def resolve(config: TrainConfig) -> TrainConfig:
    """Refuses, in one line, what cannot work; returns the config with what depends on other settings filled in
    (learning rate, checkpoint interval, collage scale, validation guidance). Nothing is loaded or written."""
    c = config
    if c.concepts_list is None and (c.instance_data_dir is None or c.instance_prompt is None):
        raise SvdiffError("give --instance_data_dir and --instance_prompt (or --concepts_list)")
    if c.with_prior_preservation and c.concepts_list is None:
        if c.class_data_dir is None or c.class_prompt is None:
            raise SvdiffError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if not str(c.output_dir).strip():  # Path("") is the current folder: never a place for a run's outputs
        raise SvdiffError("--output_dir is empty")
    _check_number("max_train_steps", c.max_train_steps)
    filled = {
        # a kill, a full disk or Ctrl-C loses at most a tenth of the run
        "checkpointing_steps": max(1, math.ceil(c.max_train_steps / 10)) if c.checkpointing_steps is None else None,
        "cut_mix_scale": default_cut_mix_scale(c.pretrained_model_name_or_path) if c.cut_mix_scale is None else None,
        "learning_rate": (
            default_learning_rate(c.method, c.pretrained_model_name_or_path) if c.learning_rate is None else None
        ),
        "validation_guidance_scale": (
            default_guidance(c.pretrained_model_name_or_path) if c.validation_guidance_scale is None else None
        ),
    }
    c = c.replace(**{k: v for k, v in filled.items() if v is not None})
    for name, f in FIELDS.items():
        if f.metadata["low"] is not None:
            _check_number(name, getattr(c, name))
    preset_rule(c.preset)  # an unknown preset is refused before any model is loaded
    for pattern in (c.include or ()) + (c.exclude or ()):
        try:
            re.compile(pattern)
        except re.error as e:
            raise SvdiffError(f"bad include/exclude pattern {pattern!r}: {e}") from None
    if c.method != "svdiff" and (c.preset != "all" or c.include or c.exclude):
        raise SvdiffError("--preset/--include/--exclude choose spectral shifts: they need --method svdiff")
    if c.base_dtype and c.method != "svdiff":
        raise SvdiffError(f"--base_dtype holds a frozen base: it needs --method svdiff (--method {c.method})")
    if c.base_dtype and (c.step_path == "merged" or c.compile):
        raise SvdiffError("--base_dtype runs the shifts per layer call: drop --step_path merged and --compile")
    return c


def _check_number(name: str, value) -> None:
    f = FIELDS[name]
    if value is None and f.default is None:
        return
    m = f.metadata
    kind, _ = _kind(name)
    check_range(
        f"--{name}",
        value,
        m["low"],
        m["high"],
        low_open=m["open_low"],
        high_open=m["open_high"],
        integer=kind is int,
    )


def record(config: TrainConfig) -> dict:
    """The settings as flat scalars (what TensorBoard's hparams, checkpoints and the shift file's metadata hold):
    numbers, text and booleans as they are, anything else as JSON."""
    values = dataclasses.asdict(config)
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in sorted(values.items())}


def identity(config: TrainConfig, single_subject: bool) -> dict:
    """The settings a checkpoint must share with the run that resumes it (the `SAME` fields, as JSON values);
    the loop adds the subjects' data and prompts."""
    same = {name: getattr(config, name) for name, f in FIELDS.items() if f.metadata["resume"] == SAME}
    same.pop("pretrained_model_name_or_path")
    if config.method != "lora":
        same["rank"] = None
    if single_subject:
        same |= dict.fromkeys(COLLAGE_SETTINGS)
    return json.loads(json.dumps(same))


def changes(before: dict, config: TrainConfig) -> dict:
    """{setting: [before, now]} of what this run changes against a checkpoint's `record`, leaving out what only
    says how to run or where to write."""
    now = record(config)
    ignored = {name for name, f in FIELDS.items() if f.metadata["resume"] == IGNORE}
    return {k: [before[k], v] for k, v in now.items() if k in before and before[k] != v and k not in ignored}
