"""Multi-subject personalization on the embedded tiny world: two subjects trained together without Cut-Mix-Unmix,
with it, and with it plus the Unmix loss; a same-class pair (two hearts) and a different-class pair.

    HF_HUB_OFFLINE=1 python benchmarks/multi_subject.py [--steps 800] [--seeds 16] [--train_seeds 3]
        [--runs runs/multi_subject]
        [--out docs/results/multi_subject/multi_subject.json] [--unmix_sweep W …] [--scale_sweep S …]
        [--prob_sweep P …] [--identifiers WORD1 WORD2] [--with_prior_preservation] [--base FOLDER]

Every generation uses the same seeds and prompts unlike the training templates (they name a background), naming
the left subject first: the base binds a pair by the order of its names, as every pretraining caption names the
left object first (`base_order` in the JSON: the untuned base on a pink and a blue heart, named left first and
right first).
The judge scores each half of a picture on its own (the other half painted over with this half's border color):
  present        the judge finds the asked shape on both sides;
  side right     a half's embedding is closer to its own subject's photos than to the other's and above the
                 identity threshold, calibrated on real renders of the pair (the 5th percentile of a real half's
                 similarity to its own subject);
  disentangled   present and each half closer to its own subject's photos than to the other's (no threshold:
                 on weakly learned subjects no half passes it, and "side right" says how many do);
  blended        present, but both halves look most like the same subject;
  stitched       a hard seam at the middle: in more than 60% of the rows (taller than any object) the two middle
                 columns differ by over 12 levels of 255;
  name effect    per side, how far the half follows the name the prompt gives it: its lean toward the first
                 subject (judge similarity to its photos minus to the second's) with the first named there, minus
                 with the names swapped, same seeds (right side sign-flipped; 0: the side ignores its name).
  identity separation  each subject drawn alone under its own name ("a photo of sks heart on a gray background"),
                 same seeds: the first name's lean toward the first subject minus the second name's (0: the two
                 names draw the same picture; `identity_separation_of_photos` is the subjects' own photos' figure).
Each pair's three main configurations are trained --train_seeds times (training seeds 0, 1, …; a run's figures
vary with its seed by several points) and their figures averaged; `disentangled by training seed` lists each.
The same-class pair is also trained once with Cut-Mix-Unmix on collages whose photos are drawn at random instead
of matched by background (`--no-cut_mix_match_background`), and once per sweep value. Trained runs are kept in
--runs and reused; delete one to retrain it.
"""

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from svdiff.world import GUIDANCE_SCALE

from common import SUBJECTS, QualityRun, embed, keep_half, subject_card

PAIRS = {"same class": ("heart_sks", "heart_xyz"), "different class": ("heart_sks", "star_zwx")}
CONFIGS = {
    "no Cut-Mix-Unmix": {"cut_mix_unmix_prob": 0.0},
    "Cut-Mix": {"cut_mix_unmix_prob": 0.6, "unmix_weight": 0.0},
    "Cut-Mix-Unmix": {"cut_mix_unmix_prob": 0.6},
}
# Unlike the training collages' "a photo of a A on the left and a B on the right" / "a photo of a A and a B" (their
# backgrounds), naming the left subject first: the base binds a pair by order (`base_order`).
PROMPTS = (
    "a photo of a {a} on the left and a {b} on the right on a dark background",
    "a photo of a {a} on the left and a {b} on the right on a white background",
    "a photo of a {a} on the left and a {b} on the right on a beige background",
    "a photo of a {a} on the left and a {b} on the right on a gray background",
)
# Each subject alone under its own name, the same seeds for both.
ALONE = "a photo of {a} on a gray background"


def seam(image: Image.Image) -> bool:
    """A hard seam at the middle: across most rows (more than an object's height), a color jump between the two
    middle columns."""
    a = np.asarray(image.convert("RGB")).astype(float)
    mid = a.shape[1] // 2
    jump = np.abs(a[:, mid] - a[:, mid - 1]).mean(axis=1)  # per row
    return bool((jump > 12).mean() > 0.6)


def calibrate(judge, pair, refs, n: int = 64) -> float:
    """The 5th percentile of a real half's similarity to its own subject, over renders of the pair side by side."""
    from svdiff.world.render import BACKGROUNDS, Scene, WorldObject, render

    rng = random.Random(0)
    own = []
    for _ in range(n):
        objs = []
        for name, place in zip(pair, ("left", "right"), strict=True):
            s = subject_card(name)["subject"]
            objs.append(replace(WorldObject(**s), position=place, size="medium", angle=round(rng.uniform(-20, 20), 1)))
        image, _ = render(Scene(tuple(objs), background=rng.choice(tuple(BACKGROUNDS))))
        for k, side in enumerate(("left", "right")):
            own.append(float((embed(judge, [keep_half(image, side)]) @ refs[pair[k]].T).mean()))
    return float(np.percentile(own, 5))


