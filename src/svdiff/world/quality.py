"""The world's quality figures: how well the judge reads fresh renders, and how well the base model draws prompts
it never saw. `svdiff world report` and `benchmarks/world_quality.py` print them."""

import itertools
import json
import random
import time
from pathlib import Path

import diffusers
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..pictures import grid
from . import GUIDANCE_SCALE, default_base, default_judge
from .evaluate import match, parse_prompt, score
from .judge import load, nearest_slot, read
from .render import COLORS, PATTERNS, POSITION_PHRASES, SHAPES, held_out, random_scene, render
from .subjects import random_subject, views
from .tokenizer import IDENTIFIERS


def judge_accuracy(model, n_scenes: int, seed: int) -> dict:
    """Per-attribute accuracy over every object of `n_scenes` fresh scenes (a seed the judge never trained on)."""
    rng = random.Random(f"eval-{seed}")
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    rendered = [render(s) for s in scenes]
    readings = read(model, [im for im, _ in rendered])
    hits = {"shape": 0, "color": 0, "pattern": 0, "position": 0}
    total = 0
    for (_, truth), reading in zip(rendered, readings, strict=True):
        for obj in truth.objects:
            found = reading["slots"][list(reading["slots"])[nearest_slot(obj["box"])]]
            total += 1
            hits["position"] += found is not None
            for k in ("shape", "color", "pattern"):
                hits[k] += found is not None and found[k] == obj[k]
    return {k: round(v / total, 4) for k, v in hits.items()} | {"objects": total}


def subject_similarity(model, n_subjects: int, seed: int) -> dict:
    """Cosine similarity of two views of one subject against views of different subjects, and how often a view's
    nearest neighbour among the others' second views is its own subject."""
    rng = random.Random(f"eval-subjects-{seed}")
    firsts, seconds = [], []
    for _ in range(n_subjects):
        a, b = views(random_subject(rng), 2, rng)
        firsts.append(render(a)[0])
        seconds.append(render(b)[0])
    za = torch.stack([r["embedding"] for r in read(model, firsts)])
    zb = torch.stack([r["embedding"] for r in read(model, seconds)])
    sim = za @ zb.T
    same = sim.diag()
    other = sim[~torch.eye(len(sim), dtype=torch.bool)]
    return {
        "same_subject": round(float(same.mean()), 4),
        "different_subject": round(float(other.mean()), 4),
        "retrieval_top1": round(float((sim.argmax(dim=1) == torch.arange(len(sim))).float().mean()), 4),
    }


def unseen_single_prompts(n: int, seed: int) -> list[str]:
    """Prompts naming a (shape, color, pattern) triple held out of pretraining, half of them with a place."""
    triples = [(s, c, p) for s in SHAPES for c in COLORS for p in PATTERNS if held_out(s, c, p)]
    rng = random.Random(f"unseen-{seed}")
    prompts = []
    for i in range(n):
        shape, color, pattern = triples[i % len(triples)]
        text = f"a photo of a {color} {pattern} {shape}"
        if rng.random() < 0.5:
            text += " " + POSITION_PHRASES[rng.choice(tuple(POSITION_PHRASES))]
        prompts.append(text)
    return prompts


def class_prompts(n: int) -> list[str]:
    """Bare class prompts ("a photo of a heart"): what prior preservation asks the base to draw."""
    return [f"a photo of a {SHAPES[i % len(SHAPES)]}" for i in range(n)]


def pair_prompts(n: int, seed: int) -> list[str]:
    """Left/right prompts: two different shapes, each with its color."""
    rng = random.Random(f"pairs-{seed}")
    prompts = []
    for _ in range(n):
        a, b = rng.sample(SHAPES, 2)
        ca, cb = rng.sample(list(COLORS), 2)
        prompts.append(f"a photo of a {ca} {a} on the left and a {cb} {b} on the right")
    return prompts


def generate(pipe, prompts, guidance_scale: float, steps: int, seed: int, batch_size: int = 20) -> list:
    images = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling"):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        images += pipe(
            prompts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            height=64,
            width=64,
        ).images
    return images


def prompt_accuracy(model, images, prompts) -> dict:
    """Fraction of images whose judged objects have each attribute the prompt asked for."""
    counts, totals = {}, {}
    all_correct = 0
    for image, prompt in zip(images, prompts, strict=True):
        result = score(model, [image], prompt)[0]
        all_correct += result["all_correct"]
        for m in result["objects"]:
            for k, ok in m["correct"].items():
                counts[k] = counts.get(k, 0) + ok
                totals[k] = totals.get(k, 0) + 1
    out = {k: round(counts[k] / totals[k], 4) for k in totals}
    out["all_correct"] = round(all_correct / len(prompts), 4)
    return out


