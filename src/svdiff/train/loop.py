"""The training loop: DreamBooth-style personalization of a Stable Diffusion pipeline on Accelerate.

Read top to bottom: check the inputs (nothing is written before they pass), load the base, make the class images,
attach what is trained, then loop. Each optimizer step draws its concept, examples, crops, noise and timesteps from
(seed, step) alone, and splits the global batch (train_batch_size × processes) between the processes by position;
gradients are averaged across processes by hand after the backward, so every process holds the same parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.concepts import (
    generate_class_images,
    load_class_images,
    load_instance_images,
    missing_class_images,
    read_concepts,
)
from ..data.cutmix import collage, draw_concepts, nearest_background, pair_prompt, phrase
from ..data.images import to_model_input
from ..errors import Interrupted, SvdiffError
from ..models import base_name
from . import checkpoint
from .args import check
from .methods import prepare, save_result
from .outputs import check_folder, locked
from .report import write_loss_chart, write_model_card, write_samples
from .runlog import RunLog, unfinished_note
from .stop import StopOnSignal
from .unmix import Unmix, token_positions


def train(args) -> dict:
    """Runs `svdiff train` with `args` (see `train_args`); returns the run's summary (also in train_summary.json)."""
    with contextlib.ExitStack() as held:  # the output folder's lock and the signal handlers, released on any exit
        return _train(args, held)


