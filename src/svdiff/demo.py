"""`svdiff demo` (`make demo`): the main job end to end on an embedded tiny base. It personalizes one example
subject with prior preservation, then draws the same prompts with the same seeds before and after, and asks the
shapes-world judge how much the pictures look like the subject's photos."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .adapters import fuse, load_shifts
from .data.images import load_image_folder, to_model_input
from .errors import SvdiffError
from .families import family_of
from .models import base_name
from .pictures import grid
from .sample import load_pipeline, sample
from .train import train
from .train.recipes import subject as subject_recipe
from .world import GUIDANCE_SCALE, default_judge
from .world.evaluate import score, similarity
from .world.judge import load, read

CONTEXTS = ("", " on the left", " at the top on a dark background", " on the right on a beige background")


def demo_prompts(instance_prompt: str, class_prompt: str) -> list[str]:
    """The subject in the places and backgrounds of the world, then its class alone (to see the class kept)."""
    return [instance_prompt + c for c in CONTEXTS] + [class_prompt]


def judge_subject(images, references, prompt: str, marks: dict | None = None) -> dict:
    """Mean judge similarity to the reference photos, the share of images the judge reads as the prompt's shape,
    and, given the subject's `marks` ({"emblem": …, "emblem_color": …, "outline": …}), the share whose object
    carries exactly those marks."""

    judge = load(default_judge())
    refs = torch.stack([r["embedding"] for r in read(judge, references)])
    results = score(judge, images, prompt)
    embeddings = torch.stack([r["embedding"] for r in results])
    shape_ok = [all(m["correct"].get("shape", False) for m in r["objects"]) for r in results]
    out = {
        "similarity": round(float(similarity(embeddings, refs).mean()), 4),
        "shape_correct": round(sum(shape_ok) / len(shape_ok), 4),
    }
    if marks:
        found = [r["objects"][0]["found"] if r["objects"] else None for r in results]
        ok = [f is not None and all(f[k] == v for k, v in marks.items()) for f in found]
        out["marks_correct"] = round(sum(ok) / len(ok), 4)
    return out


@torch.no_grad()
def subject_loss(pipe, images, prompt: str, timesteps=range(50, 1000, 100), seed: int = 0) -> float:
    """How well a pipeline denoises the subject's own photos under its prompt: the training loss (ε, v or the
    flow) at fixed timesteps with fixed noise, averaged. Lower after training means the photos were learned."""

    family = family_of(pipe)
    size = family.native_resolution()
    pixels = torch.stack([to_model_input(im, size) for im in images]).to(pipe.device, pipe.vae.dtype)
    latents = family.latents(pixels)
    conditioning = family.encode([prompt] * len(images))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(latents)
        tt = torch.full((len(images),), t, device=latents.device)
        noisy, target = family.noise.at(latents, noise, tt)
        pred = family.predict(noisy, tt, conditioning)
        losses.append(float(((pred.float() - target.float()) ** 2).mean()))
    return round(sum(losses) / len(losses), 5)


def run_demo(
    output_dir: str | Path = "demo-output",
    subject: str | Path = "examples/subjects/heart_sks",
    max_train_steps: int = 400,
    num_class_images: int = 50,
    images_per_prompt: int = 4,
    guidance_scale: float = GUIDANCE_SCALE,
    seed: int = 0,
    progress: bool = True,
    base: str | Path | None = None,
) -> dict:
    """Personalizes `subject` on `base` (a shapes-world pipeline folder or embedded:flow; None: the UNet base) and
    writes the before/after grid, the shift file and `demo_summary.json` into `output_dir`."""

    began = time.time()
    subject, output_dir = Path(subject), Path(output_dir)
    try:
        card = json.loads((subject / "subject.json").read_text())
    except (OSError, ValueError) as e:
        raise SvdiffError(f"{subject} is not an example subject folder (subject.json: {e})") from None
    instance_prompt, class_prompt = card["instance_prompt"], card["class_prompt"]
    marks = {k: card.get("subject", {}).get(k) for k in ("emblem", "emblem_color", "outline")}
    prompts = demo_prompts(instance_prompt, class_prompt)
    summary = train(
        subject_recipe(
            subject,
            instance_prompt,
            class_prompt,
            output_dir / "class_images",
            pretrained_model_name_or_path=None if base is None else str(base),
            num_class_images=num_class_images,
            max_train_steps=max_train_steps,
            output_dir=str(output_dir),
            validation_prompt=tuple(prompts[:2]),
            validation_steps=max(1, max_train_steps // 4),
            num_validation_images=4,
            report_to="tensorboard",
            validation_guidance_scale=guidance_scale,
            seed=seed,
            progress=progress,
        )
    )

    def draw(pipe):
        return [
            sample(pipe, p, num_images=images_per_prompt, seed=seed, guidance_scale=guidance_scale, progress=False)
            for p in prompts
        ]

    references = load_image_folder(subject)
    pipe = load_pipeline(base)
    before = draw(pipe)
    loss_before = subject_loss(pipe, references, instance_prompt)
    load_shifts(pipe, summary["weights"], progress=False)
    fuse(pipe)
    after = draw(pipe)
    loss_after = subject_loss(pipe, references, instance_prompt)

    rows, labels = [], []
    for prompt, b, a in zip(prompts, before, after, strict=True):
        rows += b + a
        labels += [f"base: {prompt}", f"svdiff: {prompt}"]
    picture = output_dir / "before_after.png"
    grid(rows, cols=images_per_prompt, labels=labels).save(picture)

    subject_before = [im for imgs in before[:-1] for im in imgs]
    subject_after = [im for imgs in after[:-1] for im in imgs]
    result = {
        "base": base_name(base),
        "subject": str(subject),
        "instance_prompt": instance_prompt,
        "steps": summary["steps"],
        "train_minutes": summary["minutes"],
        "total_minutes": round((time.time() - began) / 60, 2),
        "shift_file": summary["weights"],
        "shift_file_bytes": summary["weights_bytes"],
        "subject_loss_before": loss_before,
        "subject_loss_after": loss_after,
        "judge_before": judge_subject(subject_before, references, instance_prompt, marks),
        "judge_after": judge_subject(subject_after, references, instance_prompt, marks),
        "class_prompt_before": judge_subject(before[-1], references, class_prompt, marks),
        "class_prompt_after": judge_subject(after[-1], references, class_prompt, marks),
        "picture": str(picture),
    }
    (output_dir / "demo_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
