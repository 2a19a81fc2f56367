"""Wall time and peak memory of one UNet training step: frozen base vs svdiff vs a naive per-forward rebuild of
every weight, side by side in one run.

    python benchmarks/step_time.py --device cuda --dtype bf16 [--resolution 512 --batch 2 --steps 10]

Base weights are held in `--dtype` (frozen), δ in float32, the factors in bf16. The frozen step is forward plus the
backward that carries activation gradients through the network.
"""

import argparse
import statistics
import time

import torch
from torch.nn.utils import parametrize

import svdiff
from step_flops import NaiveRebuild
from svdiff.models import build_architecture
from svdiff.spectral import shifted_modules

from common import emit, machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(unet, args, grad_input: bool, params) -> dict:
    dtype = DTYPES[args.dtype]
    latent = args.resolution // 8
    g = torch.Generator(device=args.device).manual_seed(0)
    x = torch.randn(args.batch, 4, latent, latent, device=args.device, dtype=dtype, generator=g)
    text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=args.device, dtype=dtype, generator=g)
    t = torch.full((args.batch,), 500, device=args.device)
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None
    times = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync(args.device)
        start = time.perf_counter()
        out = unet(x.requires_grad_(grad_input), t, text).sample
        out.float().pow(2).mean().backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        x = x.detach()
    result = {"step_seconds": statistics.median(times)}
    if args.device.startswith("cuda"):
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    unet = build_architecture(args.base, device=args.device)["unet"].to(DTYPES[args.dtype])
    results = {"frozen_base": measure(unet, args, True, [])}
    params = list(svdiff.add_shifts(unet, factor_dtype=torch.bfloat16, cache=False, progress=False).values())
    with torch.no_grad():
        for p in params:
            p.normal_(std=1e-3)
    results["svdiff"] = measure(unet, args, False, [p.requires_grad_(True) for p in params])
    for module, shift in shifted_modules(unet).values():
        del module._modules["spectral_shift"]
        module.__dict__.pop("forward")
        parametrize.register_parametrization(module, "weight", NaiveRebuild(shift))
    results["naive_rebuild"] = measure(unet, args, False, params)
    frozen = results["frozen_base"]["step_seconds"]
    emit(
        {
            "benchmark": "step_time",
            "model": f"{args.base} unet (random weights)",
            "resolution": args.resolution,
            "batch": args.batch,
            "dtype": args.dtype,
            "results": results,
            "time_ratio_to_frozen": {k: v["step_seconds"] / frozen for k, v in results.items()},
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