def _train(args, held: contextlib.ExitStack) -> dict:
    check(args)
    began = time.time()
    accelerator = _accelerator(args)
    main = accelerator.is_main_process
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SvdiffError(f"--output_dir {output_dir} exists and is not a folder")

    concepts = read_concepts(args)
    check_folder(output_dir, concepts, args.logging_dir, args.overwrite)
    load_instance_images(concepts)
    pipe = _load_base(args, accelerator.device)
    args.resolution = _resolution(args.resolution, pipe)
    resume = checkpoint.resolve(output_dir, args.resume_from_checkpoint)
    run = _run_identity(args, concepts)
    changed = {}
    if resume is not None:
        checkpoint.check_matches(resume, run)
        changed = _resumed_changes(resume, args)
    _make_writable(output_dir, main)
    held.enter_context(locked(output_dir, main))
    log = RunLog(output_dir, main)
    note = None if resume is not None else unfinished_note(output_dir, checkpoint.resolve(output_dir, "latest"))
    if note and main:
        print(f"note: {note}", file=sys.stderr)
    log("start", f"svdiff train {json.dumps(_tracker_config(args))}")
    held.push(_log_failure(log))
    accelerator.wait_for_everyone()

    if args.with_prior_preservation:
        for concept in concepts:
            if main and missing_class_images(concept, args.num_class_images):
                generate_class_images(
                    pipe,
                    concept,
                    args.num_class_images,
                    batch_size=args.sample_batch_size,
                    seed=args.seed,
                    progress=args.progress,
                )
            accelerator.wait_for_everyone()
            load_class_images(concept, args.num_class_images)

    noise_scheduler = _noise_scheduler(pipe)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    trainable = prepare(args, unet, text_encoder)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.method != "full" and weight_dtype != torch.float32:  # frozen weights in half precision, trained fp32
        vae.to(dtype=weight_dtype)
        for model in (unet, text_encoder):
            _cast_frozen(model, weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    unet.train()
    text_encoder.train(args.train_text_encoder)
    unmix = _unmix(args, concepts, unet, tokenizer)
    _step_path(args, trainable, unet, accelerator)

    optimizer = accelerator.prepare(_optimizer(args, trainable.groups))
    lr_scheduler = _lr_scheduler(args, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    step, losses = 0, []
    if resume is not None:
        step, losses = checkpoint.load(accelerator, resume, trainable)
        accelerator.print(f"resumed from {resume} at step {step}")
        log("resume", f"from {resume.name} at step {step}" + (f"; changed: {json.dumps(changed)}" if changed else ""))
        if changed:
            accelerator.print("changed since the checkpoint (applied from here on): " + _changes_text(changed))
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    if args.report_to != "none":
        accelerator.init_trackers("svdiff", config=_tracker_config(args))

    params = [p for group in trainable.groups for p in group["params"]]  # what the optimizer steps
    sample_every = args.validation_steps
    bar = tqdm(
        range(step, args.max_train_steps),
        initial=step,
        total=args.max_train_steps,
        desc="training",
        disable=not (main and args.progress),
    )
    trained_from = step
    stop = held.enter_context(StopOnSignal())
    config = _tracker_config(args)
    log_every = max(1, args.max_train_steps // 10)
    for step in bar:
        chosen = [concepts[i] for i in draw_concepts(len(concepts), args.seed, step, args.cut_mix_unmix_prob)]
        total = torch.zeros((), device=accelerator.device)
        for micro in range(args.gradient_accumulation_steps):
            batch = _batch(args, chosen, step, micro, accelerator)
            with accelerator.autocast():
                loss = _loss(args, batch, vae, unet, text_encoder, tokenizer, noise_scheduler, weight_dtype, unmix)
            accelerator.backward(loss / args.gradient_accumulation_steps)
            total += loss.detach() / args.gradient_accumulation_steps
        _average_gradients(params, accelerator)
        total = accelerator.reduce(total, reduction="mean")
        if not torch.isfinite(total):
            kept = checkpoint.checkpoints(output_dir)
            raise SvdiffError(
                f"the loss became {total.item()} at step {step + 1}; stopped. "
                + (f"The last good checkpoint is {kept[-1]}" if kept else "No checkpoint was written")
                + " (try a lower --learning_rate)"
            )
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        losses.append([done, round(total.item(), 6)])
        lr = lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2g}")
        if args.report_to != "none":
            accelerator.log({"loss": total.item(), "lr": lr}, step=done)
        if done % log_every == 0:
            log("step", f"step {done}/{args.max_train_steps} loss {total.item():.4f} lr {lr:.3g}")
        stopping = stop.requested(accelerator)
        if done < args.max_train_steps and (
            stopping or (args.checkpointing_steps and done % args.checkpointing_steps == 0)
        ):
            saved = checkpoint.save(
                accelerator, output_dir, done, trainable, run, losses, args.checkpoints_total_limit, args=config
            )
            log("checkpoint", f"{saved.name} (step {done})")
        if stopping and done < args.max_train_steps:
            bar.close()
            message = (
                f"stopped by {stop.name} at step {done} of {args.max_train_steps}; saved {saved}; to continue, "
                "run the same command with --resume_from_checkpoint latest"
            )
            log("stop", message)
            raise Interrupted(message, stop.received)
        if sample_every and done % sample_every == 0 and done < args.max_train_steps:
            if main:
                write_samples(pipe, args, concepts, done, accelerator)
            accelerator.wait_for_everyone()
    bar.close()
    if unmix is not None:
        unmix.remove()

    digests = accelerator.gather_for_metrics([_digest(trainable)], use_gather_object=True)
    if len(set(digests)) != 1:  # cannot happen while gradients are averaged; guards against silent divergence
        raise SvdiffError(f"the processes ended with different parameters ({len(set(digests))} versions)")
    summary = {}
    if main:
        minutes = (time.time() - began) / 60
        resumed = None if resume is None else {"checkpoint": resume.name, "step": trained_from, "changed": changed}
        extra = {"training": _tracker_config(args)} | ({"resumed": resumed} if resumed else {})
        weights = save_result(trainable, output_dir, args, extra)
        samples = write_samples(pipe, args, concepts, args.max_train_steps, accelerator)
        write_loss_chart(losses, output_dir / "loss.png")
        (output_dir / "loss.json").write_text(json.dumps(losses))
        summary = {
            "method": args.method,
            "steps": args.max_train_steps,
            "steps_this_run": args.max_train_steps - trained_from,
            "minutes": round(minutes, 2),
            "processes": accelerator.num_processes,
            "global_batch": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            "final_loss": losses[-1][1] if losses else None,
            "trained_parameters": sum(p.numel() for p in params),
            "weights": str(weights),
            "weights_bytes": weights.stat().st_size,
            "samples": str(samples),
            "parameter_digest": digests[0],
            "processes_agree": True,
            "resumed": resumed,
        }
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(output_dir, args, concepts, summary)
        log("finish", f"step {args.max_train_steps}: wrote {weights} in {summary['minutes']} min")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# --- setup ---


def _accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    log_with = None if args.report_to == "none" else args.report_to
    from accelerate.state import AcceleratorState

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:  # a library caller may train several times in one process, with other settings each time
        AcceleratorState._reset_state(reset_partial_state=True)
    # Accelerate treats several processes without GPUs as one unless told to use the CPU; torchrun sets WORLD_SIZE.
    cpu_processes = processes > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(
            cpu=cpu_processes,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
            ),
        )
    except (ValueError, RuntimeError, ImportError) as e:
        raise SvdiffError(f"cannot set up training: {str(e).splitlines()[0]}") from None


def _load_base(args, device):
    from ..sample import load_pipeline

    pipe = load_pipeline(
        args.pretrained_model_name_or_path,
        scheduler="ddim",
        revision=args.revision,
        variant=args.variant,
        device=device,
        dtype=torch.float32,
    )
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "unet", None) is None:
        raise SvdiffError(
            f"{args.pretrained_model_name_or_path} is a {type(pipe).__name__}: training handles Stable Diffusion "
            "1.x/2.x pipelines; SDXL, SD3 and Flux are counted and sized (svdiff targets --base …) but not trained yet"
        )
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(pipe, name, None) is None:
            raise SvdiffError(f"{args.pretrained_model_name_or_path} has no {name}: not a Stable Diffusion pipeline")
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False).eval()
    return pipe


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise SvdiffError(f"prediction type {scheduler.config.prediction_type!r} is not supported")
    return scheduler


