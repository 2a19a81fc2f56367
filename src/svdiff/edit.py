"""Single-image editing (SVDiff §4, "CoSINE"): fine-tune spectral shifts on one image and the caption that
describes it, then sample with an edited caption. DDIM inversion conditioned on the target caption (Eq. 6) starts
sampling from the image's own noise map; DDIM η and a spherical interpolation towards fresh noise (Eq. 7) loosen
it for structural edits."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .checks import check_range, png_path
from .data.images import open_image, to_model_input
from .errors import SvdiffError
from .families import Family, family_of
from .families.noise import RectifiedFlow
from .pictures import grid
from .sample import apply_trained, check_sampling, eta_argument, load_pipeline
from .train import train
from .train.recipes import single_image

# Fine-tuning steps of `svdiff edit`; benchmarks/edit.py measures what they give on the embedded base.
DEFAULT_EDIT_STEPS = 400


def slerp(alpha: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 7: sin((1−α)φ)/sin φ · a + sin(αφ)/sin φ · b, with φ the angle between the flattened tensors.
    α = 0 gives a, α = 1 gives b; nearly parallel tensors fall back to linear interpolation."""
    if not 0.0 <= alpha <= 1.0:
        raise SvdiffError(f"--slerp_alpha {alpha} is outside [0, 1]")
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm())
    phi = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(phi)) < 1e-6:
        return ((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    out = (torch.sin((1 - alpha) * phi) * a.double() + torch.sin(alpha * phi) * b.double()) / torch.sin(phi)
    return out.to(a.dtype)


def _noise_estimate(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The noise the model sees in `x` at the level alpha_bar its timestep stands for."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x
    if prediction_type == "sample":
        return (x - alpha_bar.sqrt() * out) / (1 - alpha_bar).sqrt()
    raise SvdiffError(f"unknown prediction type {prediction_type!r}")


@torch.no_grad()
def invert(family: Family, latents: torch.Tensor, prompt: str, num_inference_steps: int, progress: bool = False):
    """The noise map that sampling `prompt` in `num_inference_steps` steps turns into `latents` on the family's
    pipeline: DDIM inversion (Eq. 6) on SD and SDXL, the reversed Euler ODE of the flow on SD3 and Flux.
    Conditioned on `prompt` with guidance 1 (Flux-dev: the family's embedded guidance, which sampling must use
    too); each step mirrors a sampling step with the model evaluated at the latent in hand (the usual
    approximation), so sampling the result with the same prompt and steps returns close to `latents`."""
    family.set_sampling_timesteps(num_inference_steps, latents)
    conditioning = family.encode([prompt])
    if isinstance(family.noise, RectifiedFlow):
        return _flow_invert(family, latents, conditioning, progress)
    return _ddim_invert(family, latents, conditioning, progress)


def _ddim_invert(family, latents, conditioning, progress: bool):
    scheduler = family.pipe.scheduler
    alphas = scheduler.alphas_cumprod.to(latents.device)
    x = latents
    level = scheduler.final_alpha_cumprod.to(latents.device)  # where DDIM sampling's last step lands
    for t in tqdm(scheduler.timesteps.flip(0), desc="inverting", disable=not progress):
        out = family.predict(x, t, conditioning)
        eps = _noise_estimate(out, x, alphas[t], scheduler.config.prediction_type)
        clean = (x - (1 - level).sqrt() * eps) / level.sqrt()
        x = alphas[t].sqrt() * clean + (1 - alphas[t]).sqrt() * eps
        level = alphas[t]
    return x


def _flow_invert(family, latents, conditioning, progress: bool):
    # Euler sampling steps x ← x + (σ_next − σ)·v(x, σ) from σ = 1 down to 0; inverted, from 0 up to 1
    scheduler = family.pipe.scheduler
    sigmas, timesteps = scheduler.sigmas.to(latents.device), scheduler.timesteps
    x = latents
    for i in tqdm(reversed(range(len(timesteps))), desc="inverting", disable=not progress, total=len(timesteps)):
        v = family.predict(x, timesteps[i].expand(len(x)), conditioning)
        x = x + (sigmas[i] - sigmas[i + 1]) * v
    return x


@torch.no_grad()
def encode_image(pipe, image: Image.Image, resolution: int) -> torch.Tensor:
    pixels = to_model_input(image, resolution)[None].to(pipe.device, pipe.vae.dtype)
    return family_of(pipe).latents(pixels)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A 3 × H × W tensor in [-1, 1] as an RGB image."""
    return Image.fromarray(((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def open_edit_image(image: str | Path | Image.Image) -> Image.Image:

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return open_image(Path(image))  # its error names the file and the reason


def fine_tune(
    image: Image.Image,
    source_prompt: str,
    output_dir: Path,
    *,
    base=None,
    method: str = "svdiff",
    max_train_steps: int = DEFAULT_EDIT_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """§4.1: the single (image, caption) pair, no identifier and no prior term (λ = 0); lr 1e-3 for matrices and
    1e-6 for 1-D weights (the paper's, on every base). Center crops and no flips keep the image as it is."""

    with tempfile.TemporaryDirectory() as folder:
        image.save(Path(folder) / "image.png")
        return train(
            single_image(
                folder,
                source_prompt,
                pretrained_model_name_or_path=None if base is None else str(base),
                method=method,
                max_train_steps=max_train_steps,
                output_dir=str(output_dir),
                seed=seed,
                progress=progress,
            )
        )


def draw_edits(
    pipe,
    image: Image.Image,
    prompts: list[str],
    *,
    ddim_inversion: bool = True,
    eta: float = 0.0,
    slerp_alpha: float = 0.0,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> list[Image.Image]:
    """One picture per prompt from a pipeline already fine-tuned on `image`: from the image's noise map inverted
    with that prompt (moved towards fresh noise by slerp_alpha), or from fresh noise; DDIM with η = eta (flow
    models sample without η)."""
    family = family_of(pipe)
    if family.embeds_guidance():  # Flux-dev samples with the guidance as an input: the inversion uses the same
        family.guidance = guidance_scale
    resolution = family.native_resolution()
    latents = encode_image(pipe, image, resolution)
    drawn = []
    for prompt in tqdm(prompts, desc="editing", disable=not progress):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        start = invert(family, latents, prompt, num_inference_steps) if ddim_inversion else noise
        if ddim_inversion and slerp_alpha > 0:
            start = slerp(slerp_alpha, start, noise)
        drawn.append(
            pipe(
                prompt,
                latents=family.pipeline_latents(start),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generator,
                **eta_argument(pipe, eta),
                **family.call_arguments(),
            ).images[0]
        )
    return drawn


def edit_image(
    image: str | Path | Image.Image,
    source_prompt: str,
    target_prompts: list[str],
    output: str | Path = "edits.png",
    *,
    base=None,
    shifts: str | Path | None = None,
    method: str = "svdiff",
    max_train_steps: int = DEFAULT_EDIT_STEPS,
    ddim_inversion: bool = True,
    eta: float = 0.0,
    slerp_alpha: float = 0.0,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tunes on (image, source_prompt) unless `shifts` is given, then draws each target prompt. Writes the
    grid `output` (input, reconstruction with the source prompt, one column per target), its single images and a
    JSON of the settings beside it; returns the settings with the images."""

    began = time.time()
    prompts = [source_prompt, *target_prompts]
    if not target_prompts or any(not p.strip() for p in prompts):
        raise SvdiffError("the source prompt and every target prompt must be non-empty")
    if not 0.0 <= slerp_alpha <= 1.0:
        raise SvdiffError(f"--slerp_alpha {slerp_alpha} is outside [0, 1]")
    check_sampling(num_inference_steps, guidance_scale, eta, seed)  # before minutes of fine-tuning
    check_range("--max_train_steps", max_train_steps, 1, 10**8, integer=True)
    output = png_path("--output", output)
    if shifts is not None and method != "svdiff":
        raise SvdiffError("--shifts reuses spectral shifts: it needs --method svdiff")
    source = open_edit_image(image)
    pipe = load_pipeline(base)
    resolution = family_of(pipe).native_resolution()
    if min(source.size) < resolution:
        warnings.warn(f"the image is {source.width}×{source.height}, smaller than {resolution}: enlarged", stacklevel=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    if shifts is None:
        trained = fine_tune(
            source,
            source_prompt,
            output.parent / f"{output.stem}-model",
            base=base,
            method=method,
            max_train_steps=max_train_steps,
            seed=seed,
            progress=progress,
        )
        weights = Path(trained["weights"])
    else:
        weights, trained = Path(shifts), None
    apply_trained(pipe, weights, method)

    drawn = draw_edits(
        pipe,
        source,
        prompts,
        ddim_inversion=ddim_inversion,
        eta=eta,
        slerp_alpha=slerp_alpha,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=seed,
        progress=progress,
    )
    source_image = to_pil(to_model_input(source, resolution))
    picture = [source_image, *drawn]
    labels = ["input | reconstruction | " + " | ".join(f"{k + 1}: {p}" for k, p in enumerate(target_prompts))]
    grid(picture, cols=len(picture), labels=labels).save(output)
    files = []
    for name, im in zip(
        ["input", "reconstruction"] + [f"edit-{k}" for k in range(len(target_prompts))], picture, strict=True
    ):
        files.append(str(output.with_name(f"{output.stem}-{name}.png")))
        im.save(files[-1])
    settings = {
        "source_prompt": source_prompt,
        "target_prompts": list(target_prompts),
        "method": method,
        "shifts": str(weights),
        "trained_steps": None if trained is None else trained["steps"],
        "ddim_inversion": ddim_inversion,
        "eta": eta,
        "slerp_alpha": slerp_alpha,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "resolution": resolution,
        "grid": str(output),
        "images": files,
        "minutes": round((time.time() - began) / 60, 2),
    }
    output.with_suffix(".json").write_text(json.dumps(settings, indent=2))
    return {**settings, "pictures": picture}
