"""Using a shift file: sampling time of the fused pipeline vs the base (same seeds, side by side), the time to load and
fuse the file, and the LoRA export's error as the rank grows (JSON, plus a PNG of the curve).

    python benchmarks/compose.py --shifts subject/svdiff_weights.safetensors [--base DIR] [--out-dir runs/compose]

Without --shifts, a file of random shifts (σ-relative scale 0.05) for the base is made first and the JSON says so.
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import svdiff
from svdiff.adapters import components_of, save_shifts
from svdiff.export import lora_layers
from svdiff.models import base_name, load_components
from svdiff.pictures import line_chart
from svdiff.sample import load_pipeline, sample

from common import emit, machine


def random_shift_file(base, folder: Path) -> Path:
    components = load_components(base)
    g = torch.Generator().manual_seed(0)
    for model in components.values():
        for p in svdiff.add_shifts(model, cache=False, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_shifts(folder, components, base_model=base_name(base), preset="all")


def sampling_seconds(pipes: dict, args) -> dict[str, float]:
    """Median seconds per pipeline, the pipelines timed in turn so that a change in the machine's load hits both."""
    times = {name: [] for name in pipes}
    for pipe in pipes.values():  # warm-up
        sample(pipe, "a photo of a red circle", num_images=1, num_inference_steps=2, progress=False)
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            sample(
                pipe,
                "a photo of a red circle",
                num_images=args.num_images,
                num_inference_steps=args.steps,
                batch_size=args.num_images,
                progress=False,
            )
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None)
    ap.add_argument("--shifts", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--num_images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default="runs/compose")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        shifts = Path(args.shifts) if args.shifts else random_shift_file(args.base, Path(tmp))
        base, pipe = load_pipeline(args.base, device="cpu"), load_pipeline(args.base, device="cpu")
        start = time.perf_counter()
        svdiff.load_shifts(pipe, shifts, progress=False)
        svdiff.fuse(pipe)
        load_fuse = time.perf_counter() - start
        seconds = sampling_seconds({"base": base, "fused": pipe}, args)
        svdiff.unfuse(pipe)
        comps = components_of(pipe)
        curve = []
        for rank in (1, 2, 4, 8, 16, 32, 64, 128, 1024):
            curve.append((rank, lora_layers(comps, rank=rank)[1]["relative_error"]))
    title = "LoRA export: relative Frobenius error vs log2(max rank per layer)"
    line_chart({"error": [(math.log2(r), e) for r, e in curve]}, title=title).save(out_dir / "export_error.png")
    emit(
        {
            "benchmark": "compose",
            "shifts": str(args.shifts) if args.shifts else "random shifts (0.05), not a trained subject",
            "sampling_seconds": seconds,
            "fused_over_base": seconds["fused"] / seconds["base"],
            "load_and_fuse_seconds": load_fuse,
            "export_relative_error_by_rank": dict(curve),
            "machine": machine("cpu"),
        },
        str(out_dir / "compose.json"),
    )


if __name__ == "__main__":
    main()
