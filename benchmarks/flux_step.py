"""The CPU training step of a Flux.1-dev transformer at its real widths, cut to a few blocks: spectral shifts on
every Linear against PEFT LoRA r16 on the same Linears (and r4), side by side in one run, with the trained
parameters and what they take at 2 bytes a value (fp16 δ, bf16 LoRA factors).

    OMP_NUM_THREADS=2 python benchmarks/flux_step.py --double 1 --single 2 --resolution 256 --steps 3

Each method runs in its own process on a freshly built transformer (the same seed), so peak memory is its own.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import emit, machine

METHODS = ("svdiff", "lora-r16", "lora-r4")


def transformer(double: int, single: int):
    from svdiff.models import build_architecture

    torch.manual_seed(0)
    full = build_architecture("flux-dev", device="meta")["transformer"]
    config = dict(full.config) | {"num_layers": double, "num_single_layers": single}
    return type(full).from_config(config).requires_grad_(False)


def run_one(method: str, double: int, single: int, resolution: int, text_tokens: int, steps: int) -> dict:
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model

    from svdiff.spectral import add_shifts

    model = transformer(double, single)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    began = time.perf_counter()
    if method == "svdiff":
        shifts = add_shifts(model, include=[rf"^{n.replace('.', '[.]')}[.]weight$" for n in linears], progress=False)
        params = list(shifts.values())
        file_bytes = 2 * sum(p.numel() for p in params)  # fp16 δ
    else:
        rank = int(method.split("-r")[1])
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=linears), model)
        params = [p for p in model.parameters() if p.requires_grad]
        file_bytes = 2 * sum(p.numel() for p in params)  # bf16 A and B
    setup_s = time.perf_counter() - began
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    c = model.config
    side = resolution // 16  # the VAE's 8× and Flux's 2×2 packing
    x = torch.randn(1, side * side, c.in_channels, generator=g)
    text = torch.randn(1, text_tokens, c.joint_attention_dim, generator=g)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=g)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(text_tokens, 3)
    target = torch.randn(x.shape, generator=g)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        out = model(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "targets": len(linears),
        "trained_parameters": sum(p.numel() for p in params),
        "file_bytes": file_bytes,
        "setup_seconds": round(setup_s, 2),
        "step_seconds": round(statistics.median(times[1:]), 3),
        "step_seconds_each": [round(t, 3) for t in times[1:]],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (Flux.1-dev has 19)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (Flux.1-dev has 38)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--text_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = (args.double, args.single, args.resolution, args.text_tokens, args.steps)
    if args.one:
        print(json.dumps(run_one(args.one, *shape)))
        return
    rows = []
    for method in args.methods:
        argv = [sys.executable, __file__, "--one", method, "--double", str(args.double), "--single", str(args.single)]
        argv += [
            "--resolution",
            str(args.resolution),
            "--text_tokens",
            str(args.text_tokens),
            "--steps",
            str(args.steps),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {r["method"]: r for r in rows}
    ratios = {}
    for other in ("lora-r16", "lora-r4"):
        if "svdiff" in by and other in by:
            ratios[f"svdiff_over_{other}_step"] = round(by["svdiff"]["step_seconds"] / by[other]["step_seconds"], 3)
            ratios[f"{other}_over_svdiff_file"] = round(by[other]["file_bytes"] / by["svdiff"]["file_bytes"], 1)
    emit(
        {"benchmark": "flux_step", "settings": vars(args), "results": rows, "ratios": ratios, "machine": machine()},
        args.out,
    )


if __name__ == "__main__":
    main()
