"""The two ways svdiff runs a convolution with V's filters (the "spectral" plan's x·V and its x-gradient) on a CPU,
side by side per layer shape: torch's convolution (oneDNN) and one matrix product over unfolded patches (im2col,
`F.unfold`/`F.fold`). What sets `svdiff.spectral.kinds.UNFOLD_POSITIONS` and `UNFOLD_VALUES`: svdiff unfolds
over at most that many output positions with at least that many filter values.

    python benchmarks/conv_paths.py [--repeats 10] [--out docs/results/core/conv_paths.json]

Shapes: the 3×3 convolutions of SD 1.5 at 256 px (32×32 latents) and of the embedded base, batch 1, one thread.
"""

import argparse
import time

import torch
from torch import nn

from svdiff.spectral import add_shifts, kinds, shifted_modules

from common import emit, machine

# (in channels, out channels, input side, stride)
SHAPES = {
    "sd15": [
        (320, 320, 32, 1),
        (640, 640, 16, 1),
        (640, 640, 16, 2),
        (1280, 1280, 8, 1),
        (2560, 1280, 8, 1),
        (1280, 1280, 8, 2),
        (2560, 1280, 4, 1),
        (1280, 1280, 4, 1),
    ],
    "embedded base": [(32, 32, 16, 1), (64, 64, 8, 1), (128, 128, 4, 1), (256, 128, 4, 1)],
}


def timed(fn, repeats: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats * 1e3


def measure(c_in: int, c_out: int, side: int, stride: int, repeats: int) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    add_shifts(conv, cache=False, progress=False)
    module, shift = next(iter(shifted_modules(conv).values()))
    kind = shift.kind
    x = torch.randn(1, c_in, side, side)
    out = {
        "shape": f"{c_in}→{c_out}, {side}×{side}, stride {stride}",
        "positions": kind.tokens(module, x),
        "filter_values": shift.Vh.numel(),
    }
    g = torch.randn_like(kind.down(module, shift, x))  # a gradient of V's convolution's output
    results = {}
    for path, (positions, values) in (("convolution", (0, 1 << 62)), ("unfolded", (1 << 62, 0))):
        kinds.UNFOLD_POSITIONS, kinds.UNFOLD_VALUES = positions, values
        h = kind.down(module, shift, x)
        results[path] = (h, kind.down_transpose(module, shift, g, x))
        out[f"{path}_forward_ms"] = round(timed(lambda: kind.down(module, shift, x), repeats), 3)
        out[f"{path}_x_grad_ms"] = round(timed(lambda: kind.down_transpose(module, shift, g, x), repeats), 3)
    (h0, gx0), (h1, gx1) = results["convolution"], results["unfolded"]
    out["max_relative_difference"] = float(
        max((h1 - h0).abs().max() / h0.abs().max(), (gx1 - gx0).abs().max() / gx0.abs().max())
    )
    for part in ("forward", "x_grad"):
        out[f"{part}_unfolded_speedup"] = round(out[f"convolution_{part}_ms"] / out[f"unfolded_{part}_ms"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rule = kinds.UNFOLD_POSITIONS, kinds.UNFOLD_VALUES
    rows = {model: [measure(*shape, args.repeats) for shape in shapes] for model, shapes in SHAPES.items()}
    kinds.UNFOLD_POSITIONS, kinds.UNFOLD_VALUES = rule
    for row in (r for layers in rows.values() for r in layers):
        row["svdiff_unfolds"] = row["positions"] <= rule[0] and row["filter_values"] >= rule[1]
    emit(
        {
            "benchmark": "conv_paths",
            "unfold_positions": rule[0],
            "unfold_values": rule[1],
            "layers": rows,
            "settings": vars(args),
            "machine": machine(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
