"""Sampling: a diffusers pipeline for a base (the embedded one by default), deterministic images per seed, and the
shift combinations `svdiff generate` offers (several files with scales, interpolation, style mixing)."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path

import diffusers
import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import adapter_name_of, fuse, load_shifts, mixed_batch
from .checks import MAX_INFERENCE_STEPS, MAX_SCALE, MAX_SEED, check_range
from .errors import SvdiffError
from .families import call_arguments, family_of
from .models import ARCHITECTURES, SHIFTED_COMPONENTS, model_index, resolve_base

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver++": "DPMSolverMultistepScheduler",
}


def load_pipeline(base=None, *, scheduler: str = "ddim", dtype=None, device=None, revision=None, variant=None):
    """A text-to-image pipeline for `base` (None: the embedded tiny one), with the named scheduler (a flow-matching
    base, SD3 or Flux, keeps its own: the DDPM-family schedulers do not sample a flow)."""
    if scheduler not in SCHEDULERS:
        raise SvdiffError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    base = resolve_base(base)
    if str(base) in ARCHITECTURES:
        raise SvdiffError(
            f"{base} is a built-in architecture without weights (for counting); give a model folder or hub id"
        )
    # SD 1.x/2.x folders may ship a safety checker: not loaded (another model in memory, and black images)
    extra = {"safety_checker": None} if "safety_checker" in model_index(base, revision) else {}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            str(base), dtype=dtype, revision=revision, variant=variant, **extra
        )
    except Exception as e:  # a missing folder, a hub id offline, a broken checkpoint: one line
        raise SvdiffError(f"cannot load pipeline {base}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):  # flow models keep their own
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_sampling(num_inference_steps: int, guidance_scale: float | None = None, eta: float = 0.0, seed: int = 0):
    """Refuses sampling settings no scheduler can run, or that give noise instead of an image."""
    check_range("--num_inference_steps", num_inference_steps, 1, MAX_INFERENCE_STEPS, integer=True)
    if guidance_scale is not None:
        check_range("--guidance_scale", guidance_scale, 0.0, 100.0)
    check_range("--eta", eta, 0.0, 1.0)
    check_range("--seed", seed, 0, MAX_SEED, integer=True)


def sample(pipe, prompt: str, **settings) -> list:
    """`num_images` images of `prompt`; image i always comes from seed + i, whatever the batch size. `settings` are
    `sample_per_prompt`'s keywords."""
    return sample_per_prompt(pipe, [prompt], **settings)[0]


def sample_per_prompt(
    pipe,
    prompts: list[str],
    shift_sets: list[dict[str, float]] | None = None,
    *,
    num_images: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list]:
    """`num_images` images of each prompt, image i of every prompt from seed + i, whatever the batch size. With
    `shift_sets` ({set name: scale} per prompt) each prompt is drawn with its own loaded, unfused shift sets, the
    prompts sharing batches (`mixed_batch`): one pipeline call per batch, whatever its subjects."""
    if not prompts or any(not prompt.strip() for prompt in prompts):
        raise SvdiffError("the prompt is empty")
    if shift_sets is not None and len(shift_sets) != len(prompts):
        raise SvdiffError(f"{len(prompts)} prompts but {len(shift_sets)} shift sets: give one per prompt")
    check_sampling(num_inference_steps, guidance_scale, eta, seed)
    jobs = [(p, seed + i) for p in range(len(prompts)) for i in range(num_images)]
    family_arguments = call_arguments(pipe)
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        mixed = mixed_batch(pipe, [shift_sets[p] for p, _ in chunk]) if shift_sets is not None else nullcontext()
        with mixed:
            pixels = pipe(
                [prompts[p] for p, _ in chunk],
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=height,
                width=width,
                output_type="np",
                **eta_argument(pipe, eta),
                **family_arguments,
            ).images
        images += pipe.numpy_to_pil(finite_images(pixels))
    return [images[p * num_images : (p + 1) * num_images] for p in range(len(prompts))]


def eta_argument(pipe, eta: float) -> dict:
    """DDIM's η (η > 0 adds noise) as a keyword for pipelines that take it; flow pipelines (SD3, Flux) take none."""
    return {"eta": eta} if "eta" in inspect.signature(pipe.__call__).parameters else {}


def finite_images(pixels):
    """The decoded batch, refused if it holds NaN or inf: saved as PNG it would be a black picture, exit 0."""
    if not np.isfinite(pixels).all():
        raise SvdiffError(
            "the model produced NaN or infinite pixels: the shifts (or their scales) are too large for this base"
        )
    return pixels


def parse_shift_arg(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE."""
    path, sep, scale = text.rpartition(":")
    if not sep:
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        raise SvdiffError(f"--shifts {text!r}: the scale after ':' is not a number") from None
    check_range(f"--shifts {path}: the scale", value, -MAX_SCALE, MAX_SCALE)
    return Path(path), value


def apply_shifts(
    pipe, shifts=(), interpolate=None, alpha: float = 0.5, style_mix=None, cache: bool = True, fused: bool = True
) -> dict:
    """Load the requested shift files onto `pipe`, then fuse them (unless `fused` is False: a mixed batch needs
    them apart); returns {name: scale} of what was loaded, in order.

    shifts: [(file, scale)]; interpolate: (A, B) at alpha·A + (1 − alpha)·B (Eq. 5); style_mix: {"geometry": A,
    "appearance": B} takes the geometry layers from A and all others from B."""
    loaded = {}

    def load(path, scale, **kw):
        name = f"{len(loaded)}:{adapter_name_of(path)}"
        loaded[load_shifts(pipe, path, name, scale, cache=cache, progress=False, **kw)] = scale

    for path, scale in shifts:
        load(path, scale)
    if interpolate:
        a, b = interpolate
        load(a, alpha)
        load(b, 1.0 - alpha)
    if style_mix:
        unknown = set(style_mix) - {"geometry", "appearance"}
        if unknown or len(style_mix) != 2:
            raise SvdiffError("--style_mix takes geometry=FILE appearance=FILE")
        geometry = family_of(pipe).geometry_layers()
        load(style_mix["geometry"], 1.0, include=geometry)
        load(style_mix["appearance"], 1.0, exclude=geometry)
    if fused:
        fuse(pipe)
    return loaded


def apply_trained(pipe, weights: str | Path, method: str = "svdiff") -> None:
    """Puts what `svdiff train` wrote onto `pipe`: a shift file (fused), a LoRA file, or the fully fine-tuned
    components saved beside `<output_dir>/unet/`."""
    weights = Path(weights)
    if method == "svdiff":
        apply_shifts(pipe, [(weights, 1.0)])
    elif method == "lora":
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    elif method == "full":
        folder = weights.parent.parent
        for name in SHIFTED_COMPONENTS:  # the denoiser and the text encoders a full fine-tuning wrote
            if (folder / name).is_dir():
                module = getattr(pipe, name)
                setattr(pipe, name, type(module).from_pretrained(folder / name).to(pipe.device, module.dtype))
    else:
        raise SvdiffError(f"unknown method {method!r}")
