"""What every model family says about training on its pipeline; one subclass per family, one file each.

A family answers, for a loaded diffusers pipeline: which component denoises and which text encoders may get
shifts; how prompts become the denoiser's conditioning; how pixels become latents; how noise is added and what
the target is (`noise.py`); how the denoiser is called (packing, extra inputs); which sizes it trains at; which
layers LoRA adapts. The training loop, prior preservation, resume, Cut-Mix-Unmix, validation and checkpoints are
one code path over all of them.
"""

from __future__ import annotations

import re

import torch

from ..errors import SvdiffError
from .noise import Diffusion, RectifiedFlow

# Style mixing after Extended Textual Inversion (P+): the coarse cross-attention layers, "(16, down, 1)" to
# "(8, mid)" in its (resolution, direction, index) naming at SD's 64×64 latents, carry a subject's geometry; every
# other layer carries its appearance. In diffusers' SD 1.x/2.x UNet these are down_blocks.2.attentions.1 (16×16)
# and mid_block.attentions.0 (8×8); SDXL's UNet has the same two at its two coarsest levels.
UNET_GEOMETRY = (r"^unet\.(down_blocks\.2\.attentions\.1|mid_block\.attentions\.0)\.",)


class Family:
    pipelines: tuple[str, ...] = ()  # the diffusers pipeline classes of this family
    denoiser: str = "unet"  # the component that denoises
    text_encoders: tuple[str, ...] = ("text_encoder",)  # the CLIP encoders `--train_text_encoder` trains
    patch: int = 1  # latent cells per token side (transformers patchify; Flux packs 2×2)
    cross_attention: bool = True  # text reaches the image through cross-attention (what the Unmix loss reads)
    lora_targets: dict[str, list[str]] = {}

    def __init__(self, pipe, config=None):
        self.pipe = pipe
        missing = [c for c in (self.denoiser, "vae", *self.text_encoders) if getattr(pipe, c, None) is None]
        if missing:
            raise SvdiffError(f"the {type(pipe).__name__} has no {', '.join(missing)}: cannot train on it")
        if config is not None and config.guidance_scale is not None and not self.embeds_guidance():
            raise SvdiffError("--guidance_scale is the guidance Flux-dev takes as an input; this base has none")
        self.noise = self.objective(pipe.scheduler.config, config)

    def call_arguments(self) -> dict:
        """Keywords every call of the pipeline takes (sampling, previews), beyond the prompt and sampling settings."""
        return {}

    def embeds_guidance(self) -> bool:
        """Whether the denoiser takes the guidance scale as an input (Flux-dev)."""
        return False

    def objective(self, scheduler_config, config) -> Diffusion | RectifiedFlow:
        """The training objective: DDPM for UNet families (transformer.py: rectified flow for SD3 and Flux)."""
        if config is None:
            return Diffusion(scheduler_config)
        if config.weighting_scheme != "none":
            raise SvdiffError("--weighting_scheme draws flow-matching timesteps (SD3, Flux); this base trains by DDPM")
        return Diffusion(scheduler_config, config.snr_gamma)

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser)

    def components(self, train_text_encoder: bool) -> dict[str, torch.nn.Module]:
        """The components a run trains: the denoiser, and the CLIP text encoders when asked."""
        names = (self.denoiser, *(self.text_encoders if train_text_encoder else ()))
        return {n: getattr(self.pipe, n) for n in names}

    def frozen(self) -> list[torch.nn.Module]:
        """Every model of the pipeline (VAE, all text encoders, the denoiser): what the loop freezes first."""
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    def geometry_layers(self) -> list[str]:
        """Patterns of the shifted parameters (`<component>.<name>`) that carry a subject's geometry in style
        mixing (`svdiff generate --style_mix`); every other layer carries its appearance."""
        return list(UNET_GEOMETRY)

    # --- sizes ---

    def native_resolution(self) -> int:
        return int(self.model.config.sample_size) * self.pipe.vae_scale_factor

    def resolution_multiple(self) -> int:
        """What a training size must be a multiple of for whole latent cells through every patch or downsampling
        (the loop adds diffusers' multiple of 8)."""
        return self.pipe.vae_scale_factor * self.patch

    # --- a step ---

    def latents(self, pixels: torch.Tensor, generators=None) -> torch.Tensor:
        """The VAE's latents of `pixels`, shifted and scaled as the family expects: a sample of the posterior with
        each image's own generator, or its mean without generators."""
        vae = self.pipe.vae
        dist = vae.encode(pixels).latent_dist
        x = dist.mean
        if generators is not None:
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            x = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (x - shift) * vae.config.scaling_factor

    def set_sampling_timesteps(self, steps: int, latents: torch.Tensor) -> None:
        """Puts the pipeline's scheduler on the timesteps its pipeline samples `latents` with in `steps` steps."""
        self.pipe.scheduler.set_timesteps(steps, device=latents.device)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (batch, channels, h, w) in the layout the pipeline's `latents=` argument takes."""
        return latents

    def encode(self, prompts: list[str]) -> dict:
        """The denoiser's conditioning for `prompts` (text encoders run with gradients when they train)."""
        raise NotImplementedError

    # --- what the Unmix loss reads ---

    def text_positions(self, prompt: str, phrase: str) -> list[int]:
        """Where `phrase`'s tokens stand among the text tokens the image attends to, for `prompt`."""
        return token_positions(self.pipe.tokenizer, prompt, phrase)

    def unmix_layers(self, pattern: str | None = None) -> list[str]:
        """Names of the attention modules whose image-to-text attention the Unmix loss watches: those matching
        `pattern`, or the family's default."""
        raise NotImplementedError

    def image_text_attention(self, attn: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """Joint attention (cross_attention False): the softmax probabilities of the image queries over the text
        keys (batch × heads × image tokens × text tokens) of module `attn` called with keyword `inputs`."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's output for latents `noisy` (batch, channels, h, w), in the same shape."""
        raise NotImplementedError


def token_positions(tokenizer, prompt: str, word: str, max_length: int | None = None) -> list[int]:
    """Where `word`'s tokens stand in the tokenized prompt (padded to `max_length`, by default the tokenizer's)."""
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(piece) + 1):
        if ids[i : i + len(piece)] == piece:
            return list(range(i, i + len(piece)))
    raise ValueError(f"{word!r} is not in the tokenized prompt {prompt!r}")


def select(names: list[str], pattern: str | None, default: list[str]) -> list[str]:
    """`names` matching `pattern`, or `default` without one."""
    return [n for n in names if re.search(pattern, n)] if pattern is not None else default
