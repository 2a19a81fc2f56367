"""int8 shift files against fp16 on the embedded base: file sizes and the largest pixel difference between the
images each draws (same prompts, seeds and steps).

    python benchmarks/int8_shifts.py [--deltas run/checkpoint-N/trained.safetensors] [--images 4] [--steps 25]

`--deltas` takes δ keyed `<component>.<parameter>` (a training checkpoint's `trained.safetensors`); without it the
shifts are random, every target with δ ~ N(0, 0.05²).
"""

import argparse
import tempfile
import time

import numpy as np
import safetensors.torch
import torch

from common import emit, machine

PROMPTS = ("a photo of sks heart", "a photo of sks heart on a beach")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deltas", default=None)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import svdiff
    from svdiff.adapters import components_of, save_shifts
    from svdiff.sample import apply_shifts, load_pipeline, sample
    from svdiff.spectral import set_deltas

    began = time.time()
    pipe = load_pipeline(None, device="cpu")
    components = components_of(pipe)
    given = safetensors.torch.load_file(args.deltas) if args.deltas else None
    g = torch.Generator().manual_seed(0)
    for name, model in components.items():
        params = svdiff.add_shifts(model, progress=False)
        if given is None:
            for param in params.values():
                param.data.copy_(torch.randn(param.shape, generator=g) * 0.05)
        else:
            set_deltas(model, {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(f"{name}.")})
    images, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp16", "int8"):
            file = save_shifts(
                f"{tmp}/{dtype}.safetensors", components, base_model="svdiff-tiny", preset="all", dtype=dtype
            )
            sizes[dtype] = file.stat().st_size
            fresh = load_pipeline(None, device="cpu")
            apply_shifts(fresh, [(file, 1.0)])
            images[dtype] = [
                np.asarray(im, dtype=np.int16)
                for prompt in PROMPTS
                for im in sample(fresh, prompt, num_images=args.images, num_inference_steps=args.steps, progress=False)
            ]
    diffs = [np.abs(a - b) for a, b in zip(images["fp16"], images["int8"], strict=True)]
    emit(
        {
            "deltas": args.deltas or "random N(0, 0.05^2)",
            "images": len(diffs),
            "steps": args.steps,
            "file_bytes": sizes,
            "int8_over_fp16": round(sizes["int8"] / sizes["fp16"], 3),
            "max_pixel_difference": int(max(d.max() for d in diffs)),
            "mean_pixel_difference": round(float(np.mean([d.mean() for d in diffs])), 4),
            "machine": machine(),
            "wall_seconds": round(time.time() - began, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
