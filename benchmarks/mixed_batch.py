"""A mixed-subject batch against one run per subject: 8 prompts, each with its own shift set, drawn in one batch
(`svdiff generate --per-prompt`, per-sample d on the activation path) versus 8 single runs that each fuse their
set and draw one image, on the embedded base. Also the largest pixel difference between the two (they should
agree to rounding).

    python benchmarks/mixed_batch.py [--subjects 8] [--steps 10] [--out docs/results/mixed_batch/mixed_batch.json]

The shift sets are random (every target, δ ~ N(0, 0.02²)): timing does not depend on what a set learned.
"""

import argparse
import time

import numpy as np
import torch

from common import emit, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of each (the best is reported)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import svdiff
    from svdiff.adapters import components_of, fuse, set_scales, unfuse
    from svdiff.models import default_guidance
    from svdiff.sample import load_pipeline, sample, sample_per_prompt

    began = time.time()
    torch.manual_seed(0)
    pipe = load_pipeline(None, device="cpu")
    names = [f"s{k}" for k in range(args.subjects)]
    for name in names:
        for model in components_of(pipe).values():
            for param in svdiff.add_shifts(model, name=name, progress=False).values():
                param.data.normal_(std=0.02)
    prompts = [
        f"a photo of a {c} heart" for c in ("red", "blue", "green", "yellow", "purple", "orange", "pink", "cyan")
    ]
    prompts = (prompts * (args.subjects // len(prompts) + 1))[: args.subjects]
    settings = dict(num_images=1, seed=0, num_inference_steps=args.steps, guidance_scale=default_guidance(None))

    def mixed():
        rows = sample_per_prompt(
            pipe, prompts, [{n: 1.0} for n in names], batch_size=args.subjects, progress=False, **settings
        )
        return [row[0] for row in rows]

    def singles():
        images = []
        for name, prompt in zip(names, prompts, strict=True):
            set_scales(pipe, {n: float(n == name) for n in names})
            fuse(pipe)
            images += sample(pipe, prompt, progress=False, **settings)
            unfuse(pipe)
        return images

    timings = {"mixed_batch": [], "single_runs": []}
    results = {}
    for _ in range(args.repeats):
        for label, run in (("mixed_batch", mixed), ("single_runs", singles)):
            start = time.perf_counter()
            results[label] = run()
            timings[label].append(time.perf_counter() - start)
    diff = max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(results["mixed_batch"], results["single_runs"], strict=True)
    )
    best = {k: min(v) for k, v in timings.items()}
    emit(
        {
            "subjects": args.subjects,
            "steps": args.steps,
            "image_size": results["mixed_batch"][0].size,
            "seconds": {k: round(v, 3) for k, v in best.items()},
            "all_rounds_seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
            "single_runs_over_mixed": round(best["single_runs"] / best["mixed_batch"], 2),
            "max_pixel_difference": diff,
            "machine": machine(),
            "wall_seconds": round(time.time() - began, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
