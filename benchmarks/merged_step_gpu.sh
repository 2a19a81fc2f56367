#!/bin/sh
# The GPU figures of the merged training step, in one command on a machine with CUDA (about 10-15 minutes on an
# H200, most of it compiling): the CUDA checks, the step of SD 1.5's UNet (512 px, batch 2, bf16) and of a
# reduced-depth Flux.1 block stack at real width (2 double + 4 single blocks, 512 px, batch 1, bf16), each method
# also compiled, and the SVD engine against per-layer torch.linalg.svd.
#
#     sh benchmarks/merged_step_gpu.sh [OUT_DIR]        (default docs/results/step)
set -e
out=$(cd "$(dirname "$0")/.." && pwd)/${1:-docs/results/step}
mkdir -p "$out"
cd "$(dirname "$0")"
python cuda_check.py > "$out/cuda_check.json"
python step_time.py --model sd15 --device cuda --dtype bf16 --resolution 512 --batch 2 --steps 30 --compile \
    --out "$out/step_time_sd15_512_b2_bf16.json"
python step_time.py --model flux --device cuda --dtype bf16 --resolution 512 --batch 1 --flux_layers 2 4 \
    --steps 30 --compile --out "$out/step_time_flux_2x4_512_bf16.json"
python svd_engine.py --device cuda --out "$out/svd_engine_cuda.json"
