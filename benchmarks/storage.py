"""What a personalized subject costs on disk (the paper's Table 1 and its headline): spectral shifts against a full
checkpoint, LoRA and Custom Diffusion's cross-attention K/V, on SD 1.5, SD 2.1, SDXL, SD3/3.5, Flux.1 and the
embedded tiny base.

    python benchmarks/storage.py [--out docs/results/storage/storage.json]

The architectures are built from their published configs on the meta device (nothing is downloaded); every
figure covers the components svdiff shifts (the denoiser and the CLIP text encoders, never T5 or the VAE). Shift
file sizes are real files (zero shifts with full metadata, written and measured); the others are their parameter
count times the bytes of a value: the full checkpoint is those components, as in the paper's 3.66 GB; LoRA r4 on
the attention projections (to_q, to_k, to_v, to_out.0 and the joint attention's add_*_proj / to_add_out; q, k, v,
out_proj in the text encoders) is what diffusers' DreamBooth LoRA adapts, LoRA r16 and r4 on every Linear is what
Flux and SD3 trainers (ai-toolkit, SimpleTuner) commonly adapt, both stored in bf16; Custom Diffusion keeps the
K and V of every `attn2`.
"""

import argparse
import time

from torch import nn

from common import emit, machine

BASES = {
    "sd15": "sd15",
    "sd21": "sd21",
    "sdxl": "sdxl",
    "sd3-medium": "sd3-medium",
    "sd35-medium": "sd35-medium",
    "sd35-large": "sd35-large",
    "flux-dev": "flux-dev",
    "flux-schnell": "flux-schnell",
    "tiny": None,
}
PRESETS = ("all", "unet-ca-kv")
LORA_ATTN = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
)
# The paper's numbers (Sec. 1 and Table 1; see shared/reference/paper_spec.md §1.5).
PAPER = {"svdiff_mb": 1.7, "full_gb": 3.66, "custom_diffusion_mb": 73, "ratio": 2200}


def linear_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def other_methods(components: dict) -> dict:
    """Parameter counts of a full checkpoint, LoRA (r4 on the attention projections; r16 and r4 on every Linear)
    and Custom Diffusion's K/V."""
    full = sum(p.numel() for m in components.values() for p in m.parameters())
    lora_attn = every_linear = custom = 0
    for component, model in components.items():
        for name, layer in linear_layers(model):
            width = layer.in_features + layer.out_features
            every_linear += width
            if name.endswith(LORA_ATTN):
                lora_attn += 4 * width
            if component == "unet" and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
                custom += layer.weight.numel()
    return {
        "full": full,
        "lora_r4": lora_attn,
        "lora_r16_every_linear": 16 * every_linear,
        "lora_r4_every_linear": 4 * every_linear,
        "custom_diffusion_kv": custom,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from svdiff.adapters import count_targets
    from svdiff.models import load_components

    began = time.time()
    rows = {}
    for label in args.bases:
        base = BASES[label]
        params = other_methods(load_components(base, meta=True))
        row = {"params": params}
        row["bytes_fp32"] = {k: 4 * v for k, v in params.items()}
        row["bytes_fp16"] = {k: 2 * v for k, v in params.items()}
        for preset in PRESETS:
            counted = count_targets(base, preset)
            key = f"svdiff_{preset}"
            row["params"][key] = counted["values"]
            row["bytes_fp32"][key] = counted["file_bytes_fp32"]
            row["bytes_fp16"][key] = counted["file_bytes_fp16"]
            row.setdefault("bytes_int8", {})[key] = counted["file_bytes_int8"]
        row["full_over_svdiff_fp32"] = round(row["bytes_fp32"]["full"] / row["bytes_fp32"]["svdiff_all"])
        row["lora_r16_every_linear_bf16_over_svdiff_fp16"] = round(
            row["bytes_fp16"]["lora_r16_every_linear"] / row["bytes_fp16"]["svdiff_all"], 1
        )
        rows[label] = row
    result = {
        "bases": rows,
        "paper": PAPER,
        "notes": "svdiff sizes are real shift files; the others are parameter count × bytes per value",
        "machine": machine(),
        "wall_seconds": round(time.time() - began, 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