def _cast_frozen(model, dtype) -> None:
    """Casts a model's weights, keeping trained float32 parameters (δ, LoRA) as they are."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for module in model.modules():  # the SVD factors follow the weights' dtype (their error only touches Δ)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and name in ("U", "Vh"):
                setattr(module, name, buf.to(dtype))


def _step_path(args, trainable, unet, accelerator) -> None:
    """How a step runs: svdiff's shifts merged into the weights once per step in shape groups where that measures
    faster (`--step_path`, spectral/merged.py; the choice is kept with each checkpoint, so a resumed run computes
    as the first did), and with `--compile` the denoiser compiled (on merged weights throughout, which have no
    graph break). After the final cast: merged groups hold views of the weights."""
    if trainable.method == "svdiff":
        choose = "merged" if args.compile and args.step_path == "auto" else args.step_path
        for wiring in trainable.merge_steps(choose, report=accelerator.print):
            accelerator.register_for_checkpointing(wiring)
    if args.compile:
        # Only training steps run compiled: sampling (validation, class images) runs under no_grad at other
        # shapes, where a second compile of the whole denoiser costs more than the few steps it would speed.
        eager, compiled = unet.forward, torch.compile(unet.forward)
        unet.forward = lambda *a, **kw: (compiled if torch.is_grad_enabled() else eager)(*a, **kw)


def _optimizer(args, groups):
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SvdiffError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # Shifts and LoRA train hundreds of small tensors: one batched (foreach) update for all of them, where torch
    # would loop over them on a CPU. Full fine-tuning keeps torch's choice: batching its big tensors costs memory.
    return torch.optim.AdamW(groups, foreach=None if args.method == "full" else True, **kwargs)


def _lr_scheduler(args, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def _make_writable(output_dir: Path, main: bool) -> None:
    if not main:
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SvdiffError(f"cannot write to --output_dir {output_dir}: {e.strerror or e}") from None


def _resolution(resolution: int | None, pipe) -> int:
    """The training size: the base's own by default; otherwise a multiple of what the UNet needs (the VAE's
    factor times its downsamplings, so every feature map keeps whole pixels) and of 8 (what the sampling
    pipeline checks), and at most twice the base's size."""
    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * factor
    if resolution is None:
        return native
    need = math.lcm(8, factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))  # diffusers' pipelines: 8
    if resolution % need:
        raise SvdiffError(f"--resolution {resolution} must be a multiple of {need} on this base (e.g. {native})")
    if resolution > 2 * native:
        raise SvdiffError(f"--resolution {resolution} is more than twice this base's size {native}")
    return resolution


# Settings that live in the optimizer and lr-scheduler state a checkpoint restores: a resumed run cannot apply a
# new value, so a change is refused rather than recorded and ignored.
OPTIMIZER_FLAGS = (
    "learning_rate",
    "learning_rate_1d",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "use_8bit_adam",
)
# Flags that say how to resume or where to write, not what is trained.
NOT_RECORDED = frozenset({"resume_from_checkpoint", "progress", "overwrite", "output_dir"})


