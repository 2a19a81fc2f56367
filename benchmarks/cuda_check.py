"""Checks that need a GPU (CI has none): on CUDA with bf16 weights, δ = 0 is bit-exact, a bf16-autocast training
step gives finite δ gradients that match float32 ones, fuse/unfuse restore the weights, and the engine's singular
values match a float64 SVD. Prints JSON; exits non-zero on a failed check.

    python benchmarks/cuda_check.py
"""

import copy
import sys

import torch
from torch import nn

import svdiff
from svdiff.spectral import decompose

from common import emit, machine


def main():
    dev = "cuda"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.Conv2d(64, 16, 1)).to(dev)
    x = torch.randn(2, 8, 32, 32, device=dev)
    checks = {}

    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = copy.deepcopy(half)
    svdiff.add_shifts(half, factor_dtype=torch.bfloat16, cache=False, progress=False)
    checks["bf16_zero_shift_bit_exact"] = torch.equal(half(x.bfloat16()), ref(x.bfloat16()))

    grads = {}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):
        m = copy.deepcopy(model)
        params = svdiff.add_shifts(m, cache=False, progress=False)
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.linspace(-0.05, 0.05, p.numel(), device=dev))
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            m(x).float().pow(2).mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in params.values()])
    checks["autocast_grads_finite"] = bool(torch.isfinite(grads["bf16_autocast"]).all())
    rel = (grads["bf16_autocast"] - grads["fp32"]).norm() / grads["fp32"].norm()
    checks["autocast_grad_rel_error"] = float(rel)
    checks["autocast_grads_close"] = float(rel) < 0.05

    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = svdiff.add_shifts(m, cache=False, progress=False)
    with torch.no_grad():
        for p in params.values():
            p.normal_(std=0.1)
        y = m(x)
        svdiff.fuse(m)
        checks["fused_matches"] = bool(torch.allclose(m(x), y, rtol=1e-4, atol=1e-4))
        svdiff.remove_shifts(m)
    checks["remove_restores_bits"] = all(torch.equal(m.state_dict()[k], v) for k, v in before.items())

    mats = [torch.randn(320, 2880, device=dev), torch.randn(1280, 1280, device=dev), torch.randn(64, 8, device=dev)]
    err = max(
        float((b.S - torch.linalg.svdvals(a.double().cpu()).to(a)).abs().max() / b.S[0])
        for a, b in zip(mats, decompose(mats), strict=True)
    )
    checks["engine_singular_values_rel_error"] = err
    checks["engine_matches_svd"] = err < 1e-5

    ok = all(v for k, v in checks.items() if isinstance(v, bool))
    emit({"benchmark": "cuda_check", "ok": ok, "checks": checks, "machine": machine(dev)}, None)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
