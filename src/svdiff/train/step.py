"""One training step's pieces: the batch of (seed, step, micro-batch) and the loss on it, and the optimizer.

The loop (loop.py) runs these under Accelerate; a benchmark or a test that measures a step uses them directly:

    training = TrainingStep(config, pipe)                 # a resolved TrainConfig and a loaded pipeline
    batch = training.batch(concepts, step=0)
    denoising, unmix = training.loss_terms(batch)

Everything random about a batch (which photos, crops, flips, noise, timesteps) comes from (seed, step, micro, j)
alone, so a resumed or multi-process run draws the same examples as one uninterrupted process.
"""

from __future__ import annotations

import contextlib
import hashlib
import random

import torch
import torch.nn.functional as F

from ..data.cutmix import collage, nearest_background, pair_prompt, phrase
from ..data.images import to_model_input
from ..errors import SvdiffError
from ..families import Family, family_of
from .config import TrainConfig
from .unmix import Unmix


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by the hash of `parts` (e.g. seed, step, micro, example)."""
    digest = hashlib.sha256("-".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class TrainingStep:
    """The batch and loss of a step for `config` on a pipeline (or its `Family`). `process_index`/`num_processes`
    say which share of the global batch this process draws; `weight_dtype` is what the frozen weights are held
    in; `unmix` captures the attention maps of the Unmix loss (None: no Unmix term)."""

    def __init__(
        self,
        config: TrainConfig,
        model: Family | object,
        *,
        weight_dtype: torch.dtype = torch.float32,
        unmix: Unmix | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.config, self.unmix, self.weight_dtype = config, unmix, weight_dtype
        self.family = model if isinstance(model, Family) else family_of(model, config)
        self.process_index, self.num_processes = process_index, num_processes

    def batch(self, chosen: list, step: int, micro: int = 0) -> dict:
        """This process's share of the global batch of (step, micro) (see `draw_batch`)."""
        return draw_batch(self.config, chosen, step, micro, self.process_index, self.num_processes)

    def loss(self, batch: dict) -> torch.Tensor:
        return sum(self.loss_terms(batch))

    def loss_terms(self, batch: dict) -> tuple:
        """A step's loss in its two parts: the denoising loss (with the prior term) and unmix_weight × the Unmix
        loss (0 without collages)."""
        c, family, gens = self.config, self.family, batch["generators"]
        device = family.model.device
        with torch.no_grad():
            latents = family.latents(batch["pixels"].to(device, self.weight_dtype), gens)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device, latents.dtype)
        if c.noise_offset:
            offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in gens])
            noise = noise + c.noise_offset * offset.to(device, latents.dtype)
        noisy, timesteps, target, weight = family.noise.corrupt(latents, noise, gens)
        with torch.set_grad_enabled(c.train_text_encoder):
            conditioning = family.encode(batch["prompts"])
        with self.unmix.capturing_maps() if self.unmix is not None else contextlib.nullcontext():
            pred = family.predict(noisy, timesteps, conditioning)
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weight
        extra = self._unmix_term(batch, latents.shape[-2:])
        if not c.with_prior_preservation:
            return per_example.mean(), extra
        instance, prior = per_example.chunk(2)
        return instance.mean() + c.prior_loss_weight * prior.mean(), extra

    def _unmix_term(self, batch: dict, latent_size) -> torch.Tensor | float:
        """unmix_weight × the Unmix loss on this batch's instance collages (0 on other steps)."""
        if self.unmix is None:
            return 0.0
        if batch["phrases"] is None:
            self.unmix.clear()
            return 0.0
        instances = len(batch["prompts"]) // (2 if self.config.with_prior_preservation else 1)
        prompt = batch["prompts"][0]
        left, right = (self.family.text_positions(prompt, w) for w in batch["phrases"])
        pairs = [(b, left, right) for b in range(instances)]
        return self.config.unmix_weight * self.unmix.loss(pairs, tuple(latent_size))


def draw_batch(
    config: TrainConfig, chosen: list, step: int, micro: int = 0, process_index: int = 0, num_processes: int = 1
) -> dict:
    """This process's share of the global batch of (step, micro): example j of the global batch belongs to
    process j // train_batch_size. `chosen` is one concept, or two for a Cut-Mix collage (left, right)."""
    c = config
    rng = random.Random(f"{c.seed}-{step}-{micro}")
    size = c.train_batch_size * num_processes
    picks = [
        [(rng.randrange(len(k.instance_images)), rng.randrange(max(1, len(k.class_images)))) for k in chosen]
        for _ in range(size)
    ]
    if len(chosen) == 2 and c.cut_mix_match_background:  # the right image: the one whose border is nearest
        a, b = chosen
        for pick in picks:
            pick[1] = (
                nearest_background(a.instance_images[pick[0][0]], b.instance_images),
                nearest_background(a.class_images[pick[0][1]], b.class_images)
                if a.class_images and b.class_images
                else pick[1][1],
            )
    mine = range(process_index * c.train_batch_size, (process_index + 1) * c.train_batch_size)
    images, prompts, gens = [], [], []
    sources = [("instance", [k.instance_images for k in chosen], [k.instance_prompt for k in chosen], 0)]
    if c.with_prior_preservation:
        sources.append(("class", [k.class_images for k in chosen], [k.class_prompt for k in chosen], 1))
    for kind, pools, texts, which in sources:  # instance examples first, then class ones (the loss splits there)
        prompt = texts[0] if len(chosen) == 1 else pair_prompt(*texts, c.seed, step)
        for j in mine:
            g = generator(c.seed, step, micro, j, kind)
            parts = [
                to_model_input(pool[pick[which]], c.resolution, c.center_crop, c.random_flip, g)
                for pool, pick in zip(pools, picks[j], strict=True)
            ]
            images.append(parts[0] if len(parts) == 1 else collage(*parts, c.cut_mix_scale))
            prompts.append(prompt)
            gens.append(g)
    words = [phrase(k.instance_prompt) for k in chosen] if len(chosen) == 2 else None
    return {"pixels": torch.stack(images), "prompts": prompts, "generators": gens, "phrases": words}


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW over the parameter groups of `prepare` (bitsandbytes' 8-bit AdamW with --use_8bit_adam)."""
    c = config
    kwargs = dict(betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
    if c.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional: only this flag needs it
        except ImportError:
            raise SvdiffError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # Shifts and LoRA train hundreds of small tensors: one batched (foreach) update for all of them, where torch
    # would loop over them on a CPU. Full fine-tuning keeps torch's choice: batching its big tensors costs memory.
    return torch.optim.AdamW(groups, foreach=None if c.method == "full" else True, **kwargs)
