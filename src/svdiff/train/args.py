"""The flags of `svdiff train`: diffusers' DreamBooth names and defaults where the concept is the same, plus
SVDiff's own. One parser serves the command line and the library (`train_args(**overrides)`)."""

from __future__ import annotations

import argparse
import math
import re

from ..checks import MAX_INFERENCE_STEPS, MAX_SEED, check_range
from ..errors import SvdiffError

METHODS = ("svdiff", "lora", "full")
# Per method, when --learning_rate is not given: the paper's 1e-3 for spectral shifts, the DreamBooth scripts'
# defaults for LoRA and for full fine-tuning.
DEFAULT_LR = {"svdiff": 1e-3, "lora": 5e-4, "full": 5e-6}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DTYPES = ("fp32", "fp16", "bf16")
UNMIX_WEIGHT = 0.2
# What each number may be. The upper bounds are far above any useful value; they refuse a typo before it costs
# a run (a learning rate of 1 already destroys what Adam trains, an ε above 1 freezes it).
INT_RANGES = {
    "train_batch_size": (1, 4096),
    "max_train_steps": (1, 10**8),
    "gradient_accumulation_steps": (1, 4096),
    "num_validation_images": (1, 64),
    "sample_batch_size": (1, 4096),
    "rank": (1, 4096),
    "validation_inference_steps": (1, MAX_INFERENCE_STEPS),
    "validation_steps": (0, 10**8),
    "checkpointing_steps": (0, 10**8),
    "lr_warmup_steps": (0, 10**8),
    "lr_num_cycles": (1, 10**6),
    "num_class_images": (0, 10**6),
    "seed": (0, MAX_SEED),
    "checkpoints_total_limit": (1, 10**6),
    "resolution": (8, 2**16),  # and, once the base is loaded, a multiple of what its UNet needs, at most twice its size
}
OPTIONAL = frozenset({"checkpoints_total_limit", "resolution", "snr_gamma"})  # None: not set (or off)
# (low, high, "(" for an open low end, ")" for an open high end)
FLOAT_RANGES = {
    "learning_rate": (0.0, 1.0),  # 0: a frozen run, a reference loss for what training gains
    "learning_rate_1d": (0.0, 1.0),
    "prior_loss_weight": (0.0, 1e3),
    "cut_mix_unmix_prob": (0.0, 1.0),
    "cut_mix_scale": (0.5, 1.0),
    "unmix_weight": (0.0, 1e3),
    "lr_power": (0.0, 100.0, "("),
    "adam_beta1": (0.0, 1.0, ")"),
    "adam_beta2": (0.0, 1.0, ")"),
    "adam_weight_decay": (0.0, 10.0),
    "adam_epsilon": (0.0, 1.0, "("),
    "max_grad_norm": (0.0, 1e6),
    "snr_gamma": (0.0, 1e3, "("),
    "noise_offset": (0.0, 1.0),
    "validation_guidance_scale": (0.0, 100.0),
}