def score(judge, images, pair, refs, threshold) -> dict:
    from svdiff.world.judge import read

    shapes = [subject_card(n)["class_word"] for n in pair]
    counts = {"present": 0, "left right": 0, "right right": 0, "disentangled": 0, "blended": 0, "stitched": 0}
    for image in images:
        slots = read(judge, [image])[0]["slots"]
        present = all(
            slots[p] is not None and slots[p]["shape"] == s for p, s in zip(("left", "right"), shapes, strict=True)
        )
        best = []
        for k, side in enumerate(("left", "right")):
            e = embed(judge, [keep_half(image, side)])
            sims = [float((e @ refs[n].T).mean()) for n in pair]
            ok = sims[k] >= threshold and sims[k] > sims[1 - k]
            counts[f"{side} right"] += ok
            best.append(int(np.argmax(sims)))
        counts["present"] += present
        counts["disentangled"] += present and best == [0, 1]
        counts["blended"] += present and best[0] == best[1]
        counts["stitched"] += seam(image)
    return {k: round(v / len(images), 4) for k, v in counts.items()}


def similarity_margin(judge, images, pair, refs) -> float:
    """How much more the pictures look like the first subject of the pair than the second, on average: judge
    similarity to the first's photos minus to the second's (the figures' "lean toward the first subject")."""
    e = embed(judge, images)
    return float(((e @ refs[pair[0]].T).mean(dim=1) - (e @ refs[pair[1]].T).mean(dim=1)).mean())


def name_effect(judge, named, swapped, pair, refs) -> dict:
    """How far each side follows the name it is given: a half's `similarity_margin` with the first
    subject named on the left, minus the same with the two names swapped (same seeds); the right side's sign
    flipped. Positive: the side draws whoever the prompt puts there; 0: it draws the same whatever the names."""

    def half(images, side):
        return similarity_margin(judge, [keep_half(i, side) for i in images], pair, refs)

    return {
        side: round(sign * (half(named, side) - half(swapped, side)), 4) for side, sign in (("left", 1), ("right", -1))
    }


def base_order(pipe, judge, seeds: int, guidance_scale: float) -> dict:
    """How the untuned base binds a pair: the share of pictures whose left object the judge reads as pink and
    right one as blue, for "a pink striped heart on the left and a blue dotted heart on the right" (left named
    first, as in every pretraining caption) and the same pair named right first."""
    from svdiff.sample import sample
    from svdiff.world.judge import read

    pink, blue = "a pink striped heart on the left", "a blue dotted heart on the right"
    out = {}
    for label, prompt in (
        ("left named first", f"a photo of {pink} and {blue}"),
        ("right named first", f"a photo of {blue} and {pink}"),
    ):
        images = sample(pipe, prompt, num_images=seeds, guidance_scale=guidance_scale, progress=False)
        slots = [r["slots"] for r in read(judge, images)]
        out[label] = round(
            sum(
                bool(s["left"] and s["left"]["color"] == "pink" and s["right"] and s["right"]["color"] == "blue")
                for s in slots
            )
            / seeds,
            4,
        )
    return out


def identity_separation(judge, first, second, pair, refs) -> float:
    """How far apart two sets of pictures are in the judge's eyes: the `similarity_margin` of `first`
    minus that of `second`. 0: alike; the subjects' own photos give the figure a perfect learner would reach
    (`identity_separation_of_photos` in the JSON)."""
    return round(similarity_margin(judge, first, pair, refs) - similarity_margin(judge, second, pair, refs), 4)


