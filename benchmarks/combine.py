"""Combining subjects after training, spectral shifts against full fine-tuning deltas: Eq. 4 (two subjects trained
apart, added) and Eq. 5 (two subjects trained under one prompt, interpolated), judged and drawn; and style mixing of
the two interpolated subjects' shift files.

    HF_HUB_OFFLINE=1 python benchmarks/combine.py [--seeds 8] [--steps 400] [--base embedded:flow]
        [--out docs/results/combine/combine.json]

svdiff adds or interpolates the shifts δ (`--shifts A --shifts B`, `--interpolate A B --alpha a`); full fine-tuning
does the same to its weight deltas ΔW = W_tuned − W_base, the only way it has. Eq. 4 is judged on the two halves of
"sks heart on the left and zwx star on the right" (both shapes in place; each half closer to its own subject's
photos than to the other's); Eq. 5 by the judge's similarity to A's photos minus that to B's, which should climb
with alpha. Runs are shared with benchmarks/single_subject.py (same --runs).
"""

import argparse
from pathlib import Path

from safetensors.torch import load_file

from svdiff.world import GUIDANCE_SCALE

from common import SUBJECTS, QualityRun, add_class_images_flag, embed, keep_half, subject_card, train_subject

METHODS = ("svdiff", "full")
ADD = ("heart_sks", "star_zwx")
ADD_PROMPTS = (
    "a photo of sks heart on the left and zwx star on the right",
    "a photo of zwx star on the right and sks heart on the left on a dark background",
)
INTERPOLATE = ("heart_sks", "heart_xyz")  # the second trained as "sks heart" too
INTERPOLATE_PROMPTS = ("a photo of sks heart", "a photo of sks heart on the right on a beige background")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIXED = {"A": INTERPOLATE[0], "C": INTERPOLATE[1]}  # style mixing's two files, by their run keys


class FullDeltas:
    """Weight deltas of fully fine-tuned runs, applied to the base as W_base + Σ scale·ΔW."""

    def __init__(self, pipe, summaries: dict):
        from svdiff.models import SHIFTED_COMPONENTS

        self.pipe = pipe
        folders = {key: Path(summary["weights"]).parent.parent for key, summary in summaries.items()}
        first = next(iter(folders.values()), None)  # every run fine-tuned the same denoiser and text encoders
        self.names = [n for n in SHIFTED_COMPONENTS if first is not None and (first / n).is_dir()]
        self.base = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in self.names}
        self.deltas = {}
        for key, folder in folders.items():
            self.deltas[key] = {}
            for n in self.names:
                tuned = load_file(str(next((folder / n).glob("*.safetensors"))))
                self.deltas[key][n] = {k: tuned[k] - self.base[n][k] for k in self.base[n]}

    def set(self, scales: dict) -> None:
        for n in self.names:
            state = {
                k: v + sum(s * self.deltas[key][n][k] for key, s in scales.items()) for k, v in self.base[n].items()
            }
            getattr(self.pipe, n).load_state_dict(state)


def add_scores(judge, images, refs) -> dict:
    from svdiff.world.judge import read

    present = sides = 0
    for image in images:
        slots = read(judge, [image])[0]["slots"]
        present += all(
            slots[s] is not None and slots[s]["shape"] == shape for s, shape in (("left", "heart"), ("right", "star"))
        )
        ok = 0
        for k, side in enumerate(("left", "right")):
            e = embed(judge, [keep_half(image, side)])
            sims = [float((e @ refs[n].T).mean()) for n in ADD]
            ok += sims[k] > sims[1 - k]
        sides += ok == 2
    return {"both_present": round(present / len(images), 4), "both_sides_own_subject": round(sides / len(images), 4)}


