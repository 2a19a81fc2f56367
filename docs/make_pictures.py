"""Makes the README's pictures on the embedded base with the `svdiff` commands the README shows (each command is
printed before it runs). Run from the repository root:

    python docs/make_pictures.py [--runs runs/pictures] [--steps 400]

Subjects are trained once into --runs (delete a folder to retrain it); pictures go to docs/pictures/.
"""

import argparse
import json
import shlex
import shutil
from pathlib import Path

from PIL import Image

from svdiff.cli import main as svdiff
from svdiff.pictures import grid
from svdiff.train import recipes
from svdiff.train.config import to_flags

OUT = Path("docs/pictures")
SEEDS = 4


def run(*args: str) -> None:
    print("svdiff " + " ".join(shlex.quote(a) for a in args), flush=True)
    if svdiff(list(args)) != 0:
        raise SystemExit(f"failed: svdiff {' '.join(args)}")


def train(runs: Path, name: str, subject: str, prompt: str, class_prompt: str, steps: int) -> Path:
    out = runs / name
    if not (out / "svdiff_weights.safetensors").is_file():
        config = recipes.subject(
            f"examples/subjects/{subject}",
            prompt,
            class_prompt,
            runs / f"class-{class_prompt.split()[-1]}",
            max_train_steps=steps,
            output_dir=str(out),
        )
        run("train", *to_flags(config))
    return out / "svdiff_weights.safetensors"


def generate(path: Path, prompt: str, *flags: str) -> list[Image.Image]:
    run(
        "generate",
        "--prompt",
        prompt,
        "--num_images",
        str(SEEDS),
        *flags,
        "--output",
        str(path),
    )
    return [Image.open(path.with_name(f"{path.stem}-0-{i}.png")).convert("RGB") for i in range(SEEDS)]


def sheet(rows: list[tuple[str, list[Image.Image]]], path: Path) -> None:
    grid([im for _, images in rows for im in images], cols=SEEDS, labels=[label for label, _ in rows]).save(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/pictures"))
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = args.runs / "generated"
    work.mkdir(parents=True, exist_ok=True)

    # Two hearts trained with the same prompt (the paper's protocol for interpolation), and a star.
    heart = train(args.runs, "heart_sks", "heart_sks", "a photo of sks heart", "a photo of a heart", args.steps)
    heart2 = train(args.runs, "heart_xyz_as_sks", "heart_xyz", "a photo of sks heart", "a photo of a heart", args.steps)
    star = train(args.runs, "star_zwx", "star_zwx", "a photo of zwx star", "a photo of a star", args.steps)

    # With a place: the base's pretraining captions always say more than a bare class, and a bare prompt often
    # draws an empty background.
    prompt = "a photo of sks heart in the center"
    rows = [
        (f"scale {s}", generate(work / f"scale-{s}.png", prompt, "--shifts", f"{heart}:{s}"))
        for s in ("0", "0.5", "1", "1.5")
    ]
    sheet(rows, OUT / "scale.png")

    both = "a photo of sks heart on the left and a zwx star on the right"
    rows = [
        ("sks heart alone", generate(work / "add-a.png", both, "--shifts", str(heart))),
        ("zwx star alone", generate(work / "add-b.png", both, "--shifts", str(star))),
        ("both added (Eq. 4)", generate(work / "add-ab.png", both, "--shifts", str(heart), "--shifts", str(star))),
    ]
    sheet(rows, OUT / "add.png")

    rows = [
        (
            f"alpha {a}: {a}·A + {1 - float(a):g}·B",
            generate(work / f"interp-{a}.png", prompt, "--interpolate", str(heart), str(heart2), "--alpha", a),
        )
        for a in ("1", "0.75", "0.5", "0.25", "0")
    ]
    sheet(rows, OUT / "interpolate.png")

    rows = [
        ("A", generate(work / "mix-a.png", prompt, "--shifts", str(heart))),
        ("B", generate(work / "mix-b.png", prompt, "--shifts", str(heart2))),
        (
            "geometry A, appearance B",
            generate(work / "mix-ab.png", prompt, "--style_mix", f"geometry={heart}", f"appearance={heart2}"),
        ),
        (
            "geometry B, appearance A",
            generate(work / "mix-ba.png", prompt, "--style_mix", f"geometry={heart2}", f"appearance={heart}"),
        ),
    ]
    sheet(rows, OUT / "style_mix.png")

    for demo, name in ((Path("demo-output"), "demo"), (Path("demo-output/flow"), "demo_flow")):  # make demo, demo-flow
        if (demo / "before_after.png").is_file():
            shutil.copy(demo / "before_after.png", OUT / f"{name}_before_after.png")
            shutil.copy(demo / "demo_summary.json", OUT / f"{name}_summary.json")
            print(json.dumps(json.loads((demo / "demo_summary.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
