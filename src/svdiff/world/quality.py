"""The world's quality figures: how well the judge reads fresh renders, and how well the base model draws prompts
it never saw. `svdiff world report` and `benchmarks/world_quality.py` print them."""

import itertools
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..families import call_arguments
from ..pictures import grid
from ..sample import load_pipeline
from . import GUIDANCE_SCALE, default_judge
from .evaluate import match, parse_prompt, score
from .judge import SLOTS, load, nearest_slot, read
from .render import (
    BODY_SHAPES,
    COLORS,
    PATTERNS,
    POSITION_PHRASES,
    SHAPES,
    Scene,
    describe,
    held_out,
    random_scene,
    render,
)
from .subjects import examples, random_subject, unseen_subject, views
from .tokenizer import IDENTIFIERS

MARKS = ("emblem", "emblem_color", "outline")


def judge_accuracy(model, n_scenes: int, seed: int) -> dict:
    """Per-attribute accuracy over every object of `n_scenes` fresh scenes (a seed the judge never trained on),
    half of whose objects carry marks. Marks are counted over the shapes that can carry them (emblem and outline,
    "none" included) and emblem color over the objects that have an emblem."""
    rng = random.Random(f"eval-{seed}")
    rendered = [render(random_scene(rng, marks=0.5)) for _ in range(n_scenes)]
    readings = read(model, [im for im, _ in rendered])
    hits, totals = {}, {}
    for (_, truth), reading in zip(rendered, readings, strict=True):
        for obj in truth.objects:
            found = reading["slots"][SLOTS[nearest_slot(obj["box"])]]
            asked = ["position", "shape", "color", "pattern"]
            if obj["shape"] in BODY_SHAPES:
                asked += ["emblem", "outline"] + (["emblem_color"] if obj["emblem"] else [])
            for k in asked:
                totals[k] = totals.get(k, 0) + 1
                hits[k] = hits.get(k, 0) + (found is not None and (k == "position" or found[k] == obj[k]))
    return {k: round(hits[k] / totals[k], 4) for k in totals} | {"objects": totals["position"]}


# A mark's color counts as kept when the mean color of its pixels comes back within this many levels per channel.
MARK_COLOR_TOLERANCE = 16


def mark_masks(scene: Scene) -> dict[str, np.ndarray]:
    """Where each mark of the scene's first object shows: the pixels that change when the mark is left out."""
    full = np.asarray(render(scene)[0], dtype=np.int16)
    obj, rest = scene.objects[0], scene.objects[1:]
    masks = {}
    for mark, bare in (("outline", replace(obj, outline=None)), ("emblem", replace(obj, emblem=None))):
        without = np.asarray(render(replace(scene, objects=(bare, *rest)))[0], dtype=np.int16)
        masks[mark] = np.abs(full - without).max(axis=-1) > MARK_COLOR_TOLERANCE
    return masks


def fidelity_subjects(n_fresh: int, seed: int) -> dict[str, tuple]:
    """The example subjects and `n_fresh` new subjects of held-out identities, four views each: name → (subject,
    rendered views, each view's mark masks)."""
    scenes = {name: (subject, views_) for name, (subject, views_) in examples().items()}
    rng = random.Random(f"fidelity-{seed}")
    for i in range(n_fresh):
        subject = unseen_subject(rng)
        scenes[f"fresh_{i:02d}"] = (subject, views(subject, 4, rng))
    return {
        name: (subject, [render(v)[0] for v in views_], [mark_masks(v) for v in views_])
        for name, (subject, views_) in scenes.items()
    }


def mark_colors_kept(recon: np.ndarray, real: np.ndarray, masks: list[dict]) -> dict[str, float]:
    """Per mark, the share of views whose reconstruction brings the mark's mean color back within
    MARK_COLOR_TOLERANCE levels in every channel (a pixel test, apart from the judge)."""
    kept = {}
    for mark in masks[0]:
        ok = [
            np.abs(r[m[mark]].mean(0) - x[m[mark]].mean(0)).max() <= MARK_COLOR_TOLERANCE
            for r, x, m in zip(recon, real, masks, strict=True)
            if m[mark].any()
        ]
        kept[mark] = round(sum(ok) / len(ok), 4)
    return kept