def _flag(p, name: str, **kw) -> None:
    """--snake_case, with the --dashed-spelling accepted too."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*names, dest=name, **kw)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    _flag(
        g,
        "pretrained_model_name_or_path",
        default=None,
        help="a diffusers Stable Diffusion folder or hub id (default: the embedded tiny pipeline)",
    )
    _flag(g, "revision", default=None)
    _flag(g, "variant", default=None, help="e.g. fp16, to load model.fp16.safetensors")
    _flag(
        g,
        "method",
        default="svdiff",
        choices=METHODS,
        help="svdiff (spectral shifts), or the baselines lora (PEFT) and full (every weight)",
    )
    _flag(g, "preset", default="all", help="which weights get shifts (see `svdiff targets --list`)")
    _flag(g, "include", action="append", default=None, metavar="REGEX", help="keep only matching weights")
    _flag(g, "exclude", action="append", default=None, metavar="REGEX", help="drop matching weights")
    _flag(g, "rank", type=int, default=4, help="LoRA rank (--method lora)")
    _flag(
        g,
        "train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the text encoder too (on by default: the paper tunes it)",
    )
    _flag(g, "factor_dtype", default=None, choices=DTYPES, help="how U and V are held (default: the weights' dtype)")

    g = p.add_argument_group("data")
    _flag(g, "instance_data_dir", default=None, help="folder of 3-5 images of the subject")
    _flag(g, "instance_prompt", default=None, help='e.g. "a photo of sks dog"')
    _flag(g, "class_data_dir", default=None, help="class images for prior preservation (generated if missing)")
    _flag(g, "class_prompt", default=None, help='e.g. "a photo of a dog"')
    _flag(g, "with_prior_preservation", action="store_true")
    _flag(g, "prior_loss_weight", type=float, default=1.0)
    _flag(g, "num_class_images", type=int, default=100)
    _flag(g, "sample_batch_size", type=int, default=4, help="batch size when generating class images")
    _flag(
        g,
        "concepts_list",
        default=None,
        help="a JSON file: a list of {instance_prompt, instance_data_dir, class_prompt, class_data_dir}; "
        "one concept is drawn at random per step",
    )
    _flag(
        g,
        "cut_mix_unmix_prob",
        type=float,
        default=0.6,
        help="with two or more concepts: the share of steps that train on a collage of two subjects (the paper's 0.6)",
    )
    _flag(
        g,
        "cut_mix_scale",
        type=float,
        default=None,
        help="scale of each image in a collage: 0.5 fits the whole image in a half, 1 keeps its size (its subject "
        "is moved to the middle of the half either way) "
        "(default: 1 on the embedded base, 0.5 on others)",
    )
    _flag(
        g,
        "cut_mix_match_background",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pair each collage's left image with the right subject's image whose border color is nearest",
    )
    _flag(
        g,
        "unmix_weight",
        type=float,
        default=UNMIX_WEIGHT,
        help="weight of the Unmix attention loss on collages (0: Cut-Mix without Unmix)",
    )
    _flag(g, "unmix_layers", default=None, metavar="REGEX", help="cross-attention layers the Unmix loss watches")
    _flag(g, "resolution", type=int, default=None, help="default: the base's native size")
    _flag(g, "center_crop", action="store_true", help="center crops (default: random crops)")
    _flag(g, "random_flip", action="store_true")

    g = p.add_argument_group("optimization")
    _flag(g, "train_batch_size", type=int, default=1, help="per process")
    _flag(g, "max_train_steps", type=int, default=500)
    _flag(g, "gradient_accumulation_steps", type=int, default=1)
    _flag(g, "gradient_checkpointing", action="store_true")
    _flag(
        g,
        "learning_rate",
        type=float,
        default=None,
        help="default: 1e-3 for svdiff (the paper's), 5e-4 for lora, 5e-6 for full",
    )
    _flag(g, "learning_rate_1d", type=float, default=1e-6, help="for the shifts of 1-D (norm) weights")
    _flag(g, "lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    _flag(g, "lr_warmup_steps", type=int, default=0)
    _flag(g, "lr_num_cycles", type=int, default=1)
    _flag(g, "lr_power", type=float, default=1.0)
    _flag(g, "use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit")
    _flag(g, "adam_beta1", type=float, default=0.9)
    _flag(g, "adam_beta2", type=float, default=0.999)
    _flag(
        g,
        "adam_weight_decay",
        type=float,
        default=0.0,
        help="0 by default: decay would pull δ, and so the singular values, towards zero",
    )
    _flag(g, "adam_epsilon", type=float, default=1e-8)
    _flag(g, "max_grad_norm", type=float, default=1.0)
    _flag(g, "snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is the usual choice)")
    _flag(g, "noise_offset", type=float, default=0.0)
    _flag(g, "mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    _flag(g, "seed", type=int, default=0)

    g = p.add_argument_group("training step")
    _flag(
        g,
        "step_path",
        default="auto",
        choices=("auto", "merged", "per-call"),
        help="svdiff: merge the shifts into the weights once per step in shape groups, or apply them per layer "
        "call; auto: on a GPU times both per shape group at start-up and keeps the faster (runs may then differ "
        "in the last bits; choose one for bit-reproducible runs), on a CPU per call",
    )
    _flag(
        g,
        "compile",
        action="store_true",
        help="torch.compile the denoiser (with --method svdiff, on merged weights: no graph break in the shifts)",
    )

    g = p.add_argument_group("output")
    _flag(g, "output_dir", default="svdiff-model")
    _flag(
        g,
        "overwrite",
        action="store_true",
        help="train into a folder that holds files svdiff did not write (its README.md is replaced)",
    )
    _flag(g, "save_dtype", default="fp16", choices=DTYPES, help="dtype of δ in the shift file")
    _flag(
        g,
        "checkpointing_steps",
        type=int,
        default=None,
        help="0: never (default: every tenth of --max_train_steps, so a kill loses at most a tenth of the run)",
    )
    _flag(g, "checkpoints_total_limit", type=int, default=None)
    _flag(g, "resume_from_checkpoint", default=None, help="latest, or a checkpoint-N folder")
    _flag(g, "validation_prompt", action="append", default=None, help="repeatable (default: the instance prompt)")
    _flag(g, "num_validation_images", type=int, default=4)
    _flag(g, "validation_steps", type=int, default=100, help="0: only at the end")
    _flag(
        g, "validation_guidance_scale", type=float, default=None, help="default: 3 on the embedded base, 7.5 on others"
    )
    _flag(g, "validation_inference_steps", type=int, default=25)
    _flag(g, "report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    _flag(g, "logging_dir", default="logs", help="under --output_dir")
    _flag(g, "progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdiff train", description="Train spectral shifts on a few images.")
    add_train_flags(p)
    return p


def train_args(**overrides) -> argparse.Namespace:
    """The training arguments with their defaults, some replaced: `train_args(instance_data_dir=…, …)`."""
    args = parser().parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"unknown training argument(s): {', '.join(sorted(unknown))}")
    vars(args).update(overrides)
    return args


def check(args: argparse.Namespace) -> None:
    """Refuse, in one line, what cannot work; fills in what depends on other flags."""
    if args.concepts_list is None and (args.instance_data_dir is None or args.instance_prompt is None):
        raise SvdiffError("give --instance_data_dir and --instance_prompt (or --concepts_list)")
    if args.with_prior_preservation and args.concepts_list is None:
        if args.class_data_dir is None or args.class_prompt is None:
            raise SvdiffError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if not str(args.output_dir).strip():  # Path("") is the current folder: never a place for a run's outputs
        raise SvdiffError("--output_dir is empty")
    check_range("--max_train_steps", args.max_train_steps, *INT_RANGES["max_train_steps"], integer=True)
    if args.checkpointing_steps is None:  # a kill, a full disk or Ctrl-C loses at most a tenth of the run
        args.checkpointing_steps = max(1, math.ceil(args.max_train_steps / 10))
    for name, (low, high) in INT_RANGES.items():
        if name not in OPTIONAL or getattr(args, name) is not None:
            check_range(f"--{name}", getattr(args, name), low, high, integer=True)
    if args.cut_mix_scale is None:
        from ..models import default_cut_mix_scale

        args.cut_mix_scale = default_cut_mix_scale(args.pretrained_model_name_or_path)
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.method]
    if args.validation_guidance_scale is None:
        from ..models import default_guidance

        args.validation_guidance_scale = default_guidance(args.pretrained_model_name_or_path)
    for name, bounds in FLOAT_RANGES.items():
        if name not in OPTIONAL or getattr(args, name) is not None:
            low, high, *open_ends = bounds
            check_range(
                f"--{name}", getattr(args, name), low, high, low_open="(" in open_ends, high_open=")" in open_ends
            )
    from ..spectral.targets import preset_rule

    preset_rule(args.preset)  # an unknown preset is refused before any model is loaded
    for pattern in (args.include or []) + (args.exclude or []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise SvdiffError(f"bad include/exclude pattern {pattern!r}: {e}") from None
    if args.method != "svdiff" and (args.preset != "all" or args.include or args.exclude):
        raise SvdiffError("--preset/--include/--exclude choose spectral shifts: they need --method svdiff")