def pair_accuracy(model, images, prompts) -> dict:
    """Both objects right (shape and color, each at its side), and each side on its own."""
    both, sides = 0, 0
    for image, prompt in zip(images, prompts, strict=True):
        reading = read(model, [image])[0]
        ok = [m["correct"]["shape"] and m["correct"]["color"] for m in match(reading, parse_prompt(prompt))]
        both += all(ok)
        sides += sum(ok)
    return {"both_correct": round(both / len(prompts), 4), "side_correct": round(sides / (2 * len(prompts)), 4)}


def sampling_seconds(pipe, guidance_scale: float, steps: int = 25, n: int = 16) -> float:
    """Wall time of one call drawing `n` images at 64 px (after a warm-up call)."""
    prompts = ["a photo of a red striped star"] * n
    pipe(prompts[:2], num_inference_steps=2, guidance_scale=guidance_scale, height=64, width=64)
    began = time.perf_counter()
    pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    return round(time.perf_counter() - began, 2)


def text_separation(pipe) -> dict:
    """How far apart the text encoder puts prompts that differ in one word: an identifier ("a photo of sks heart"
    against "a photo of xyz heart") and, for scale, a color ("a photo of a pink heart" against "… blue heart"):
    the mean distance between the encoder's outputs relative to their size, over every pair. Fine-tuning binds
    two subjects to two identifiers only as well as the encoder tells the identifiers apart."""

    def spread(prompts: list[str]) -> float:
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            e = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].flatten(1).float()
        pairs = list(itertools.combinations(range(len(prompts)), 2))
        return round(sum(float((e[i] - e[j]).norm() / e[i].norm()) for i, j in pairs) / len(pairs), 4)

    return {
        "identifiers": spread([f"a photo of {w} heart" for w in IDENTIFIERS]),
        "colors": spread([f"a photo of a {c} heart" for c in COLORS]),
    }


def measure(
    quick: bool = False, seed: int = 0, guidance_scale: float = GUIDANCE_SCALE, threads: int = 2, base=None
) -> dict:
    """The figures of `benchmarks/world_quality.py` for the shipped base, or for the pipeline folder `base`."""
    torch.set_num_threads(threads)
    judge = load(default_judge())
    n_scenes, n_subjects, n_single, n_pairs = (200, 50, 40, 20) if quick else (2000, 200, 200, 100)
    pipe = diffusers.DiffusionPipeline.from_pretrained(base or default_base())
    pipe.set_progress_bar_config(disable=True)
    single = unseen_single_prompts(n_single, seed)
    pairs = pair_prompts(n_pairs, seed)
    bare = class_prompts(n_pairs)
    return {
        "judge_on_fresh_renders": judge_accuracy(judge, n_scenes, seed),
        "judge_subject_similarity": subject_similarity(judge, n_subjects, seed),
        "base_unseen_single_object": prompt_accuracy(judge, generate(pipe, single, guidance_scale, 25, seed), single)
        | {"prompts": n_single},
        "base_left_right_pairs": pair_accuracy(judge, generate(pipe, pairs, guidance_scale, 25, seed + 1), pairs)
        | {"prompts": n_pairs},
        "base_class_prompts": prompt_accuracy(judge, generate(pipe, bare, guidance_scale, 25, seed + 2), bare)
        | {"prompts": len(bare)},
        "text_separation": text_separation(pipe),
        "sampling_16_images_25_ddim_steps_seconds": sampling_seconds(pipe, guidance_scale),
        "settings": {
            "guidance_scale": guidance_scale,
            "num_inference_steps": 25,
            "torch_threads": threads,
            "seed": seed,
        },
    }


SHOWCASE_PROMPTS = (
    "a photo of a red star",
    "a photo of a blue striped heart on the left",
    "a photo of a yellow dotted square at the top on a dark background",
    "a photo of a green checkered ring",
    "a photo of a pink circle on the left and a cyan cross on the right",
    "a photo of a purple triangle at the top and an orange diamond at the bottom",
)


def base_sheet(path, guidance_scale: float = GUIDANCE_SCALE, per_prompt: int = 6, base=None) -> None:
    """A row of base-model samples per showcase prompt, seeds 0…per_prompt-1 in one batch."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(base or default_base())
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in tqdm(SHOWCASE_PROMPTS, desc="showcase"):
        images += pipe(
            [prompt] * per_prompt,
            num_inference_steps=25,
            guidance_scale=guidance_scale,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
        ).images
    grid(images, cols=per_prompt, labels=list(SHOWCASE_PROMPTS)).save(path)


def subject_sheet(path, examples_dir) -> None:
    """A row per example subject folder: its views, labelled with its instance prompt."""
    folders = sorted(p for p in Path(examples_dir).iterdir() if p.is_dir())
    views = [Image.open(f).convert("RGB") for folder in folders for f in sorted(folder.glob("*.png"))[:4]]
    labels = [f"{p.name}: " + json.loads((p / "subject.json").read_text())["instance_prompt"] for p in folders]
    grid(views, cols=4, labels=labels).save(path)
