"""What fingerprinting every target costs on a real-shaped base: the SD 1.5 UNet and text encoder with random
weights (the published configs, built on the CPU), timed against the 16-layer probe alone, with the metadata size.

    python benchmarks/fingerprint_cost.py [--arch sd15] [--repeats 3] [--out FILE]
"""

import argparse
import json
import time

import torch

from svdiff.models import build_architecture
from svdiff.spectral import find_targets, fingerprint

from common import emit, machine


def probe_only(model, probes: int = 16) -> list[float]:
    """The part of the fingerprint that samples 16 layers (what a fingerprint was before it covered every target)."""
    matrices = [t.module.weight.reshape(-1) for t in find_targets(model) if t.module.weight.ndim >= 2]
    out = []
    for flat in matrices[:: max(1, len(matrices) // probes)][:probes]:
        n = flat.numel()
        out += [float(flat[i]) for i in (0, n // 3, 2 * n // 3, n - 1)]
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="sd15")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    components = build_architecture(args.arch, device="cpu")
    result = {"benchmark": "fingerprint_cost", "arch": args.arch, "machine": machine(), "components": {}}
    for name, model in components.items():
        with torch.no_grad():
            full = best_of(lambda model=model: fingerprint(model), args.repeats)
            probe = best_of(lambda model=model: probe_only(model), args.repeats)
        fp = fingerprint(model)
        result["components"][name] = {
            "targets": len(find_targets(model)),
            "weights_values": sum(p.numel() for p in model.parameters()),
            "fingerprint_s": round(full, 3),
            "probe_only_s": round(probe, 4),
            "fingerprint_json_bytes": len(json.dumps(fp, sort_keys=True)),
            "probe_json_bytes": len(json.dumps({"shapes": fp["shapes"], "probe": fp["probe"]}, sort_keys=True)),
        }
    result["total_fingerprint_s"] = round(sum(c["fingerprint_s"] for c in result["components"].values()), 3)
    emit(result, args.out)


if __name__ == "__main__":
    main()
