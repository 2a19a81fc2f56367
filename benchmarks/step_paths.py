"""The training step of svdiff on each path, interleaved in one process: per-call layers with one δ tensor per
target (the layers alone), the same layers with δ in flat parameters (`--step_path per-call`), and merged once per
step in shape groups (`--step_path merged`). Steps of the three alternate, so a machine shared with other jobs
slows all of them alike; medians and ratios are reported.

    python benchmarks/step_paths.py [--arch tiny] [--steps 40] [--resolution 64] [--out FILE]

A step is train_methods.py's: text encoder and UNet forward, loss, backward, AdamW (foreach), zero_grad.
"""

import argparse
import statistics
import time

import torch

from train_methods import components

from common import emit, machine

PATHS = ("layers", "per-call", "merged")


def setup(arch: str, path: str, resolution: int, device: str):
    from svdiff.families import StableDiffusion
    from svdiff.train import TrainConfig, resolve
    from svdiff.train.methods import prepare
    from svdiff.train.step import build_optimizer

    unet, text_encoder = components(arch, device)
    config = resolve(TrainConfig(instance_data_dir="-", instance_prompt="-", progress=False))
    trainable = prepare(config, {"unet": unet, "text_encoder": text_encoder}, StableDiffusion.lora_targets)
    unet.train()
    text_encoder.train()
    if path != "layers":
        trainable.merge_steps(path)
    optimizer = build_optimizer(config, trainable.groups)
    g = torch.Generator().manual_seed(0)
    latent = resolution // (8 if arch != "tiny" else 4)
    x = torch.randn(1, unet.config.in_channels, latent, latent, generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    ids = torch.randint(
        0, text_encoder.config.vocab_size, (1, text_encoder.config.max_position_embeddings), generator=g
    )
    t = torch.randint(0, 1000, (1,), generator=g).to(device)

    def step() -> float:
        began = time.perf_counter()
        pred = unet(x, t, text_encoder(ids.to(device))[0]).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    steps = {path: setup(args.arch, path, args.resolution, args.device) for path in PATHS}
    times = {path: [] for path in PATHS}
    for i in range(args.warmup + args.steps):
        for path in PATHS if i % 2 else reversed(PATHS):  # alternating order: no path always runs first
            took = steps[path]()
            if i >= args.warmup:
                times[path].append(took)
    median = {path: statistics.median(v) for path, v in times.items()}
    emit(
        {
            "benchmark": "step_paths",
            "settings": vars(args),
            "median_step_s": median,
            "ratio_to_layers": {path: median[path] / median["layers"] for path in PATHS},
            "step_s": times,
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
