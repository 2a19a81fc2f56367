"""Which layers carry a subject: each example subject's spectral shifts applied one group of layers at a time
(text encoders, attention, feed-forward, early or late blocks …), judged on novel-context prompts, on the embedded
UNet base or the flow transformer (`--base embedded:flow`).

    HF_HUB_OFFLINE=1 python benchmarks/layer_groups.py [--subjects 8] [--prompts 4] [--seeds 4] [--steps 400]
        [--base embedded:flow] [--runs runs/single_subject] [--out docs/results/layer_groups/layer_groups.json]

The shift files are single_subject.py's svdiff runs (same --runs, trained here when missing). Per group:
  similarity   the judge's similarity of the pictures to the subject's photos, mean over subjects;
  recovered    (similarity − the base's) / (every shift's − the base's): the share of the subject's gain over the
               base that the group alone brings back (1: the group carries it all);
  energy       the group's share of Σδ², the size of what training changed there;
  values       how many singular values the group holds.
Groups overlap (the attention projections are also in the early or late blocks); each is measured alone.
"""

import argparse
import re
from pathlib import Path

import torch

from common import QualityRun, embed, subject_card, subject_dir, train_subject
from single_subject import CONTEXTS, NAMES, add_subject_flags

# Groups of `<component>.<parameter>` keys, as regexes, per family of the base.
GROUPS = {
    "StableDiffusion": {
        "text encoder": r"^text_encoder\.",
        "self-attention": r"^unet\..*\.attn1\.",
        "cross-attention": r"^unet\..*\.attn2\.",
        "cross-attention K, V": r"^unet\..*\.attn2\.to_[kv]\.",
        "feed-forward": r"^unet\..*\.ff\.",
        "convolutions (resnets)": r"^unet\..*\.resnets\.",
        "down blocks": r"^unet\.down_blocks\.",
        "mid block": r"^unet\.mid_block\.",
        "up blocks": r"^unet\.up_blocks\.",
    },
    "StableDiffusion3": {
        "text encoders": r"^text_encoder(_2)?\.",
        "attention, image side (Q, K, V, out)": r"^transformer\..*\.attn\.(to_q|to_k|to_v|to_out)",
        "attention, text side (Q, K, V, out)": r"^transformer\..*\.attn\.(add_[qkv]_proj|to_add_out)",
        "feed-forward, image side": r"^transformer\..*\.ff\.",
        "feed-forward, text side": r"^transformer\..*\.ff_context\.",
        "adaLN modulation": r"^transformer\..*\.norm1(_context)?\.linear",
        "outside the blocks (embedders, final layer)": r"^transformer\.(?!transformer_blocks\.)",
    },
}


def groups_of(pipe) -> dict[str, str]:
    """The family's GROUPS, and the layers style mixing gives the geometry file (on a transformer the first half of
    its blocks, so there also the blocks after those)."""
    from svdiff.families import family_of

    family = family_of(pipe)
    geometry = family.geometry_layers()
    groups = GROUPS[type(family).__name__] | {"style mixing's geometry layers": "|".join(geometry)}
    if family.denoiser == "transformer":
        blocks = [rf"^transformer\.transformer_blocks\.{i}\." for i in range(len(pipe.transformer.transformer_blocks))]
        groups["blocks after the geometry layers"] = "|".join(b for b in blocks if b not in geometry)
    return groups


def energy(tensors: dict[str, torch.Tensor], pattern: str | None) -> tuple[float, int]:
    """The share of Σδ² of a shift file's `tensors` in the keys `pattern` matches (all: None), and how many values
    those keys hold."""
    total = sum(float(t.float().square().sum()) for t in tensors.values())
    chosen = [t for k, t in tensors.items() if pattern is None or re.search(pattern, k)]
    return sum(float(t.float().square().sum()) for t in chosen) / total, sum(t.numel() for t in chosen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subject_flags(p, prompts=4)
    QualityRun.add_flags(p, "layer_groups")
    args = p.parse_args()

    from svdiff.adapters import fuse, load_shifts, unfuse, unload_shifts
    from svdiff.data.images import load_image_folder
    from svdiff.format import read_shift_file
    from svdiff.sample import load_pipeline, sample

    run = QualityRun(args)
    pipe = load_pipeline(args.base)
    groups = {"every shift": None} | groups_of(pipe)
    base, found, shares, values = [], {g: [] for g in groups}, {g: [] for g in groups}, {}
    pictures, labels = [], []

    def similarity(subject: str, refs: torch.Tensor, keep: bool) -> float:
        images = []
        for template in CONTEXTS[: args.prompts]:
            prompt = template.format(s=subject)
            images += sample(pipe, prompt, num_images=args.seeds, guidance_scale=args.guidance_scale, progress=False)
        if keep:
            pictures.extend(images[: args.seeds])
        return float((embed(run.judge, images) @ refs.T).mean())

    for i, name in enumerate(NAMES[: args.subjects]):
        c = subject_card(name)
        subject = f"{c['identifier']} {c['class_word']}"
        refs = embed(run.judge, load_image_folder(subject_dir(name)))
        trained = train_subject(args.runs, name, "svdiff", args.steps, base=args.base, class_images=args.class_images)
        weights = Path(trained["weights"])
        tensors = read_shift_file(weights).tensors
        base.append(similarity(subject, refs, keep=i == 0))
        for group, pattern in groups.items():
            load_shifts(pipe, weights, "subject", include=None if pattern is None else [pattern], progress=False)
            fuse(pipe)
            found[group].append(similarity(subject, refs, keep=i == 0))
            unfuse(pipe)
            unload_shifts(pipe)
            share, values[group] = energy(tensors, pattern)
            shares[group].append(share)
        print(name, round(base[-1], 3), {g: round(v[-1], 3) for g, v in found.items()}, flush=True)
    labels = [f"{NAMES[0]}: the base", *(f"{NAMES[0]}: {g}" for g in groups)]

    def mean(xs):
        return round(sum(xs) / len(xs), 4)

    every = mean(found["every shift"])
    results = {"none (the base)": {"similarity": mean(base)}} | {
        g: {
            "similarity": mean(found[g]),
            "recovered": round((mean(found[g]) - mean(base)) / (every - mean(base)), 3)
            if every != mean(base)
            else None,
            "energy": mean(shares[g]),
            "values": values[g],
        }
        for g in groups
    }
    run.finish(
        {
            "benchmark": "layer_groups",
            "base": args.base,
            "subjects": list(NAMES[: args.subjects]),
            "prompts": list(CONTEXTS[: args.prompts]),
            "seeds": args.seeds,
            "steps": args.steps,
            "groups": groups,
            "results": results,
        },
        pictures,
        cols=args.seeds,
        labels=labels,
    )


if __name__ == "__main__":
    main()
