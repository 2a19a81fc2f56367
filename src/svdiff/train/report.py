"""What a run leaves for a person: validation grids (samples/step-N.png), the loss curve (loss.png) and a model
card (README.md) saying what was trained, on which base, and how to use it."""

from __future__ import annotations

import html
import re
import shlex
from pathlib import Path

import numpy as np
import yaml

from ..models import base_name
from ..pictures import grid, line_chart
from ..sample import sample


def validation_prompts(args, concepts) -> list[str]:
    return args.validation_prompt or list(dict.fromkeys(c.instance_prompt for c in concepts))


def write_samples(pipe, args, concepts, step: int, accelerator) -> Path:
    """One row per validation prompt, the same seeds at every step, so rows are comparable across grids."""
    prompts = validation_prompts(args, concepts)
    images = []
    with accelerator.autocast():
        for prompt in prompts:
            images += sample(
                pipe,
                prompt,
                num_images=args.num_validation_images,
                seed=args.seed,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                height=args.resolution,
                width=args.resolution,
                progress=False,
            )
    scale = max(1, 128 // args.resolution)
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=args.num_validation_images, scale=scale, labels=prompts).save(path)
    if args.report_to in ("tensorboard", "all"):
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                arr = np.stack([np.asarray(im) for im in images])
                tracker.writer.add_images("validation", arr, step, dataformats="NHWC")
    return path


def write_loss_chart(losses: list, path: Path) -> Path:
    """The loss per step and its moving average (the raw curve of diffusion training is mostly noise)."""
    raw = [(float(s), float(v)) for s, v in losses]
    smooth, avg = [], None
    for s, v in raw:
        avg = v if avg is None else 0.95 * avg + 0.05 * v
        smooth.append((s, avg))
    line_chart({"loss": raw, "moving average": smooth}, title="training loss per step").save(path)
    return path


TITLES = {"svdiff": "Spectral shifts (SVDiff)", "lora": "A LoRA", "full": "A fine-tuned {denoiser} and text encoder"}
USAGE = {
    "svdiff": """```python
import svdiff
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained({base})
svdiff.load_shifts(pipe, {weights!r})
image = pipe({prompt!r}).images[0]
```

or from the command line:

```bash
svdiff generate {base_flag}--shifts {weights_q} --prompt {prompt_q}
```""",
    "lora": """```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained({base})
pipe.load_lora_weights({output!r})
image = pipe({prompt!r}).images[0]
```""",
    "full": """```python
from diffusers import {pipeline}, {denoiser_class}

{denoiser} = {denoiser_class}.from_pretrained({output!r}, subfolder="{denoiser}")
pipe = {pipeline}.from_pretrained({base}, {denoiser}={denoiser})
image = pipe({prompt!r}).images[0]
```""",
}
# The hub's tag of each pipeline's family.
TAGS = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def markdown_text(text) -> str:
    """`text` shown as itself in Markdown: one line, HTML escaped, Markdown's punctuation backslash-escaped (a prompt
    may hold anything, and must neither open a heading, a table cell or a link nor inject HTML)."""
    flat = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]()#|!~])", r"\\\1", html.escape(flat, quote=False))


def _fenced(block: str) -> str:
    """A code fence longer than any run of backticks inside, so the block cannot close it early."""
    longest = max((len(m) for m in re.findall(r"`+", block)), default=0)
    return "`" * max(3, longest + 1)


def write_model_card(output_dir: Path, args, concepts, summary: dict, pipe=None) -> Path:
    """README.md of a run: what was trained on which base, how to use it (with `pipe`'s pipeline class and
    denoiser; an SD pipeline without one), samples, settings and the loss."""
    pipeline = type(pipe).__name__ if pipe is not None else "StableDiffusionPipeline"
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser_class = type(getattr(pipe, denoiser)).__name__ if pipe is not None else "UNet2DConditionModel"
    given = args.pretrained_model_name_or_path
    base = repr(str(given)) if given else "svdiff.default_base()"
    base_label = markdown_text(args.pretrained_model_name_or_path or "the embedded svdiff-tiny pipeline")
    # one line, as the tokenizer sees it (it collapses whitespace): a newline cannot break the front matter or the
    # pasted command
    prompt = " ".join(concepts[0].instance_prompt.split())
    usage = USAGE[args.method].format(
        base=base,
        weights=summary["weights"],
        output=str(output_dir),
        prompt=prompt,
        # what a person pastes into a shell: every value quoted, so `$(…)` or `;` in a prompt or path stays text
        weights_q=shlex.quote(str(summary["weights"])),
        prompt_q=shlex.quote(prompt),
        base_flag=f"--pretrained_model_name_or_path {shlex.quote(str(given))} " if given else "",
        pipeline=pipeline,
        denoiser=denoiser,
        denoiser_class=denoiser_class,
    )
    title = TITLES[args.method].format(denoiser="UNet" if denoiser == "unet" else "transformer")
    fence = _fenced(usage)
    usage = usage.replace("```", fence)
    concept_lines = "\n".join(
        f"- {markdown_text(c.instance_prompt)} ({len(c.instance_images)} images"
        + (f"; prior: {markdown_text(c.class_prompt)}, {len(c.class_images)} class images)" if c.class_images else ")")
        for c in concepts
    )
    front = {
        "base_model": base_name(args.pretrained_model_name_or_path),
        "library_name": "svdiff",
        "tags": ["text-to-image", TAGS.get(pipeline, "diffusers"), "diffusers", "svdiff"]
        + ([] if args.method == "svdiff" else [args.method]),
        "instance_prompt": prompt,
    }
    resumed = summary.get("resumed")
    resumed_row = ""
    if resumed:
        changes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in resumed["changed"].items()) or "no settings changed"
        resumed_row = f"\n| resumed | from step {resumed['step']} ({markdown_text(changes)}) |"
    samples = Path(summary["samples"]).relative_to(output_dir)
    rate_1d = f" (1-D weights {args.learning_rate_1d:g})" if args.method == "svdiff" else ""
    text = f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=2**20)}---

# {markdown_text(output_dir.resolve().name)}

{title} trained with `svdiff train` on {base_label}.

Trigger prompt: {markdown_text(prompt)}

{concept_lines}

## Use

{usage}

## Samples (step {summary["steps"]}, seeds {args.seed}…{args.seed + args.num_validation_images - 1})

![samples]({samples.as_posix()})

## Training

| | |
|---|---|
| method | {args.method} |
| steps | {summary["steps"]} (global batch {summary["global_batch"]}) |{resumed_row}
| learning rate | {args.learning_rate:g}{rate_1d} |
| prior preservation | {f"yes, weight {args.prior_loss_weight:g}" if args.with_prior_preservation else "no"} |
| text encoder trained | {"yes" if args.train_text_encoder else "no"} |
| trained parameters | {summary["trained_parameters"]:,} |
| file | `{Path(summary["weights"]).name}`, {summary["weights_bytes"] / 1e6:.2f} MB |
| time | {summary["minutes"]:.1f} min on {summary["processes"]} process(es) |

![loss](loss.png)
"""
    path = output_dir / "README.md"
    path.write_text(text)
    return path
