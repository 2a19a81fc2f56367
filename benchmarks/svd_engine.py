"""SVD of a whole denoiser (random weights, shapes from a built-in architecture): per-layer `torch.linalg.svd`
(what earlier implementations do) vs svdiff's engine vs a cache hit, with the factors' errors.

    python benchmarks/svd_engine.py [--base sd15|sdxl|sd35-large|flux-dev|…] [--device cuda] [--limit N]
        [--per-shape K] [--out results.json]

`--device` defaults to cuda where a GPU exists, so the one command measures the GPU engine there.

The architecture is read on the meta device and each matrix drawn with PyTorch's default layer initialization
(Kaiming-uniform over its fan-in), so even Flux's 12 B weights never need to fit in memory at once. `--per-shape
K` times at most K matrices of each distinct shape and scales each shape's time by its count: an estimate of the
whole model for slow machines, labelled as such in the JSON.

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

from common import emit, machine, sync


def errors(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[float, float]:
    w, u, s, vh = (t.double() for t in (w, u, s, vh))
    recon = ((u * s) @ vh - w).norm() / w.norm()
    r = s.numel()
    eye = torch.eye(r, dtype=torch.float64, device=w.device)
    orth = max((u.T @ u - eye).abs().max(), (vh @ vh.T - eye).abs().max())
    return float(recon), float(orth)


def kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A weight as nn.Linear and nn.Conv initialize it: uniform in ±1/√fan_in (Kaiming-uniform, a = √5)."""
    bound = 1 / shape[1] ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="sd15", help="a built-in architecture (svdiff targets --help lists them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None, help="only the first N matrices (quick runs)")
    ap.add_argument("--per-shape", type=int, default=None, help="sample K matrices per shape and extrapolate")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    components = build_architecture(args.base)
    name = "transformer" if "transformer" in components else "unet"
    targets = [t for t in find_targets(components[name]) if not t.kind.is_vector][: args.limit]
    shapes = [tuple(t.kind.to_matrix(t.module.weight).shape) for t in targets]
    counts: dict[tuple, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    # With --per-shape, K matrices stand for all of their shape: their times are scaled by count / K.
    drawn = {shape: min(n, args.per_shape or n) for shape, n in counts.items()}
    scale = {shape: counts[shape] / drawn[shape] for shape in counts}
    generator = torch.Generator().manual_seed(0)
    groups = {shape: [kaiming(shape, generator).to(args.device) for _ in range(k)] for shape, k in drawn.items()}

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
            "model": f"{args.base} {name} (random weights)",
            "matrices": len(shapes),
            "weight_values": sum(m * n for m, n in shapes),
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