def mutual(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of a[i] to b[j] over i ≠ j: how much an image looks like the subject's other views."""
    sim = a @ b.T
    return float(sim[~torch.eye(len(sim), dtype=torch.bool)].mean())


def marks_read(readings: list[dict], truth: dict) -> float:
    """The share of judge readings whose most confident object carries exactly the marks `truth` names."""
    found = [max((f for f in r["slots"].values() if f), key=lambda f: f["confidence"], default=None) for r in readings]
    ok = [f is not None and all(f[k] == v for k, v in truth.items()) for f in found]
    return round(sum(ok) / len(ok), 4)


@torch.no_grad()
def autoencoder_fidelity(vae, model, subjects: dict[str, tuple]) -> dict:
    """Whether the autoencoder can draw the subjects at all: each view encoded and decoded
    (`vae.decode(vae.encode(x).latent_dist.mode())`), then the judge's similarity of each reconstruction to the
    subject's other real views against the real views' own mutual similarity, the mean absolute error in levels
    of 255, and how often the judge reads the subject's marks (emblem, its color, outline) on the reconstructions
    and on the views themselves."""
    rows = {}
    for name, (subject, images, masks) in subjects.items():
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images]).permute(0, 3, 1, 2)
        x = x / 127.5 - 1.0
        recon = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
        recon_images = [Image.fromarray(a) for a in ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
        real, back = read(model, images), read(model, recon_images)
        zr = torch.stack([r["embedding"] for r in real])
        zb = torch.stack([r["embedding"] for r in back])
        truth = {k: getattr(subject, k) for k in MARKS}
        views_similarity, recon_similarity = mutual(zr, zr), mutual(zb, zr)
        rows[name] = {
            "views_vs_each_other": round(views_similarity, 4),
            "reconstruction_vs_other_views": round(recon_similarity, 4),
            "ratio": round(recon_similarity / views_similarity, 4),
            "mean_abs_error_levels": round(float((recon - x).abs().mean() * 127.5), 3),
            "marks_read": marks_read(back, truth),
            "marks_read_on_views": marks_read(real, truth),
            "mark_colors_kept": mark_colors_kept(
                np.stack([np.asarray(im, dtype=np.float32) for im in recon_images]),
                np.stack([np.asarray(im, dtype=np.float32) for im in images]),
                masks,
            ),
        }
    summary = {
        "worst_ratio": min(r["ratio"] for r in rows.values()),
        "mean_ratio": round(sum(r["ratio"] for r in rows.values()) / len(rows), 4),
        "worst_mean_abs_error_levels": max(r["mean_abs_error_levels"] for r in rows.values()),
        "mean_abs_error_levels": round(sum(r["mean_abs_error_levels"] for r in rows.values()) / len(rows), 3),
        "marks_read": round(sum(r["marks_read"] for r in rows.values()) / len(rows), 4),
        "marks_read_on_views": round(sum(r["marks_read_on_views"] for r in rows.values()) / len(rows), 4),
        **{
            f"{mark}_color_kept": round(sum(r["mark_colors_kept"][mark] for r in rows.values()) / len(rows), 4)
            for mark in ("outline", "emblem")
        },
        "subjects": len(rows),
    }
    return {"summary": summary, "subjects": rows}


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


def mark_prompts(n: int, seed: int) -> list[str]:
    """Prompts that name marks, on identities held out of pretraining: an emblem, an outline or both, on a body
    shape, half of them with a place ("a photo of a pink striped heart with a white outline and a black diamond
    emblem on the left")."""
    rng = random.Random(f"marks-{seed}")
    prompts = []
    for i in range(n):
        subject = unseen_subject(rng)
        if i % 3 == 1:
            subject = replace(subject, outline=None)
        elif i % 3 == 2:
            subject = replace(subject, emblem=None, emblem_color=None)
        text = f"a photo of a {describe(subject)}"
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
            **call_arguments(pipe),
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
    settings = dict(guidance_scale=guidance_scale, height=64, width=64, **call_arguments(pipe))
    pipe(prompts[:2], num_inference_steps=2, **settings)
    began = time.perf_counter()
    pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **settings)
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
            e = pipe.text_encoder(ids.to(pipe.text_encoder.device)).last_hidden_state.flatten(1).float()
        pairs = list(itertools.combinations(range(len(prompts)), 2))
        return round(sum(float((e[i] - e[j]).norm() / e[i].norm()) for i, j in pairs) / len(pairs), 4)

    return {
        "identifiers": spread([f"a photo of {w} heart" for w in IDENTIFIERS]),
        "colors": spread([f"a photo of a {c} heart" for c in COLORS]),
    }


