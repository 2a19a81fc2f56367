"""LoRA export: the loaded shifts as a LoRA that tools knowing only LoRA can load.

Per layer the update ΔW = U·diag(d)·Vᵀ (d = ReLU(σ + Σ s·δ) − σ) is already a singular value decomposition: U and V
are orthonormal, so its best rank-K approximation keeps the K entries of d largest in magnitude, and the export is
exact at full rank. The relative Frobenius error of a layer is ‖d_dropped‖ / ‖d‖. LoRA has no place for the
additive shifts of 1-D norm weights nor for embeddings, so those are reported as not carried.

    down (lora_A) = Vᵀ[idx]            (K × rest; a conv with K filters for conv layers)
    up   (lora_B) = U[:, idx] · d[idx] (c_out × K; a 1×1 conv for conv layers)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .errors import SvdiffError
from .spectral import shifted_modules
from .spectral.kinds import Conv, Linear

FORMATS = ("diffusers", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _keep(d: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    """Indices of the entries of d to keep: the `rank` largest |d|, or the fewest reaching `energy` of Σd²."""
    order = d.abs().argsort(descending=True)
    if rank is not None:
        return order[: max(1, min(rank, d.numel()))]
    cum = (d[order] ** 2).cumsum(0)
    k = int((cum < energy * cum[-1]).sum()) + 1 if cum[-1] > 0 else 1
    return order[: min(k, d.numel())]


@torch.no_grad()
def lora_layers(
    components: dict[str, nn.Module], rank: int | None = None, energy: float | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{"<component>.<module path>": {"down": …, "up": …}} for every shifted linear/conv layer of the loaded shift
    sets at their current scales, and a report of the errors and of what LoRA cannot carry."""
    if (rank is None) == (energy is None):
        raise SvdiffError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise SvdiffError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SvdiffError(f"--energy must be in (0, 1], not {energy}")
    layers, errors, dropped, total = {}, {}, [], [0.0, 0.0]
    for component, model in components.items():
        for name, (module, shift) in shifted_modules(model).items():
            d = shift.d()
            key = f"{component}.{name}"
            if d is None:
                continue
            if not isinstance(shift.kind, Linear | Conv) or not shift.kind.can_factor:  # LoRA: plain layers only
                dropped.append(key)
                continue
            d = d.float()
            idx = _keep(d, rank, energy)
            rest = torch.ones_like(d, dtype=torch.bool)
            rest[idx] = False
            lost, full = float((d[rest].double() ** 2).sum()), float((d.double() ** 2).sum())
            errors[key] = math.sqrt(lost / full) if full > 0 else 0.0
            total[0] += lost
            total[1] += full
            down = shift.Vh[idx].float()
            up = shift.U[:, idx].float() * d[idx]
            if isinstance(shift.kind, Conv):
                dims = len(module.kernel_size)
                down = down.reshape(len(idx), *module.weight.shape[1:])
                up = up.reshape(*up.shape, *(1,) * dims)
            layers[key.removesuffix(".weight")] = {"down": down.contiguous(), "up": up.contiguous()}
    if not layers:
        raise SvdiffError("no shifted linear or conv layer to export (are shifts loaded, with a non-zero scale?)")
    report = {
        "layers": len(layers),
        "relative_error": math.sqrt(total[0] / total[1]) if total[1] > 0 else 0.0,
        "worst_layers": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "ranks": {k: v["down"].shape[0] for k, v in layers.items()},
        "not_carried": dropped,
    }
    return layers, report


def to_state_dict(layers: dict[str, dict[str, torch.Tensor]], fmt: str) -> dict[str, torch.Tensor]:
    """The LoRA in diffusers' (PEFT) key layout or in kohya's."""
    if fmt not in FORMATS:
        raise SvdiffError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = {}
    prefixes = dict(KOHYA_PREFIX)
    if any(k.startswith("text_encoder_2.") for k in layers):  # SDXL: kohya numbers both text encoders
        prefixes["text_encoder"] = "lora_te1"
    for key, t in layers.items():
        if fmt == "diffusers":
            out[f"{key}.lora_A.weight"] = t["down"]
            out[f"{key}.lora_B.weight"] = t["up"]
        else:
            component, module = key.split(".", 1)
            name = f"{prefixes[component]}_{module.replace('.', '_')}"
            # kohya scales a layer by alpha / rank. One alpha for every layer (1, with the rank folded into up)
            # keeps the scale right in loaders that apply a single default alpha to layers they cannot match.
            rank = t["down"].shape[0]
            out[f"{name}.lora_down.weight"] = t["down"]
            out[f"{name}.lora_up.weight"] = t["up"] * rank
            out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def export_lora(
    shift_path: str | Path,
    output: str | Path,
    *,
    fmt: str = "diffusers",
    rank: int | None = None,
    energy: float | None = None,
    base: str | Path | None = None,
) -> dict:
    """Write a shift file as a LoRA file for `base` (default: the base named in the file). Returns the report."""
    from safetensors.torch import save_file

    from .io import load_shifts, read_shift_file
    from .models import base_name, load_components

    if fmt not in FORMATS:
        raise SvdiffError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    shift_file = read_shift_file(shift_path)
    if base is None:
        named = shift_file.metadata["base_model"]
        base = None if named == base_name(None) else named
    components = load_components(base)
    load_shifts(components, shift_file, progress=False)
    layers, report = lora_layers(components, rank=rank, energy=energy)
    meta = {"format": "pt"}
    if fmt == "kohya":
        meta |= {
            "ss_network_module": "networks.lora",
            "ss_network_alpha": "1.0",
            "ss_network_dim": str(max(report["ranks"].values())),
        }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        save_file(to_state_dict(layers, fmt), tmp, metadata=meta)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return report | {"output": str(output), "bytes": output.stat().st_size, "format": fmt}