def _resumed_changes(resume: Path, args) -> dict:
    """{flag: [checkpoint's value, this run's]} of the settings this run changes; they apply from the checkpoint's
    step on and are recorded in the summary, the shift file and the model card. Fewer steps than the checkpoint
    has already trained is refused."""
    state = checkpoint.read_state(resume)
    if state["step"] > args.max_train_steps:
        raise SvdiffError(
            f"{resume} is at step {state['step']}, past --max_train_steps {args.max_train_steps}: give at least "
            f"{state['step']} steps, or resume from an earlier checkpoint"
        )
    before, now = state.get("args") or {}, _tracker_config(args)
    return {k: [before[k], v] for k, v in now.items() if k in before and before[k] != v and k not in NOT_RECORDED}


def _changes_text(changed: dict) -> str:
    return ", ".join(f"--{k} {a} → {b}" for k, (a, b) in changed.items())


def _log_failure(log: RunLog):
    """An exit callback: the run's last line in run.log when it ends with an error or Ctrl-C outside the loop."""

    def logged(kind, error, traceback) -> bool:
        if isinstance(error, SvdiffError) and not isinstance(error, Interrupted):
            log("error", str(error))
        elif isinstance(error, KeyboardInterrupt):
            log("stop", "interrupted")
        return False  # the error goes on to the caller

    return logged


def _unmix(args, concepts, unet, tokenizer) -> Unmix | None:
    """The Unmix loss's attention capture, when collages are made and the loss has a weight; checks first that
    every subject's phrase survives tokenization in the collage prompts."""
    if len(concepts) < 2 or args.cut_mix_unmix_prob <= 0 or args.unmix_weight <= 0:
        return None
    for a in concepts:
        for b in concepts:
            if a is not b:
                prompt = pair_prompt(a.instance_prompt, b.instance_prompt, args.seed, 0)
                for c in (a, b):
                    try:
                        token_positions(tokenizer, prompt, phrase(c.instance_prompt))
                    except ValueError as e:
                        raise SvdiffError(f"Unmix: {e}") from None
    try:
        return Unmix(unet, args.unmix_layers)
    except ValueError as e:
        raise SvdiffError(f"--unmix_layers {args.unmix_layers!r}: {e}") from None


def _run_identity(args, concepts) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {
        **{name: getattr(args, name) for name in OPTIMIZER_FLAGS},
        "data": [_images_digest(c.instance_images) for c in concepts],
        "method": args.method,
        "base": base_name(args.pretrained_model_name_or_path),
        "preset": args.preset,
        "include": args.include,
        "exclude": args.exclude,
        "rank": args.rank if args.method == "lora" else None,
        "train_text_encoder": args.train_text_encoder,
        "concepts": [c.instance_prompt for c in concepts],
        "cut_mix_unmix_prob": args.cut_mix_unmix_prob if len(concepts) > 1 else None,
        "cut_mix_scale": args.cut_mix_scale if len(concepts) > 1 else None,
        "cut_mix_match_background": args.cut_mix_match_background if len(concepts) > 1 else None,
        "unmix_weight": args.unmix_weight if len(concepts) > 1 else None,
        "seed": args.seed,
    }


def _images_digest(images) -> str:
    """The identity of a subject: a hash of its decoded photos (the prompt names a subject, it does not identify it)."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def _tracker_config(args) -> dict:
    """The arguments as flat scalars (what TensorBoard's hparams and the shift file's metadata hold)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in sorted(vars(args).items())}


