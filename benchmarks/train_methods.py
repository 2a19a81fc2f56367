"""Step time and peak memory of training with svdiff vs LoRA vs full fine-tuning, side by side in one run, on the
embedded bases (tiny: the UNet, flow: the SD3 transformer) and on the SD 1.5 architecture (random weights) at small
latents.

    python benchmarks/train_methods.py [--archs tiny flow sd15] [--steps 5] [--tiny_steps 50] [--rounds 3]
        [--sd15_resolution 256] [--step_path auto] [--out FILE]

Each (architecture, method) runs in its own process, so peak memory (max RSS on the CPU, max allocated on a GPU)
is its own. A step is what `svdiff train` does per step, minus the VAE and data loading (the same for every
method): text encoders and denoiser forward, the loss, backward, AdamW. Parameters are set up by the trainer's own
`svdiff.train.methods.prepare` (svdiff: preset all with the text encoder; svdiff-attn: preset attn, the same
attention projections LoRA adapts; LoRA rank 4 on the attention projections of both; full: every weight of both).
svdiff steps run as `svdiff train --step_path` says (`--step_path layers`: per-call layers with one δ tensor per
target, without the merged wiring's flat parameters; `svdiff-layers` in --methods runs that beside the others).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import emit, machine

# svdiff-attn: spectral shifts on the layers LoRA adapts (preset attn), the like-for-like comparison with LoRA.
METHODS = ("svdiff", "svdiff-attn", "lora", "full")
EXTRA_METHODS = ("svdiff-layers",)  # svdiff on per-call layers with per-target δ, without the merged wiring


EMBEDDED = {"tiny": None, "flow": "embedded:flow"}  # the embedded bases: the UNet (the default) and the flow one


def pipeline(arch: str, device: str):
    """A pipeline of `arch`: an embedded base, or a built-in architecture's random-weight denoiser and text
    encoder inside the embedded UNet base's pipeline (its tokenizer, VAE and scheduler, which a step here does not
    use beyond tokenizing)."""
    from svdiff.models import build_architecture
    from svdiff.sample import load_pipeline

    pipe = load_pipeline(EMBEDDED.get(arch), device=device)
    if arch in EMBEDDED:
        return pipe
    return type(pipe)(**(pipe.components | build_architecture(arch, device=device)))


def run_one(arch: str, method: str, steps: int, resolution: int, batch: int, device: str, step_path: str) -> dict:
    from svdiff.families import family_of
    from svdiff.train import TrainConfig, resolve
    from svdiff.train.methods import prepare
    from svdiff.train.step import build_optimizer

    preset = "attn" if method == "svdiff-attn" else "all"
    if method == "svdiff-layers":
        step_path = "layers"
    config = resolve(
        TrainConfig(
            method=method.split("-")[0], preset=preset, instance_data_dir="-", instance_prompt="-", progress=False
        )
    )
    family = family_of(pipeline(arch, device), config)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    modules = family.components(train_text_encoder=True)
    began = time.perf_counter()
    trainable = prepare(config, modules, family.lora_targets)
    for m in modules.values():
        m.train()
    paths = None
    if trainable.method == "svdiff" and step_path != "layers":
        wirings = trainable.merge_steps(step_path)
    setup_s = time.perf_counter() - began
    optimizer = build_optimizer(config, trainable.groups)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    latent = resolution // (4 if arch in EMBEDDED else 8)
    x = torch.randn(batch, family.model.config.in_channels, latent, latent, generator=gens[0]).to(device)
    noise = torch.randn(x.shape, generator=gens[0]).to(device)
    prompts = ["a photo of sks heart on the left and a blue circle on the right"] * batch
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        began = time.perf_counter()
        noisy, timesteps, target, _ = family.noise.corrupt(x, noise, gens)
        pred = family.predict(noisy, timesteps, family.encode(prompts))
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    if trainable.method == "svdiff" and step_path != "layers":
        paths = [w.summary() for w in wirings]
    out = {
        "arch": arch,
        "method": method,
        "trained_parameters": sum(p.numel() for p in trainable.params.values()),
        "setup_seconds": round(setup_s, 2),
        "step_seconds": round(statistics.median(times[1:]), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_load_mb": round(loaded_rss),
        "step_path": None if trainable.method != "svdiff" else step_path,
        "paths": paths,
    }
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def one_process(args, arch: str, method: str) -> dict:
    """One (architecture, method) timed in a process of its own, so its peak memory is its own."""
    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--one",
        arch,
        method,
        "--steps",
        str(args.tiny_steps if arch in EMBEDDED else args.steps),
        "--batch",
        str(args.batch),
        "--tiny_resolution",
        str(args.tiny_resolution),
        "--sd15_resolution",
        str(args.sd15_resolution),
        "--device",
        args.device,
        "--step_path",
        args.step_path,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{arch}/{method} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["tiny", "sd15"], help="tiny, flow or a built-in architecture")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS)
    p.add_argument("--step_path", default="auto", choices=("auto", "merged", "per-call", "layers"))
    p.add_argument("--steps", type=int, default=5, help="timed steps on SD 1.5")
    p.add_argument("--tiny_steps", type=int, default=50, help="timed steps on the embedded bases (milliseconds each)")
    p.add_argument("--rounds", type=int, default=3, help="every method runs once per round; medians are reported")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tiny_resolution", type=int, default=64)
    p.add_argument("--sd15_resolution", type=int, default=256, help="SD 1.5 at 256 px: 32×32 latents")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        arch, method = args.one
        resolution = args.tiny_resolution if arch in EMBEDDED else args.sd15_resolution
        print(json.dumps(run_one(arch, method, args.steps, resolution, args.batch, args.device, args.step_path)))
        return
    runs = []
    for _ in range(args.rounds):  # methods alternate, so a slow spell of the machine touches each of them
        runs += [one_process(args, arch, method) for arch in args.archs for method in args.methods]
    rows = []
    for arch in args.archs:
        for method in args.methods:
            mine = [r for r in runs if r["arch"] == arch and r["method"] == method]
            times = [r["step_seconds"] for r in mine]
            peak = max(r["peak_rss_mb"] for r in mine)
            rows.append(
                mine[0] | {"step_seconds": statistics.median(times), "round_step_seconds": times, "peak_rss_mb": peak}
            )
    ratios = {}
    for arch in args.archs:
        step = {r["method"]: r["step_seconds"] for r in rows if r["arch"] == arch}
        pairs = (("svdiff", "lora"), ("svdiff", "full"), ("svdiff-attn", "lora"), ("svdiff", "svdiff-layers"))
        for mine, other in pairs:
            if mine in step and other in step:
                ratios[f"{arch}_{mine}_over_{other}_step"] = round(step[mine] / step[other], 3)
    emit(
        {
            "benchmark": "train_methods",
            "settings": vars(args) | {"one": None},
            "results": rows,
            "ratios": ratios,
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
