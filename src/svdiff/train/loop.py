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
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..data.concepts import (
    generate_class_images,
    load_class_images,
    load_instance_images,
    missing_class_images,
    read_concepts,
)
from ..data.cutmix import draw_concepts, pair_prompt, phrase
from ..errors import Interrupted, SvdiffError
from ..families import Family, family_of
from ..models import base_name
from ..sample import load_pipeline
from ..spectral.fp8 import hold_in_fp8
from . import checkpoint
from .config import TrainConfig, changes, identity, record, resolve
from .methods import DTYPE, prepare, save_result
from .outputs import check_folder, locked
from .report import write_loss_chart, write_model_card, write_samples
from .runlog import RunLog, unfinished_note
from .step import TrainingStep, build_optimizer
from .stop import StopOnSignal
from .unmix import Unmix


def train(config: TrainConfig) -> dict:
    """Runs `svdiff train` with `config`; returns the run's summary (also in train_summary.json)."""
    with contextlib.ExitStack() as held:  # the output folder's lock and the signal handlers, released on any exit
        return _train(config, held)


def _train(config: TrainConfig, held: contextlib.ExitStack) -> dict:
    config = resolve(config)
    began = time.time()
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SvdiffError(f"--output_dir {output_dir} exists and is not a folder")

    concepts = read_concepts(config)
    check_folder(output_dir, concepts, config.logging_dir, config.overwrite)
    load_instance_images(concepts)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Frozen weights are loaded in the mixed-precision dtype straight away: a 12 B Flux in float32 would need its
    # whole fp32 size in memory first. Full fine-tuning trains every weight, in float32.
    family = _load_base(config, accelerator.device, torch.float32 if config.method == "full" else weight_dtype)
    pipe = family.pipe
    config = config.replace(resolution=_resolution(config.resolution, family))
    resume = checkpoint.resolve(output_dir, config.resume_from_checkpoint)
    run = _run_identity(config, concepts)
    changed = {}
    if resume is not None:
        checkpoint.check_matches(resume, run)
        changed = _resumed_changes(resume, config)
    _make_writable(output_dir, main)
    held.enter_context(locked(output_dir, main))
    log = RunLog(output_dir, main)
    note = None if resume is not None else unfinished_note(output_dir, checkpoint.resolve(output_dir, "latest"))
    if note and main:
        print(f"note: {note}", file=sys.stderr)
    log("start", f"svdiff train {json.dumps(record(config))}")
    held.push(_log_failure(log))
    accelerator.wait_for_everyone()

    if config.with_prior_preservation:
        for concept in concepts:
            if main and missing_class_images(concept, config.num_class_images):
                generate_class_images(
                    pipe,
                    concept,
                    config.num_class_images,
                    batch_size=config.sample_batch_size,
                    seed=config.seed,
                    progress=config.progress,
                )
            accelerator.wait_for_everyone()
            load_class_images(concept, config.num_class_images)

    denoiser = family.model
    trainable = prepare(config, family.components(config.train_text_encoder), family.lora_targets)
    if config.method != "full" and weight_dtype != torch.float32:  # frozen weights in half precision, trained fp32
        for model in family.frozen():
            _cast_frozen(model, weight_dtype)
    if config.base_dtype:  # the factors were taken from the full weights; the layers now hold them in one byte
        layers = sum(hold_in_fp8(model, DTYPE[config.base_dtype]) for model in family.frozen())
        accelerator.print(f"base: {layers} linear layers held in {config.base_dtype}")
    trained_encoders = [getattr(pipe, n) for n in family.text_encoders] if config.train_text_encoder else []
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in trained_encoders:
            encoder.gradient_checkpointing_enable()
    for model in (denoiser, *trained_encoders):
        model.train()
    unmix = _unmix(config, concepts, family)
    _step_path(config, trainable, denoiser, accelerator)

    optimizer = accelerator.prepare(build_optimizer(config, trainable.groups))
    lr_scheduler = _lr_scheduler(config, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    step, losses = 0, []
    if resume is not None:
        step, losses = checkpoint.load(accelerator, resume, trainable)
        accelerator.print(f"resumed from {resume} at step {step}")
        log("resume", f"from {resume.name} at step {step}" + (f"; changed: {json.dumps(changed)}" if changed else ""))
        if changed:
            accelerator.print("changed since the checkpoint (applied from here on): " + _changes_text(changed))
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    if config.report_to != "none":
        accelerator.init_trackers("svdiff", config=record(config))

    params = [p for group in trainable.groups for p in group["params"]]  # what the optimizer steps
    sample_every = config.validation_steps
    bar = tqdm(
        range(step, config.max_train_steps),
        initial=step,
        total=config.max_train_steps,
        desc="training",
        disable=not (main and config.progress),
    )
    trained_from = step
    stop = held.enter_context(StopOnSignal())
    settings = record(config)
    training_step = TrainingStep(
        config,
        family,
        weight_dtype=weight_dtype,
        unmix=unmix,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    log_every = max(1, config.max_train_steps // 10)
    for step in bar:
        chosen = [concepts[i] for i in draw_concepts(len(concepts), config.seed, step, config.cut_mix_unmix_prob)]
        total = torch.zeros((), device=accelerator.device)
        for micro in range(config.gradient_accumulation_steps):
            batch = training_step.batch(chosen, step, micro)
            with accelerator.autocast():
                loss = training_step.loss(batch)
            accelerator.backward(loss / config.gradient_accumulation_steps)
            total += loss.detach() / config.gradient_accumulation_steps
        _average_gradients(params, accelerator)
        total = accelerator.reduce(total, reduction="mean")
        if not torch.isfinite(total):
            kept = checkpoint.checkpoints(output_dir)
            raise SvdiffError(
                f"the loss became {total.item()} at step {step + 1}; stopped. "
                + (f"The last good checkpoint is {kept[-1]}" if kept else "No checkpoint was written")
                + " (try a lower --learning_rate)"
            )
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        losses.append([done, round(total.item(), 6)])
        lr = lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2g}")
        if config.report_to != "none":
            accelerator.log({"loss": total.item(), "lr": lr}, step=done)
        if done % log_every == 0:
            log("step", f"step {done}/{config.max_train_steps} loss {total.item():.4f} lr {lr:.3g}")
        stopping = stop.requested(accelerator)
        if done < config.max_train_steps and (
            stopping or (config.checkpointing_steps and done % config.checkpointing_steps == 0)
        ):
            saved = checkpoint.save(
                accelerator, output_dir, done, trainable, run, losses, config.checkpoints_total_limit, args=settings
            )
            log("checkpoint", f"{saved.name} (step {done})")
        if stopping and done < config.max_train_steps:
            bar.close()
            message = (
                f"stopped by {stop.name} at step {done} of {config.max_train_steps}; saved {saved}; to continue, "
                "run the same command with --resume_from_checkpoint latest"
            )
            log("stop", message)
            raise Interrupted(message, stop.received)
        if sample_every and done % sample_every == 0 and done < config.max_train_steps:
            if main:
                write_samples(pipe, config, concepts, done, accelerator)
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
        extra = {"training": record(config)} | ({"resumed": resumed} if resumed else {})
        weights = save_result(trainable, output_dir, config, extra, type(pipe))
        samples = write_samples(pipe, config, concepts, config.max_train_steps, accelerator)
        write_loss_chart(losses, output_dir / "loss.png")
        (output_dir / "loss.json").write_text(json.dumps(losses))
        summary = {
            "method": config.method,
            "steps": config.max_train_steps,
            "steps_this_run": config.max_train_steps - trained_from,
            "minutes": round(minutes, 2),
            "processes": accelerator.num_processes,
            "global_batch": config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
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
        write_model_card(output_dir, config, concepts, summary, pipe)
        log("finish", f"step {config.max_train_steps}: wrote {weights} in {summary['minutes']} min")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# --- setup ---


def _accelerator(config):
    output_dir = Path(config.output_dir)
    log_with = None if config.report_to == "none" else config.report_to

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:  # a library caller may train several times in one process, with other settings each time
        AcceleratorState._reset_state(reset_partial_state=True)
    # Accelerate treats several processes without GPUs as one unless told to use the CPU; torchrun sets WORLD_SIZE.
    cpu_processes = processes > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(
            cpu=cpu_processes,
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
            ),
        )
    except (ValueError, RuntimeError, ImportError) as e:
        raise SvdiffError(f"cannot set up training: {str(e).splitlines()[0]}") from None


def _load_base(config, device, dtype: torch.dtype) -> Family:
    """The base pipeline in `dtype`, frozen, as its family (an unsupported pipeline is refused in one line)."""

    pipe = load_pipeline(
        config.pretrained_model_name_or_path,
        scheduler="ddim",
        revision=config.revision,
        variant=config.variant,
        device=device,
        dtype=dtype,
    )
    family = family_of(pipe, config)
    for model in family.frozen():
        model.requires_grad_(False)
    pipe.vae.eval()
    return family


def _cast_frozen(model, dtype) -> None:
    """Casts a model's weights, keeping trained float32 parameters (δ, LoRA) as they are."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for module in model.modules():  # the SVD factors follow the weights' dtype (their error only touches Δ)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and name in ("U", "Vh"):
                setattr(module, name, buf.to(dtype))


def _step_path(config, trainable, unet, accelerator) -> None:
    """How a step runs: svdiff's shifts merged into the weights once per step in shape groups where that measures
    faster (`--step_path`, spectral/merged.py; the choice is kept with each checkpoint, so a resumed run computes
    as the first did), and with `--compile` the denoiser compiled (on merged weights throughout, which have no
    graph break). After the final cast: merged groups hold views of the weights."""
    if trainable.method == "svdiff" and not config.base_dtype:  # a held base runs per call
        choose = "merged" if config.compile and config.step_path == "auto" else config.step_path
        for wiring in trainable.merge_steps(choose, report=accelerator.print):
            accelerator.register_for_checkpointing(wiring)
    if config.compile:
        # Only training steps run compiled: sampling (validation, class images) runs under no_grad at other
        # shapes, where a second compile of the whole denoiser costs more than the few steps it would speed.
        eager, compiled = unet.forward, torch.compile(unet.forward)
        unet.forward = lambda *a, **kw: (compiled if torch.is_grad_enabled() else eager)(*a, **kw)


def _lr_scheduler(config, optimizer):

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
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


def _resolution(resolution: int | None, family) -> int:
    """The training size: the base's own by default; otherwise a multiple of what the denoiser needs (whole
    latent cells through every downsampling or patch, and 8, what the sampling pipelines check), and at most
    twice the base's size."""
    native = family.native_resolution()
    if resolution is None:
        return native
    need = math.lcm(8, family.resolution_multiple())
    if resolution % need:
        raise SvdiffError(f"--resolution {resolution} must be a multiple of {need} on this base (e.g. {native})")
    if resolution > 2 * native:
        raise SvdiffError(f"--resolution {resolution} is more than twice this base's size {native}")
    return resolution


def _run_identity(config: TrainConfig, concepts) -> dict:
    """What a checkpoint must share with the run that resumes it: the settings that shape the optimizer state and
    the parameters, the base, and the subjects (their photos and prompts)."""
    return identity(config, single_subject=len(concepts) < 2) | {
        "base": base_name(config.pretrained_model_name_or_path),
        "data": [_images_digest(c.instance_images) for c in concepts],
        "concepts": [c.instance_prompt for c in concepts],
    }


def _resumed_changes(resume: Path, config: TrainConfig) -> dict:
    """{flag: [checkpoint's value, this run's]} of the settings this run changes; they apply from the checkpoint's
    step on and are recorded in the summary, the shift file and the model card. Fewer steps than the checkpoint
    has already trained is refused."""
    state = checkpoint.read_state(resume)
    if state["step"] > config.max_train_steps:
        raise SvdiffError(
            f"{resume} is at step {state['step']}, past --max_train_steps {config.max_train_steps}: give at least "
            f"{state['step']} steps, or resume from an earlier checkpoint"
        )
    return changes(state.get("args") or {}, config)


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


def _unmix(config, concepts, family) -> Unmix | None:
    """The Unmix loss's attention capture, when collages are made and the loss has a weight; checks first that
    every subject's phrase survives tokenization in the collage prompts."""
    if len(concepts) < 2 or config.cut_mix_unmix_prob <= 0 or config.unmix_weight <= 0:
        return None
    for a in concepts:
        for b in concepts:
            if a is not b:
                prompt = pair_prompt(a.instance_prompt, b.instance_prompt, config.seed, 0)
                for c in (a, b):
                    try:
                        family.text_positions(prompt, phrase(c.instance_prompt))
                    except ValueError as e:
                        raise SvdiffError(f"Unmix: {e}") from None
    try:
        return Unmix(family, config.unmix_layers)
    except ValueError as e:
        raise SvdiffError(f"--unmix_layers {config.unmix_layers!r}: {e}") from None


def _images_digest(images) -> str:
    """The identity of a subject: a hash of its decoded photos (the prompt names a subject, it does not identify it)."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def _average_gradients(params, accelerator) -> None:
    """Mean of every gradient over the processes, in buckets of ~16M values, so all processes take the same step."""
    if accelerator.num_processes == 1:
        return

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