# --- one step ---


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("-".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _batch(args, chosen, step: int, micro: int, accelerator) -> dict:
    """This process's share of the global batch of (step, micro): example j of the global batch belongs to
    process j // train_batch_size, and everything random about it comes from (seed, step, micro, j). `chosen` is
    one concept, or two for a Cut-Mix collage (left, right)."""
    rng = random.Random(f"{args.seed}-{step}-{micro}")
    size = args.train_batch_size * accelerator.num_processes
    picks = [
        [(rng.randrange(len(c.instance_images)), rng.randrange(max(1, len(c.class_images)))) for c in chosen]
        for _ in range(size)
    ]
    if len(chosen) == 2 and args.cut_mix_match_background:  # the right image: the one whose border is nearest
        a, b = chosen
        for pick in picks:
            pick[1] = (
                nearest_background(a.instance_images[pick[0][0]], b.instance_images),
                nearest_background(a.class_images[pick[0][1]], b.class_images)
                if a.class_images and b.class_images
                else pick[1][1],
            )
    mine = range(
        accelerator.process_index * args.train_batch_size, (accelerator.process_index + 1) * args.train_batch_size
    )
    images, prompts, gens = [], [], []
    sources = [("instance", [c.instance_images for c in chosen], [c.instance_prompt for c in chosen], 0)]
    if args.with_prior_preservation:
        sources.append(("class", [c.class_images for c in chosen], [c.class_prompt for c in chosen], 1))
    for kind, pools, texts, which in sources:  # instance examples first, then class ones (the loss splits there)
        prompt = texts[0] if len(chosen) == 1 else pair_prompt(*texts, args.seed, step)
        for j in mine:
            g = _generator(args.seed, step, micro, j, kind)
            parts = [
                to_model_input(pool[pick[which]], args.resolution, args.center_crop, args.random_flip, g)
                for pool, pick in zip(pools, picks[j], strict=True)
            ]
            images.append(parts[0] if len(parts) == 1 else collage(*parts, args.cut_mix_scale))
            prompts.append(prompt)
            gens.append(g)
    words = [phrase(c.instance_prompt) for c in chosen] if len(chosen) == 2 else None
    return {"pixels": torch.stack(images), "prompts": prompts, "generators": gens, "phrases": words}


def _loss(args, batch, vae, unet, text_encoder, tokenizer, noise_scheduler, weight_dtype, unmix=None):
    return sum(loss_terms(args, batch, vae, unet, text_encoder, tokenizer, noise_scheduler, weight_dtype, unmix))


def loss_terms(args, batch, vae, unet, text_encoder, tokenizer, noise_scheduler, weight_dtype, unmix=None):
    """A training step's loss in its two parts: the denoising loss (with the prior term) and unmix_weight × the
    Unmix loss (0 without collages)."""
    device = unet.device
    gens = batch["generators"]
    with torch.no_grad():
        dist = vae.encode(batch["pixels"].to(device, weight_dtype)).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device, latents.dtype)
    if args.noise_offset:
        offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in gens])
        noise = noise + args.noise_offset * offset.to(device, latents.dtype)
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in gens]).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    ids = tokenizer(
        batch["prompts"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.set_grad_enabled(args.train_text_encoder):
        context = text_encoder(ids)[0]
    with unmix.capturing_maps() if unmix is not None else contextlib.nullcontext():
        pred = unet(noisy, t, context).sample
    target = training_target(noise_scheduler, latents, noise, t)
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma:
        per_example = per_example * snr_weight(noise_scheduler, t, args.snr_gamma).to(per_example)
    extra = _unmix_term(args, batch, unmix, tokenizer, latents.shape[-2:])
    if not args.with_prior_preservation:
        return per_example.mean(), extra
    instance, prior = per_example.chunk(2)
    return instance.mean() + args.prior_loss_weight * prior.mean(), extra


def training_target(noise_scheduler, latents, noise, t) -> torch.Tensor:
    """What the UNet is trained to predict: the velocity for v-prediction, else the noise."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    return noise


def _unmix_term(args, batch, unmix, tokenizer, latent_size) -> torch.Tensor | float:
    """unmix_weight × the Unmix loss on this batch's instance collages (0 on other steps)."""
    if unmix is None:
        return 0.0
    if batch["phrases"] is None:
        unmix.clear()
        return 0.0
    instances = len(batch["prompts"]) // (2 if args.with_prior_preservation else 1)
    prompt = batch["prompts"][0]
    left, right = (token_positions(tokenizer, prompt, w) for w in batch["phrases"])
    return args.unmix_weight * unmix.loss([(b, left, right) for b in range(instances)], tuple(latent_size))


def snr_weight(noise_scheduler, t, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction,
    written so that SNR = 0 (a zero-terminal-SNR schedule's last step) gives a finite weight."""
    a = noise_scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = a / (1 - a)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return (torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)).float()
    return torch.clamp(gamma / snr, max=1.0).float()


def _average_gradients(params, accelerator) -> None:
    """Mean of every gradient over the processes, in buckets of ~16M values, so all processes take the same step."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= 1 << 24 or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1).float() for b in bucket])
            dist.all_reduce(flat)
            flat /= accelerator.num_processes
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket]), strict=True):
                b.copy_(part.view_as(b))
            bucket, size = [], 0
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def _digest(trainable) -> str:
    h = hashlib.sha256()
    for k, v in trainable.state().items():
        h.update(k.encode())
        h.update(v.cpu().numpy().tobytes())
    return h.hexdigest()[:16]
