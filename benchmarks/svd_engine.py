"""SVD of a whole SD 1.5 UNet (random weights from the built-in config): per-layer `torch.linalg.svd` (what earlier
implementations do) vs svdiff's engine vs a cache hit, with the factors' errors.

    python benchmarks/svd_engine.py [--device cuda] [--limit N] [--per-shape K] [--out results.json]

`--per-shape K` times at most K matrices of each distinct shape and scales each shape's time by its count: an
estimate of the whole model for slow machines, labelled as such in the JSON.

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
    ap.add_argument("--per-shape", type=int, default=None, help="sample K matrices per shape and extrapolate")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    unet = build_architecture("sd15", device=args.device)["unet"]
    targets = [t for t in find_targets(unet) if not t.kind.is_vector][: args.limit]
    mats = [t.kind.to_matrix(t.module.weight.detach()) for t in targets]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for m in mats:
        groups.setdefault(tuple(m.shape), []).append(m)
    # With --per-shape, K matrices stand for all of their shape: their times are scaled by count / K.
    scale = {shape: 1.0 for shape in groups}
    if args.per_shape:
        for shape, group in groups.items():
            scale[shape] = len(group) / min(len(group), args.per_shape)
            groups[shape] = group[: args.per_shape]

    def timed(fn):
        sync(args.device)
        start = time.perf_counter()
        out = fn()
        sync(args.device)
        return time.perf_counter() - start, out

    seconds = {"naive_torch_linalg_svd": 0.0, "engine": 0.0, "cache_hit": 0.0}
    err_naive, err_engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = SVDCache(tmp)
        for shape, group in groups.items():
            for m in group:  # one at a time, so the baseline's factors never pile up in memory
                t, factors = timed(lambda m=m: torch.linalg.svd(m.float(), full_matrices=False))
                seconds["naive_torch_linalg_svd"] += t * scale[shape]
                err_naive.append(errors(m, *factors))
            t, engine = timed(lambda group=group: compute_bases(group, cache=False, progress=False))
            seconds["engine"] += t * scale[shape]
            err_engine += [errors(m, b.U, b.S, b.Vh) for m, b in zip(group, engine, strict=True)]
            compute_bases(group, cache=cache, progress=False)  # fill the cache
            t, _ = timed(lambda group=group: compute_bases(group, cache=cache, progress=False))
            seconds["cache_hit"] += t * scale[shape]

    worst = lambda errs, i: max(e[i] for e in errs)  # noqa: E731
    emit(
        {
            "benchmark": "svd_engine",
            "model": "sd15 unet (random weights)",
            "matrices": len(mats),
            "weight_values": sum(m.numel() for m in mats),
            "timed": "all matrices" if not args.per_shape else f"{args.per_shape} per shape, scaled by count",
            "seconds": seconds,
            "speedup_vs_naive": {k: seconds["naive_torch_linalg_svd"] / seconds[k] for k in ("engine", "cache_hit")},
            "max_reconstruction_error": {"naive": worst(err_naive, 0), "engine": worst(err_engine, 0)},
            "max_orthogonality_error": {"naive": worst(err_naive, 1), "engine": worst(err_engine, 1)},
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
