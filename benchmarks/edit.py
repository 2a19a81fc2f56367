"""Single-image editing on the embedded tiny world: 20 rendered scenes with their captions, each edited in one
attribute (color, pattern, shape or place, five scenes each), by spectral shifts and by full fine-tuning, with and
without DDIM inversion.

    HF_HUB_OFFLINE=1 python benchmarks/edit.py [--scenes 20] [--steps 200] [--runs runs/edit] [--base embedded:flow]
        [--out docs/results/edit/edit.json]

The judge reads the edited picture where the object should now be: "success" when the asked attribute is right,
"kept" the share of the other attributes (of shape, color, pattern, place) that stayed as in the input.
Color and pattern edits are non-structural (the paper uses inversion for them); shape and place are structural.
Fine-tuned models are kept in --runs and reused.
"""

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image

from svdiff.edit import DEFAULT_EDIT_STEPS

from common import QualityRun

KINDS = ("color", "pattern", "shape", "position")
NON_STRUCTURAL = ("color", "pattern")
METHODS = ("svdiff", "full")


def scenes(n: int) -> list[tuple[object, object, str]]:
    """(scene, edited scene, kind): one object, a plain background; the edit changes one attribute."""
    from svdiff.world.render import COLORS, PATTERNS, POSITIONS, Scene, random_object

    shapes = ("circle", "square", "triangle", "star", "heart", "diamond")
    rng = random.Random(0)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        obj = replace(random_object(rng, rng.choice(("left", "right", "center")), allow_held_out=False), size="medium")
        obj = replace(obj, shape=rng.choice(shapes))
        scene = Scene((obj,), background=rng.choice(("white", "beige")))
        if kind == "color":
            new = replace(obj, color=rng.choice([c for c in COLORS if c != obj.color]))
        elif kind == "pattern":
            new = replace(obj, pattern=rng.choice([p for p in PATTERNS if p != obj.pattern]))
        elif kind == "shape":
            new = replace(obj, shape=rng.choice([s for s in shapes if s != obj.shape]))
        else:
            new = replace(
                obj,
                position=rng.choice([p for p in POSITIONS if p in ("left", "right", "center") and p != obj.position]),
            )
        out.append((scene, replace(scene, objects=(new,)), kind))
    return out


def judge_edit(judge, image: Image.Image, source, target, kind: str) -> tuple[bool, float]:
    from svdiff.world.judge import read

    slots = read(judge, [image])[0]["slots"]
    want, was = target.objects[0], source.objects[0]
    seen = slots.get(want.position)
    if seen is None:
        return False, 0.0
    attrs = {"shape": seen["shape"], "color": seen["color"], "pattern": seen["pattern"], "position": want.position}
    success = attrs[kind] == getattr(want, kind)
    others = [k for k in KINDS if k != kind]
    kept = sum(attrs[k] == getattr(was, k) for k in others) / len(others)
    return success, kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=20)
    p.add_argument("--steps", type=int, default=DEFAULT_EDIT_STEPS)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--runs", type=Path, default=Path("runs/edit"))
    QualityRun.add_flags(p, "edit")
    args = p.parse_args()

    from svdiff.data.images import to_model_input
    from svdiff.edit import draw_edits, fine_tune, to_pil
    from svdiff.sample import apply_trained, load_pipeline
    from svdiff.world.render import caption, render

    run = QualityRun(args)
    judge = run.judge
    cases = scenes(args.scenes)
    tally = {(m, inv, k): [] for m in METHODS for inv in (True, False) for k in KINDS}
    minutes = {m: 0.0 for m in METHODS}
    rows, labels = [], []
    for i, (scene, target, kind) in enumerate(cases):
        image, _ = render(scene)
        source_prompt, target_prompt = caption(scene), caption(target)
        row = [to_pil(to_model_input(image, 64))]
        for method in METHODS:
            out = args.runs / f"scene-{i:02d}" / method
            summary = out / "train_summary.json"
            if not summary.is_file():
                fine_tune(
                    image, source_prompt, out, base=args.base, method=method, max_train_steps=args.steps, progress=False
                )
            trained = json.loads(summary.read_text())
            minutes[method] += trained["minutes"]
            pipe = load_pipeline(args.base)
            apply_trained(pipe, trained["weights"], method)
            for inversion in (True, False):
                edited = draw_edits(
                    pipe,
                    image,
                    [target_prompt],
                    ddim_inversion=inversion,
                    guidance_scale=args.guidance_scale,
                    num_inference_steps=args.num_inference_steps,
                )[0]
                tally[(method, inversion, kind)].append(judge_edit(judge, edited, scene, target, kind))
                row.append(edited)
        if i < 8:
            rows += row
            labels.append(f"{kind}: {target_prompt.removeprefix('a photo of a ')}")
        print(f"scene {i} ({kind}) done", flush=True)

    def summarize(method, inversion, kinds):
        cells = [r for k in kinds for r in tally[(method, inversion, k)]]
        if not cells:
            return {"success": None, "kept": None, "edits": 0}
        return {
            "success": round(sum(s for s, _ in cells) / len(cells), 3),
            "kept": round(sum(k for _, k in cells) / len(cells), 3),
            "edits": len(cells),
        }

    results = {}
    for method in METHODS:
        for inversion in (True, False):
            name = f"{method}, {'with' if inversion else 'without'} inversion"
            results[name] = {
                "all": summarize(method, inversion, KINDS),
                "non-structural (color, pattern)": summarize(method, inversion, NON_STRUCTURAL),
                "structural (shape, place)": summarize(method, inversion, ("shape", "position")),
                **{k: summarize(method, inversion, (k,)) for k in KINDS},
            }
    run.finish(
        {
            "benchmark": "edit",
            "scenes": args.scenes,
            "base": args.base,
            "fine_tune_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "num_inference_steps": args.num_inference_steps,
            "picture_columns": ["input"]
            + [f"{m} {'inverted' if inv else 'noise'}" for m in METHODS for inv in (True, False)],
            "results": results,
            "fine_tune_minutes": {m: round(v, 1) for m, v in minutes.items()},
        },
        rows,
        cols=1 + 2 * len(METHODS),
        labels=labels,
    )


if __name__ == "__main__":
    main()
