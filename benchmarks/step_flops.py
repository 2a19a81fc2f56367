"""FLOPs of one training step of the SD 1.5 UNet at 512 px, batch 2, counted with torch.utils.flop_counter on meta
tensors (no memory, no weights): the frozen base, svdiff (per-call plans) with float32 factors (the default for
float32 weights: convolutions then train through their factors, the "spectral" plan) and with bf16 factors (exact
plans only), svdiff merged once per step in shape groups (spectral/merged.py), and a naive rebuild of every weight
on every forward (what earlier implementations do). Also the aten ops each step dispatches (views included) and
the memory the factors take.

    python benchmarks/step_flops.py [--resolution 512] [--batch 2] [--out results.json]

The frozen base's step is forward plus the backward that carries activation gradients through the network (any
adapter's training needs it); svdiff's step adds what δ costs on top of that.
"""

import argparse

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

import svdiff
from svdiff.models import build_architecture
from svdiff.spectral import find_targets, shifted_modules
from svdiff.spectral.dispatch import AtenOps
from svdiff.spectral.merged import MergedShifts

from common import emit, machine


def step_flops(unet: nn.Module, resolution: int, batch: int, grad_input: bool) -> tuple[int, int]:
    """FLOPs and aten ops of one forward and backward (the second of two, so one-time set-up is not counted)."""
    latent = resolution // 8
    for _ in range(2):
        x = torch.randn(batch, 4, latent, latent, device="meta", requires_grad=grad_input)
        t = torch.full((batch,), 500, device="meta")
        text = torch.randn(batch, 77, 768, device="meta")
        with FlopCounterMode(display=False) as counter, AtenOps() as ops:
            unet(x, t, text).sample.float().pow(2).mean().backward()
    return counter.get_total_flops(), ops.n


class NaiveRebuild(nn.Module):
    """W' = U·diag(ReLU(σ + δ))·Vᵀ rebuilt from the factors at every forward, with plain autograd."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, w):
        s = self.shift
        delta = s.deltas["default"]
        if s.kind.is_vector:
            return w + delta.to(w.dtype)
        dt = w.dtype
        return s.kind.from_matrix((s.U.to(dt) * torch.relu(s.S + delta).to(dt)) @ s.Vh.to(dt), w.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    unet = build_architecture("sd15", device="meta")["unet"]
    frozen, ops = step_flops(unet, args.resolution, args.batch, grad_input=True)
    aten = {"frozen_base": ops}

    shifted = {}
    for name, dtype in (("svdiff_bf16_factors", torch.bfloat16), ("svdiff", torch.float32)):
        svdiff.remove_shifts(unet)
        params = svdiff.add_shifts(unet, cache=False, progress=False, factor_dtype=dtype)
        for p in params.values():
            p.requires_grad_(True)
        shifted[name], aten[name] = step_flops(unet, args.resolution, args.batch, grad_input=False)
    merged_unet = build_architecture("sd15", device="meta")["unet"]
    svdiff.add_shifts(merged_unet, cache=False, progress=False)
    MergedShifts(merged_unet, choose="merged")
    shifted["svdiff_merged"], aten["svdiff_merged"] = step_flops(merged_unet, args.resolution, args.batch, False)

    weight_bytes = sum(p.numel() * 4 for n, p in unet.named_parameters() if "spectral_shift" not in n)
    factors = [(s.U, s.S, s.Vh) for _, s in shifted_modules(unet).values() if not s.kind.is_vector]
    bf16_bytes = sum(u.numel() * 2 + sv.numel() * 4 + vh.numel() * 2 for u, sv, vh in factors)
    fp32_bytes = sum((u.numel() + sv.numel() + vh.numel()) * 4 for u, sv, vh in factors)

    for module, shift in shifted_modules(unet).values():
        del module._modules["spectral_shift"]
        module.__dict__.pop("forward")
        parametrize.register_parametrization(module, "weight", NaiveRebuild(shift))
    naive, aten["naive_rebuild"] = step_flops(unet, args.resolution, args.batch, grad_input=False)

    emit(
        {
            "benchmark": "step_flops",
            "model": "sd15 unet",
            "resolution": args.resolution,
            "batch": args.batch,
            "targets": len(find_targets(build_architecture("sd15", device="meta")["unet"])),
            "tflops_per_step": {"frozen_base": frozen / 1e12, **{k: v / 1e12 for k, v in shifted.items()}}
            | {"naive_rebuild": naive / 1e12},
            "ratio_to_frozen": {k: v / frozen for k, v in shifted.items()} | {"naive_rebuild": naive / frozen},
            "factor_memory_vs_fp32_weights": {
                "bf16_factors": bf16_bytes / weight_bytes,
                "fp32_factors": fp32_bytes / weight_bytes,
            },
            "aten_ops_per_step": aten,
            "aten_ops_ratio_to_frozen": {k: v / aten["frozen_base"] for k, v in aten.items()},
            "fp32_weight_bytes": weight_bytes,
            "machine": machine("meta"),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