def style_scores(judge, images, refs, geometry: str, appearance: str) -> dict:
    """The share of pictures drawn in the appearance subject's color and in the geometry subject's, and the lean
    toward heart_sks (similarity to its photos minus to heart_xyz's)."""
    from svdiff.world.judge import read

    colors = {k: subject_card(name)["subject"]["color"] for k, name in MIXED.items()}
    found = [next((o["color"] for o in r["slots"].values() if o is not None), None) for r in read(judge, images)]
    e = embed(judge, images)
    lean = float((e @ refs["heart_sks"].T).mean() - (e @ refs["heart_xyz"].T).mean())
    return {
        "appearance_color": round(sum(c == colors[appearance] for c in found) / len(found), 4),
        "geometry_color": round(sum(c == colors[geometry] for c in found) / len(found), 4),
        "similarity_a_minus_b": round(lean, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--runs", type=Path, default=Path("runs/subjects"))
    add_class_images_flag(p)
    QualityRun.add_flags(p, "combine")
    args = p.parse_args()

    from svdiff.adapters import unfuse, unload_shifts
    from svdiff.data.images import load_image_folder
    from svdiff.sample import apply_shifts, load_pipeline, sample

    run = QualityRun(args)
    judge = run.judge
    refs = {n: embed(judge, load_image_folder(SUBJECTS / n)) for n in {*ADD, *INTERPOLATE}}
    runs = {
        (m, key): train_subject(
            args.runs, name, m, args.steps, identifier=ident, base=args.base, class_images=args.class_images
        )
        for m in METHODS
        for key, name, ident in (("A", "heart_sks", None), ("B", "star_zwx", None), ("C", "heart_xyz", "sks"))
    }

    def draw(pipe, prompts):
        images = []
        for prompt in prompts:
            images += sample(pipe, prompt, num_images=args.seeds, guidance_scale=args.guidance_scale, progress=False)
        return images

    pipe = load_pipeline(args.base)
    full = FullDeltas(pipe, {k: s for (m, k), s in runs.items() if m == "full"})
    results, rows, labels = {"add": {}, "interpolate": {}}, [], []

    def setting(method: str, scales: dict):
        """Puts the combination on the pipeline: shifts loaded and fused, or full deltas written into the weights."""
        if method == "full":
            full.set(scales)
            return
        shifts = [(runs[("svdiff", k)]["weights"], s) for k, s in scales.items()]
        apply_shifts(pipe, shifts)

    def clear(method: str):
        if method == "full":
            full.set({})
        else:
            unfuse(pipe)
            unload_shifts(pipe)

    for method in METHODS:
        setting(method, {"A": 1.0, "B": 1.0})
        images = draw(pipe, ADD_PROMPTS)
        clear(method)
        results["add"][method] = add_scores(judge, images, refs)
        rows += images[: args.seeds]
        labels.append(f"Eq. 4, {method}: sks heart + zwx star")

        curve = []
        for alpha in ALPHAS:
            setting(method, {"A": alpha, "C": 1 - alpha})
            images = draw(pipe, INTERPOLATE_PROMPTS)
            clear(method)
            e = embed(judge, images)
            toward_a = float((e @ refs["heart_sks"].T).mean() - (e @ refs["heart_xyz"].T).mean())
            curve.append({"alpha": alpha, "similarity_a_minus_b": round(toward_a, 4)})
            rows += images[: args.seeds]
            labels.append(f"Eq. 5, {method}: alpha {alpha:g}·A + {1 - alpha:g}·B")
        values = [c["similarity_a_minus_b"] for c in curve]
        results["interpolate"][method] = {
            "curve": curve,
            "monotone": all(a <= b for a, b in zip(values[:-1], values[1:], strict=True)),
            "span": round(values[-1] - values[0], 4),
        }
        print(method, results["add"][method], results["interpolate"][method], flush=True)

    # Style mixing of the shift files, as `svdiff generate --style_mix` does it: the geometry layers from one
    # heart's file, every other layer from the other's, both ways. Which subject's color each picture carries says
    # which file decided the look; the lean says how far the picture sits from A toward B.
    files = {"A": runs[("svdiff", "A")]["weights"], "C": runs[("svdiff", "C")]["weights"]}
    results["style_mix"] = {}
    for geometry, appearance in (("A", "C"), ("C", "A")):
        apply_shifts(pipe, style_mix={"geometry": files[geometry], "appearance": files[appearance]})
        images = draw(pipe, INTERPOLATE_PROMPTS)
        clear("svdiff")
        results["style_mix"][f"geometry {MIXED[geometry]}, appearance {MIXED[appearance]}"] = style_scores(
            judge, images, refs, geometry, appearance
        )
        rows += images[: args.seeds]
        labels.append(f"style mix: geometry {MIXED[geometry]}, appearance {MIXED[appearance]}")
    print("style mix", results["style_mix"], flush=True)

    run.finish(
        {
            "benchmark": "combine",
            "steps": args.steps,
            "seeds": args.seeds,
            "add_prompts": list(ADD_PROMPTS),
            "interpolate_prompts": list(INTERPOLATE_PROMPTS),
            "guidance_scale": args.guidance_scale,
            "base": args.base,
            "results": results,
        },
        rows,
        cols=args.seeds,
        labels=labels,
    )


if __name__ == "__main__":
    main()