def unmix_scale(pipe, pair, phrase_pair, base, n: int = 32) -> dict:
    """The diffusion loss and the unweighted Unmix term on the first `n` collage batches a training run of the pair
    draws, with the untuned base (the start of training): the two sizes `--unmix_weight` weighs."""
    import torch

    from svdiff.data.concepts import Concept
    from svdiff.data.images import load_image_folder
    from svdiff.families import family_of
    from svdiff.train import TrainConfig, TrainingStep, resolve
    from svdiff.train.unmix import Unmix

    config = resolve(
        TrainConfig(
            instance_data_dir="-",
            instance_prompt="-",
            pretrained_model_name_or_path=base,
            resolution=family_of(pipe).native_resolution(),
            train_text_encoder=False,
            unmix_weight=1.0,
        )
    )
    concepts = [
        Concept(f"a photo of {phrase}", SUBJECTS / name, instance_images=load_image_folder(SUBJECTS / name))
        for phrase, name in zip(phrase_pair, pair, strict=True)
    ]
    family = family_of(pipe, config)
    unmix, terms = Unmix(family), []
    training = TrainingStep(config, family, unmix=unmix)
    for step in range(n):
        chosen = concepts if step % 2 == 0 else concepts[::-1]  # each subject on each side half the time
        with torch.no_grad():
            parts = training.loss_terms(training.batch(chosen, step))
        terms.append([float(x) for x in parts])
    unmix.remove()
    diffusion, term = np.mean(terms, axis=0)
    return {"collages": n, "diffusion": round(float(diffusion), 4), "unmix": round(float(term), 4)}


def evaluate(pipe, judge, weights: Path, pair, names, refs, threshold, args) -> tuple[dict, list]:
    """A trained run's scores (the pair prompts, the same with the names swapped, each subject alone) and its
    pair pictures."""
    from svdiff.adapters import fuse, load_shifts, unload_shifts
    from svdiff.sample import sample

    def draw(prompt):
        return sample(pipe, prompt, num_images=args.seeds, guidance_scale=args.guidance_scale, progress=False)

    a, b = names
    load_shifts(pipe, weights, "pair", progress=False)
    fuse(pipe)
    images = [i for t in PROMPTS for i in draw(t.format(a=a, b=b))]
    swapped = [i for t in PROMPTS for i in draw(t.format(a=b, b=a))]
    alone = [draw(ALONE.format(a=n)) for n in names]
    unload_shifts(pipe, "pair")
    scores = score(judge, images, pair, refs, threshold)
    scores["name effect"] = name_effect(judge, images, swapped, pair, refs)
    scores["identity separation"] = identity_separation(judge, *alone, pair, refs)
    return scores, images


def mean_scores(replicas: list[dict]) -> dict:
    """The figures of runs trained with different seeds, averaged (nested dicts too)."""
    first = replicas[0]
    return {
        k: mean_scores([r[k] for r in replicas])
        if isinstance(first[k], dict)
        else round(float(np.mean([r[k] for r in replicas])), 4)
        for k in first
    }


def phrases(pair, identifiers=None) -> list[str]:
    """What names each subject of the pair: "sks heart", or with other identifiers "green heart"."""
    words = identifiers or [subject_card(n)["identifier"] for n in pair]
    return [f"{w} {subject_card(n)['class_word']}" for w, n in zip(words, pair, strict=True)]


