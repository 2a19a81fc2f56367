"""One subject, three ways: spectral shifts against full fine-tuning and LoRA on the embedded tiny world, with the
same recipe (the demo's: prior preservation, 400 steps), the same prompts and the same seeds. Subjects: the six
examples and new ones of identities held out of pretraining (`fresh_<i>`).

    HF_HUB_OFFLINE=1 python benchmarks/single_subject.py [--subjects 8] [--prompts 10] [--seeds 4] [--steps 400]
        [--base embedded:flow] [--learning_rate R] [--out docs/results/single_subject/single_subject.json]

Per subject and method, the judge reads every generation of the novel-context prompts (places, backgrounds and a
second object the subject never appeared with):
  subject similarity   mean cosine similarity of the judge's identity embedding to the subject's photos;
  prompt accuracy      the share of images where every attribute the prompt names is right;
  class drift          class prompts ("a photo of a heart") after tuning: how much more they look like the
                       subject than the base's do (similarity after − base), and the share still of the class;
  size, minutes        what the run ships, and its training time on this machine.
The base row is the untuned model given the same prompts. The summary gives each figure's mean over subjects and
its spread: the standard deviation over subjects, and over seeds (of each subject's per-seed means).
"""

import argparse
from pathlib import Path

import torch

from svdiff.world import GUIDANCE_SCALE

from common import QualityRun, add_class_images_flag, embed, files_bytes, subject_card, subject_dir, train_subject

NAMES = ("heart_sks", "heart_xyz", "star_zwx", "square_vyx", "circle_qlo", "triangle_sks", "fresh_0", "fresh_1")
METHODS = ("svdiff", "full", "lora")
CONTEXTS = (
    "a photo of {s} on the left",
    "a photo of {s} at the top",
    "a photo of {s} on the right on a dark background",
    "a photo of {s} at the bottom on a beige background",
    "a photo of {s} in the center on a gray background",
    "a photo of {s} on the left and a blue circle on the right",
    "a photo of a red square on the left and {s} on the right",
    "a photo of {s} at the top and a yellow triangle at the bottom",
    "a photo of a green diamond at the top and {s} at the bottom",
    "a photo of {s} on a dark background",
)
CLASS_CONTEXTS = ("{c}", "{c} on a dark background")


def measure(pipe, judge, refs: torch.Tensor, prompts, class_prompts, seeds: int, guidance_scale: float) -> dict:
    from svdiff.sample import sample
    from svdiff.world.evaluate import score

    def draw(prompt):
        return sample(pipe, prompt, num_images=seeds, guidance_scale=guidance_scale, progress=False)

    sims, correct, first = [], [], []
    for prompt in prompts:
        images = draw(prompt)
        first.append(images[0])
        results = score(judge, images, prompt)
        correct += [r["all_correct"] for r in results]
        sims.append((torch.stack([r["embedding"] for r in results]) @ refs.T).mean(dim=1))  # one per seed
    class_sims, class_ok = [], []
    for prompt in class_prompts:
        results = score(judge, draw(prompt), prompt)
        class_ok += [r["all_correct"] for r in results]
        class_sims.append(torch.stack([r["embedding"] for r in results]) @ refs.T)
    per_seed = torch.stack(sims).mean(dim=0)  # seeds: each seed's mean over the prompts
    return {
        "subject_similarity": round(float(per_seed.mean()), 4),
        "subject_similarity_seed_std": round(float(per_seed.std()), 4),
        "prompt_accuracy": round(sum(correct) / len(correct), 4),
        "class_similarity": round(float(torch.cat(class_sims).mean()), 4),
        "class_correct": round(sum(class_ok) / len(class_ok), 4),
        "pictures": first,
    }


def add_subject_flags(p: argparse.ArgumentParser, prompts: int) -> None:
    """The flags of the benchmarks of one subject at a time (this one and layer_groups.py, which shares its runs):
    which subjects, how many prompts and seeds, the training steps, guidance, the runs' folder and its class images."""
    p.add_argument("--subjects", type=int, default=len(NAMES), help=f"how many of {', '.join(NAMES)}")
    p.add_argument(
        "--prompts", type=int, default=prompts, help=f"how many novel-context prompts (at most {len(CONTEXTS)})"
    )
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--runs", type=Path, default=Path("runs/single_subject"))
    add_class_images_flag(p)


def mean(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows) / len(rows), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subject_flags(p, prompts=10)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--learning_rate", type=float, default=None, help="for every method in --methods (default: each method's own)"
    )
    QualityRun.add_flags(p, "single_subject")
    args = p.parse_args()

    from svdiff.data.images import load_image_folder
    from svdiff.sample import apply_trained, load_pipeline

    run = QualityRun(args)
    judge = run.judge
    per_subject, rows, labels = {}, [], []
    training = {"base": args.base, "learning_rate": args.learning_rate, "class_images": args.class_images}
    for name in NAMES[: args.subjects]:
        c = subject_card(name)
        subject = f"{c['identifier']} {c['class_word']}"
        prompts = [t.format(s=subject) for t in CONTEXTS[: args.prompts]]
        class_prompts = [t.format(c=c["class_prompt"]) for t in CLASS_CONTEXTS]
        photos = load_image_folder(subject_dir(name))
        refs = embed(judge, photos)
        own = refs @ refs.T
        found = {"photos_similarity": round(float(own[~torch.eye(len(own), dtype=torch.bool)].mean()), 4)}
        for method in ("base", *args.methods):
            pipe = load_pipeline(args.base)
            summary = None
            if method != "base":
                summary = train_subject(args.runs, name, method, args.steps, **training)
                apply_trained(pipe, summary["weights"], method)
            m = measure(pipe, judge, refs, prompts, class_prompts, args.seeds, args.guidance_scale)
            rows += m.pop("pictures")
            labels.append(f"{name}, {method}")
            if summary:
                m |= {"bytes": files_bytes(summary), "train_minutes": summary["minutes"]}
            found[method] = m
            print(name, method, m, flush=True)
        for method in args.methods:
            drift = found[method]["class_similarity"] - found["base"]["class_similarity"]
            found[method]["class_drift"] = round(drift, 4)
        per_subject[name] = found

    summary = {}
    for method in ("base", *args.methods):
        runs = [found[method] for found in per_subject.values()]
        keys = ["subject_similarity", "prompt_accuracy", "class_similarity", "class_correct"]
        if method != "base":
            keys += ["class_drift", "bytes", "train_minutes"]
        summary[method] = {k: mean(runs, k) for k in keys}
        summary[method]["subject_similarity_subject_std"] = round(
            float(torch.tensor([r["subject_similarity"] for r in runs]).std()), 4
        )
        summary[method]["subject_similarity_seed_std"] = mean(runs, "subject_similarity_seed_std")
    run.finish(
        {
            "benchmark": "single_subject",
            "steps": args.steps,
            "learning_rate": args.learning_rate,
            "seeds": args.seeds,
            "prompts": list(CONTEXTS[: args.prompts]),
            "class_prompts": list(CLASS_CONTEXTS),
            "guidance_scale": args.guidance_scale,
            "summary": summary,
            "subjects": per_subject,
        },
        rows,
        cols=args.prompts,
        labels=labels,
    )


if __name__ == "__main__":
    main()
