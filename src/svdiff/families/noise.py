"""How a training example is corrupted and what the denoiser must predict: the two objectives of today's models.

- `Diffusion` (SD 1.x/2.x, SDXL): DDPM's forward process at an integer timestep, the target ε or the velocity v,
  optionally Min-SNR-γ weighted.
- `RectifiedFlow` (SD3/3.5, Flux.1): `x_t = (1 − σ)·x₀ + σ·ε`, the target `ε − x₀`, σ drawn from a density and the
  loss weighted as diffusers' SD3 and Flux DreamBooth scripts do (`--weighting_scheme`: logit_normal, mode, uniform
  "none", sigma_sqrt, cosmap).

Every random draw takes one example's own generator, so an example's noise level depends on (seed, step, example)
alone, whatever the batch or process split.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..errors import SvdiffError

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


class Diffusion:
    """DDPM noise at a uniformly drawn integer timestep; the target is ε or v as the scheduler predicts."""

    def __init__(self, scheduler_config, snr_gamma: float | None = None):
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise SvdiffError(f"prediction type {self.scheduler.config.prediction_type!r} is not supported")
        self.snr_gamma = snr_gamma

    def corrupt(self, latents, noise, generators) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps for the denoiser, the target, each example's loss weight)."""
        steps = self.scheduler.config.num_train_timesteps
        t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        weight = snr_weight(self.scheduler, t, self.snr_gamma) if self.snr_gamma else torch.ones(len(t))
        return noisy, t, training_target(self.scheduler, latents, noise, t), weight.to(latents.device)

    def at(self, latents, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, target) at the denoiser's timesteps `t`: for a loss at fixed noise levels."""
        return self.scheduler.add_noise(latents, noise, t), training_target(self.scheduler, latents, noise, t)


def training_target(scheduler, latents, noise, t) -> torch.Tensor:
    """What a DDPM-trained denoiser predicts: the velocity for v-prediction, else the noise."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def snr_weight(scheduler, t, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction,
    written so that SNR = 0 (a zero-terminal-SNR schedule's last step) gives a finite weight."""
    a = scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = a / (1 - a)
    if scheduler.config.prediction_type == "v_prediction":
        return (torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)).float()
    return torch.clamp(gamma / snr, max=1.0).float()


class RectifiedFlow:
    """Flow matching on the straight path from data (σ = 0) to noise (σ = 1). σ is one of the scheduler's training
    sigmas (its shift applied, as the pipeline samples), picked at a drawn fraction u of the schedule:
    logit_normal u = sigmoid(N(mean, std)); mode u = 1 − u′ − s·(cos²(πu′/2) − 1 + u′) (SD3's mode density);
    otherwise uniform. sigma_sqrt weighs the loss by σ⁻², cosmap by 2/(π(1 − 2σ + 2σ²)); the others by 1."""

    def __init__(
        self,
        scheduler_config,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise SvdiffError(f"--weighting_scheme {weighting_scheme!r}: choose from {', '.join(WEIGHTING_SCHEMES)}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.scheme, self.mean, self.std, self.mode_scale = weighting_scheme, logit_mean, logit_std, mode_scale

    def _fraction(self, g: torch.Generator) -> torch.Tensor:
        if self.scheme == "logit_normal":
            return torch.sigmoid(torch.normal(self.mean, self.std, (1,), generator=g))
        u = torch.rand(1, generator=g)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def corrupt(self, latents, noise, generators) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps σ·1000 for the denoiser, the target ε − x₀, each example's loss weight)."""
        n = self.scheduler.config.num_train_timesteps
        u = torch.cat([self._fraction(g) for g in generators])
        index = (u * n).long().clamp(0, len(self.scheduler.sigmas) - 2)  # the last sigma is the final 0
        sigmas = self.scheduler.sigmas[index].to(latents.device, latents.dtype)
        timesteps = self.scheduler.timesteps[index].to(latents.device)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * noise
        if self.scheme == "sigma_sqrt":
            weight = sigmas.float() ** -2.0
        elif self.scheme == "cosmap":
            weight = 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
        else:
            weight = torch.ones_like(sigmas, dtype=torch.float32)
        return noisy, timesteps, noise - latents, weight

    def at(self, latents, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, target) at the denoiser's timesteps `t` = σ·num_train_timesteps."""
        s = (t / self.scheduler.config.num_train_timesteps).to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, noise - latents