def train_pair(
    runs: Path,
    pair,
    config: str,
    settings: dict,
    steps: int,
    identifiers=None,
    prior: bool = False,
    base=None,
    seed: int = 0,
) -> tuple[Path, float]:
    from svdiff.train import recipes, train

    out = (
        runs
        / f"{'+'.join(pair)}"
        / (
            config.replace(" ", "_")
            + ("_as_" + "_".join(identifiers) if identifiers else "")
            + ("_with_prior" if prior else "")
            + (f"_seed_{seed}" if seed else "")
        )
    )
    weights = out / "svdiff_weights.safetensors"
    if not weights.is_file():
        out.mkdir(parents=True, exist_ok=True)
        concepts = [
            {"instance_prompt": f"a photo of {phrase}", "instance_data_dir": str(SUBJECTS / n)}
            for phrase, n in zip(phrases(pair, identifiers), pair, strict=True)
        ]
        if prior:  # class images shared by every run of the class, generated by the first
            for c, n in zip(concepts, pair, strict=True):
                word = subject_card(n)["class_word"]
                c.update(class_prompt=f"a photo of a {word}", class_data_dir=str(runs / "class_images" / word))
        listed = out.with_name(out.name + ".concepts.json")  # beside the run: its folder holds svdiff's files only
        listed.write_text(json.dumps(concepts))
        train(
            recipes.quiet(
                concepts_list=str(listed),
                output_dir=str(out),
                max_train_steps=steps,
                checkpointing_steps=max(100, steps // 4),  # these runs are long: resumable
                resume_from_checkpoint="latest",
                with_prior_preservation=prior,
                pretrained_model_name_or_path=base,
                seed=seed,
                **settings,
            )
        )
    return weights, json.loads((out / "train_summary.json").read_text())["minutes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument(
        "--train_seeds",
        type=int,
        default=3,
        help="train each pair's three main configurations this many times (training seeds 0, 1, …): figures are "
        "the means",
    )
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--runs", type=Path, default=Path("runs/multi_subject"))
    QualityRun.add_flags(p, "multi_subject")
    p.add_argument(
        "--unmix_sweep", type=float, nargs="*", default=[], help="more Unmix weights for the same-class pair"
    )
    p.add_argument(
        "--scale_sweep", type=float, nargs="*", default=[], help="more collage scales for the same-class pair"
    )
    p.add_argument(
        "--prob_sweep", type=float, nargs="*", default=[], help="more collage probabilities for the same-class pair"
    )
    p.add_argument(
        "--identifiers",
        nargs=2,
        metavar=("WORD1", "WORD2"),
        help="name the pair's subjects with these words instead of their identifiers (e.g. words the base knows)",
    )
    p.add_argument(
        "--with_prior_preservation", action="store_true", help="train every configuration with class images too"
    )
    args = p.parse_args()

    from svdiff.data.images import load_image_folder
    from svdiff.sample import load_pipeline
    from svdiff.train.config import UNMIX_WEIGHT

    run = QualityRun(args)
    judge = run.judge
    pipe = load_pipeline(args.base)
    results, rows, labels = {}, [], []
    order = base_order(pipe, judge, args.seeds, args.guidance_scale)
    print("base order", order, flush=True)
    for pair_name in args.pairs:
        pair = PAIRS[pair_name]
        refs = {n: embed(judge, load_image_folder(SUBJECTS / n)) for n in pair}
        threshold = calibrate(judge, pair, refs)
        a, b = phrases(pair, args.identifiers)
        photos = [load_image_folder(SUBJECTS / n) for n in pair]
        results[pair_name] = {
            "subjects": list(pair),
            "identity_threshold": round(threshold, 4),
            "identity_separation_of_photos": identity_separation(judge, *photos, pair, refs),
            "at_start": unmix_scale(pipe, pair, (a, b), args.base),
            "configs": {},
        }
        configs = dict(CONFIGS)
        if pair_name == "same class":  # the sweeps that chose the defaults
            configs["Cut-Mix-Unmix, backgrounds unmatched"] = {
                "cut_mix_unmix_prob": 0.6,
                "cut_mix_match_background": False,
            }
            configs.update(
                {
                    f"Cut-Mix-Unmix, weight {w:g}": {"cut_mix_unmix_prob": 0.6, "unmix_weight": w}
                    for w in args.unmix_sweep
                }
            )
            configs.update(
                {
                    f"Cut-Mix-Unmix, scale {c:g}": {"cut_mix_unmix_prob": 0.6, "cut_mix_scale": c}
                    for c in args.scale_sweep
                }
            )
            configs.update({f"Cut-Mix-Unmix, prob {q:g}": {"cut_mix_unmix_prob": q} for q in args.prob_sweep})
        for config, settings in configs.items():
            replicas = []
            for seed in range(args.train_seeds if config in CONFIGS else 1):
                weights, minutes = train_pair(
                    args.runs,
                    pair,
                    config,
                    settings,
                    args.steps,
                    args.identifiers,
                    args.with_prior_preservation,
                    args.base,
                    seed,
                )
                scores, images = evaluate(pipe, judge, weights, pair, (a, b), refs, threshold, args)
                replicas.append({**scores, "train_minutes": minutes})
                print(pair_name, config, f"training seed {seed}", scores, flush=True)
                if seed == 0:
                    rows += images[: min(8, args.seeds)]
            found = mean_scores(replicas)
            if len(replicas) > 1:
                found["disentangled by training seed"] = [r["disentangled"] for r in replicas]
            results[pair_name]["configs"][config] = found
            labels.append(
                f"{pair_name}, {config}: disentangled {found['disentangled']:.0%}, stitched {found['stitched']:.0%}"
            )
        c = results[pair_name]["configs"]
        results[pair_name]["cut_mix_gain_points"] = round(
            100 * (c["Cut-Mix-Unmix"]["disentangled"] - c["no Cut-Mix-Unmix"]["disentangled"]), 1
        )
    run.finish(
        {
            "benchmark": "multi_subject",
            "steps": args.steps,
            "seeds": args.seeds,
            "train_seeds": args.train_seeds,
            "identifiers": args.identifiers,
            "with_prior_preservation": args.with_prior_preservation,
            "base": args.base,
            "prompts": list(PROMPTS),
            "guidance_scale": args.guidance_scale,
            "unmix_weight": UNMIX_WEIGHT,
            "base_order": order,
            "results": results,
        },
        rows,
        cols=min(8, args.seeds),
        labels=labels,
    )


if __name__ == "__main__":
    main()
