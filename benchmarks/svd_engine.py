"""SVD of a whole SD 1.5 UNet (random weights from the built-in config): per-layer `torch.linalg.svd` (what earlier
implementations do) vs svdiff's engine vs a cache hit, with the factors' errors.

    python benchmarks/svd_engine.py [--device cuda] [--limit N] [--out results.json]

Errors per layer, in float64 against the weight: reconstruction ‖W − U·diag(σ)·Vᵀ‖_F / ‖W‖_F and orthogonality
max(‖UᵀU − I‖_max, ‖VᵀV − I‖_max); the JSON reports the worst layer of each method.
"""

import argparse
import tempfile
import time

import torch

from svdiff.models import build_architecture
from svdiff.spectral import SVDCache, find_targets
from svdiff.spectral.shifts import compute_bases

from common import emit, machine


def errors(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[float, float]:
    w, u, s, vh = (t.double() for t in (w, u, s, vh))
    recon = ((u * s) @ vh - w).norm() / w.norm()
    r = s.numel()
    eye = torch.eye(r, dtype=torch.float64, device=w.device)
    orth = max((u.T @ u - eye).abs().max(), (vh @ vh.T - eye).abs().max())
    return float(recon), float(orth)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="only the first N matrices (quick runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    unet = build_architecture("sd15", device=args.device)["unet"]
    targets = [t for t in find_targets(unet) if not t.kind.is_vector][: args.limit]
    mats = [t.kind.to_matrix(t.module.weight.detach()) for t in targets]

    # One layer at a time for the naive baseline, so its factors never pile up in memory.
    t_naive, err_naive = 0.0, []
    for m in mats:
        sync(args.device)
        start = time.perf_counter()
        factors = torch.linalg.svd(m.float(), full_matrices=False)
        sync(args.device)
        t_naive += time.perf_counter() - start
        err_naive.append(errors(m, *factors))
        del factors

    with tempfile.TemporaryDirectory() as tmp:
        cache = SVDCache(tmp)
        sync(args.device)
        start = time.perf_counter()
        engine = compute_bases(mats, cache=False, progress=False)
        sync(args.device)
        t_engine = time.perf_counter() - start
        err_engine = [errors(m, b.U, b.S, b.Vh) for m, b in zip(mats, engine, strict=True)]
        del engine

        del compute_bases(mats, cache=cache, progress=False)[:]  # fill the cache
        sync(args.device)
        start = time.perf_counter()
        hit = compute_bases(mats, cache=cache, progress=False)
        sync(args.device)
        t_hit = time.perf_counter() - start
        del hit

    worst = lambda errs, i: max(e[i] for e in errs)  # noqa: E731
    emit(
        {
            "benchmark": "svd_engine",
            "model": "sd15 unet (random weights)",
            "matrices": len(mats),
            "weight_values": sum(m.numel() for m in mats),
            "seconds": {"naive_torch_linalg_svd": t_naive, "engine": t_engine, "cache_hit": t_hit},
            "speedup_vs_naive": {"engine": t_naive / t_engine, "cache_hit": t_naive / t_hit},
            "max_reconstruction_error": {"naive": worst(err_naive, 0), "engine": worst(err_engine, 0)},
            "max_orthogonality_error": {"naive": worst(err_naive, 1), "engine": worst(err_engine, 1)},
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