def mark_accuracy(model, images, prompts) -> dict:
    """Per mark the prompts name (emblem, its color, outline), how often the judge finds it on the asked-for
    object, and how often every named mark is right."""
    counts, totals, every = {}, {}, 0
    for image, prompt in zip(images, prompts, strict=True):
        (m,) = score(model, [image], prompt)[0]["objects"]
        named = {k: ok for k, ok in m["correct"].items() if k in MARKS}
        every += all(named.values())
        for k, ok in named.items():
            counts[k] = counts.get(k, 0) + ok
            totals[k] = totals.get(k, 0) + 1
    return {k: round(counts[k] / totals[k], 4) for k in totals} | {"all_marks_correct": round(every / len(prompts), 4)}


def measure(
    quick: bool = False, seed: int = 0, guidance_scale: float = GUIDANCE_SCALE, threads: int = 2, base=None
) -> dict:
    """The figures of `benchmarks/world_quality.py` for the shipped base, or for `base` (a folder or an embedded
    base's name)."""
    torch.set_num_threads(threads)
    judge = load(default_judge())
    n_scenes, n_subjects, n_single, n_pairs, n_fresh = (200, 50, 40, 20, 4) if quick else (2000, 200, 200, 100, 20)
    pipe = load_pipeline(base, device="cpu")
    single = unseen_single_prompts(n_single, seed)
    pairs = pair_prompts(n_pairs, seed)
    bare = class_prompts(n_pairs)
    marked = mark_prompts(n_pairs, seed)
    return {
        "judge_on_fresh_renders": judge_accuracy(judge, n_scenes, seed),
        "judge_subject_similarity": subject_similarity(judge, n_subjects, seed),
        "autoencoder_on_subjects": autoencoder_fidelity(pipe.vae, judge, fidelity_subjects(n_fresh, seed)),
        "base_unseen_single_object": prompt_accuracy(judge, generate(pipe, single, guidance_scale, 25, seed), single)
        | {"prompts": n_single},
        "base_left_right_pairs": pair_accuracy(judge, generate(pipe, pairs, guidance_scale, 25, seed + 1), pairs)
        | {"prompts": n_pairs},
        "base_class_prompts": prompt_accuracy(judge, generate(pipe, bare, guidance_scale, 25, seed + 2), bare)
        | {"prompts": len(bare)},
        "base_mark_prompts": mark_accuracy(judge, generate(pipe, marked, guidance_scale, 25, seed + 3), marked)
        | {"prompts": len(marked)},
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
    pipe = load_pipeline(base, device="cpu")
    images = []
    for prompt in tqdm(SHOWCASE_PROMPTS, desc="showcase"):
        images += pipe(
            [prompt] * per_prompt,
            num_inference_steps=25,
            guidance_scale=guidance_scale,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            **call_arguments(pipe),
        ).images
    grid(images, cols=per_prompt, labels=list(SHOWCASE_PROMPTS)).save(path)


def subject_sheet(path, examples_dir) -> None:
    """A row per example subject folder: its views, labelled with its instance prompt."""
    folders = sorted(p for p in Path(examples_dir).iterdir() if p.is_dir())
    views = [Image.open(f).convert("RGB") for folder in folders for f in sorted(folder.glob("*.png"))[:4]]
    labels = [f"{p.name}: " + json.loads((p / "subject.json").read_text())["instance_prompt"] for p in folders]
    grid(views, cols=4, labels=labels).save(path)
