"""What wiring merged training costs in memory, per path: the rise in peak resident memory when `MergedShifts`
takes over a model of `--layers` Linear layers of one shape (one shape group). On the per-call path (a CPU's) the
layers keep their own tensors, so nothing should be copied. On the merged path each group stacks its weights and
factors once, one layer at a time so that each layer's own tensors are freed as they go, and holds its merged
weights W′ beside W: the rise is W′ plus the product's temporary U·diag(d), about twice the weights.

    python benchmarks/merge_memory.py [--layers 48] [--width 1024] [--out FILE]

Each path runs in its own process (peak memory is per process), one thread each.
"""

import argparse
import json
import resource
import subprocess
import sys

from common import emit, machine

PATHS = ("per-call", "merged")


def measure(path: str, layers: int, width: int) -> dict:
    import torch
    from torch import nn

    import svdiff
    from svdiff.spectral.merged import MergedShifts

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).requires_grad_(False)
    svdiff.add_shifts(model, cache=False, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    MergedShifts(model, choose=path)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "peak_rise_MiB": round((after - before) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process's path
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.width)))
        return
    runs = []
    for path in PATHS:
        child = [sys.executable, __file__, "--one", path, "--layers", str(args.layers), "--width", str(args.width)]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    weights = args.layers * args.width * args.width * 4 / 2**20
    emit(
        {
            "machine": machine(),
            "layers": args.layers,
            "width": args.width,
            "weights_MiB": round(weights, 1),
            "one_layer_MiB": round(weights / args.layers, 1),
            "paths": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
