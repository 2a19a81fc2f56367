"""Quality of the embedded world, printed as JSON: judge accuracy on fresh renders, the base model on prompts it
never saw (single objects, left/right pairs) and on bare class prompts, and the time to draw 16 images.

    HF_HUB_OFFLINE=1 python benchmarks/world_quality.py [--quick] [--guidance_scale 3] [--base DIR] [--out FILE]

`--base` takes a pipeline folder or an embedded base's name (embedded:flow); the default is embedded:unet.
"""

import argparse
import time

from svdiff.world import GUIDANCE_SCALE
from svdiff.world.quality import measure

from common import emit, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", default=None, help="a pipeline folder or embedded:flow (default: embedded:unet)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    began = time.time()
    figures = measure(
        quick=args.quick, seed=args.seed, guidance_scale=args.guidance_scale, threads=args.threads, base=args.base
    )
    figures["machine"] = machine()
    figures["wall_seconds"] = round(time.time() - began, 1)
    emit(figures, args.out)


if __name__ == "__main__":
    main()
