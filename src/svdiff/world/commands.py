"""`svdiff world …`: render scenes and subjects, judge images against a prompt, print the world's quality report."""

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.images import image_files, open_images
from ..errors import SvdiffError
from ..flags import flag
from . import GUIDANCE_SCALE, default_judge
from .evaluate import parse_prompt, score, similarity
from .judge import load, read
from .quality import base_sheet, measure, subject_sheet
from .render import SHAPES, caption, random_scene, render
from .subjects import unseen_subject, write_examples, write_subject_folder


def add_parser(subparsers) -> None:
    world = subparsers.add_parser("world", help="the embedded shapes world: render, subjects, judge, report")
    sub = world.add_subparsers(dest="world_command", required=True)

    p = sub.add_parser("render", help="render random scenes with their captions and ground truth")
    flag(p, "out", type=Path, required=True, help="folder for NNNN.png and scenes.jsonl")
    flag(p, "num", "n", type=int, default=16)
    flag(p, "seed", type=int, default=0)
    flag(p, "objects", type=int, choices=(1, 2), help="objects per scene (default: mixed)")
    flag(p, "marks", type=float, default=0.0, help="chance that an object carries an emblem, an outline or both")
    p.set_defaults(func=run_render)

    p = sub.add_parser(
        "subjects", help="write subject folders (views + subject.json) of identities pretraining never showed"
    )
    flag(p, "out", type=Path, required=True)
    flag(p, "num", "n", type=int, default=1, help="how many subjects")
    flag(p, "views", type=int, default=4)
    flag(p, "seed", type=int, default=0)
    flag(p, "shape", help="class of every subject (default: random)")
    flag(p, "identifier", default="sks")
    flag(p, "examples", action="store_true", help="write the shipped example set (and its contact sheet)")
    p.set_defaults(func=run_subjects)

    p = sub.add_parser("judge", help="which of the prompt's words each image shows, as JSON")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    flag(p, "prompt", required=True)
    flag(p, "reference", type=Path, help="folder of subject images to compare with")
    p.set_defaults(func=run_judge)

    p = sub.add_parser("report", help="measure judge and base-model quality (prints JSON)")
    flag(p, "quick", action="store_true", help="fewer samples: a rough figure in a minute")
    flag(p, "seed", type=int, default=0)
    flag(p, "guidance_scale", type=float, default=GUIDANCE_SCALE)
    flag(p, "pictures", type=Path, help="also write base_samples.png here")
    flag(p, "base", type=Path, help="a pipeline folder (default: the shipped base)")
    p.set_defaults(func=run_report)


def run_render(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(args.out / "scenes.jsonl", "w") as f:
        for i in range(args.num):
            scene = random_scene(rng, n_objects=args.objects, marks=args.marks)
            image, truth = render(scene)
            image.save(args.out / f"{i:04d}.png")
            f.write(json.dumps({"image": f"{i:04d}.png", "caption": caption(scene), **asdict(truth)}) + "\n")
    print(f"wrote {args.num} scenes to {args.out}")
    return 0


def run_subjects(args) -> int:
    if args.examples:
        for folder in write_examples(args.out, args.views):
            print(folder)
        subject_sheet(args.out / "subjects.png", args.out)
        return 0
    if args.shape is not None and args.shape not in SHAPES:
        raise SvdiffError(f"unknown shape {args.shape!r}; choose one of {', '.join(SHAPES)}")
    rng = random.Random(args.seed)
    for i in range(args.num):
        subject = unseen_subject(rng, shape=args.shape)
        folder = args.out / f"{subject.shape}_{args.seed}_{i}" if args.num > 1 else args.out
        write_subject_folder(folder, subject, args.identifier, args.views, seed=args.seed * 1000 + i)
        print(folder)
    return 0


def run_judge(args) -> int:
    if not parse_prompt(args.prompt):
        raise SvdiffError(f"the prompt names no shape of the world: {args.prompt!r}")
    files = image_files(args.images)
    model = load(default_judge())
    results = score(model, open_images(files), args.prompt)
    refs = None
    if args.reference is not None:
        refs = torch.stack([r["embedding"] for r in read(model, open_images(image_files([args.reference])))])
    report = {"prompt": args.prompt, "images": []}
    for f, r in zip(files, results, strict=True):
        entry = {
            "image": str(f),
            "all_correct": r["all_correct"],
            "objects": [{"wanted": m["wanted"], "found": m["found"], "correct": m["correct"]} for m in r["objects"]],
        }
        if refs is not None:
            entry["similarity"] = round(float(similarity(r["embedding"][None], refs)[0]), 4)
        report["images"].append(entry)
    report["fraction_correct"] = round(sum(r["all_correct"] for r in results) / len(results), 4)
    if refs is not None:
        report["mean_similarity"] = round(sum(e["similarity"] for e in report["images"]) / len(results), 4)
    print(json.dumps(report, indent=2))
    return 0


def run_report(args) -> int:
    if args.pictures is not None:
        args.pictures.mkdir(parents=True, exist_ok=True)
        base_sheet(args.pictures / "base_samples.png", guidance_scale=args.guidance_scale, base=args.base)
        print(f"wrote {args.pictures / 'base_samples.png'}")
    figures = measure(quick=args.quick, seed=args.seed, guidance_scale=args.guidance_scale, base=args.base)
    print(json.dumps(figures, indent=2))
    return 0


def main(argv=None) -> int:
    """The `world` commands alone, raising SvdiffError instead of printing it (what the tests call)."""
    parser = argparse.ArgumentParser(prog="svdiff")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
