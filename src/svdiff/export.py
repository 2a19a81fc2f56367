"""LoRA export: the loaded shifts as a LoRA that tools knowing only LoRA can load.

Per layer the update ΔW = U·diag(d)·Vᵀ (d = ReLU(σ + Σ s·δ) − σ) is already a singular value decomposition: U and V
are orthonormal, so its best rank-K approximation keeps the K entries of d largest in magnitude, and the export is
exact at full rank. The relative Frobenius error of a layer is ‖d_dropped‖ / ‖d‖.

    down (lora_A) = Vᵀ[idx]            (K × rest; a conv with K filters for conv layers)
    up   (lora_B) = U[:, idx] · d[idx] (c_out × K; a 1×1 conv for conv layers)

Two layouts. `diffusers` (PEFT keys, `unet.….lora_A.weight`) is for diffusers' `load_lora_weights`. `kohya`
(`lora_unet_…`, `lora_te_…`) is for the UIs, and by default holds only keys that AUTOMATIC1111, Forge and ComfyUI
all map: Forge refuses a whole LoRA with more than 12 keys it cannot place. Layers no UI maps under one name are
left out and reported; `include_norms` adds the UNet's 1-D norm shifts as whole differences (`<key>.diff`, which
all three apply), `comfyui_extras` the text encoder's norms, embeddings and projection under ComfyUI's generic
`text_encoders.` names, which only ComfyUI maps (Forge then refuses the file).

Flux's kohya layout names the original (BFL) checkpoint's modules, as ComfyUI, Forge, sd-scripts and diffusers'
kohya loader all do. There the attention's q, k and v are one `qkv` linear, and a single block's q, k, v and MLP
input are one `linear1`: their LoRAs are stacked, downs one above the other and ups block-diagonal, which is
exact (each part's rows see only its own down), with the rank the sum of the parts'.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import attach
from .errors import SvdiffError
from .files import atomic_path
from .format import read_shift_file
from .models import base_name, load_components
from .names import checkpoint_name
from .spectral import shifted_modules
from .spectral.kinds import Conv, Embedding, Linear

FORMATS = ("diffusers", "kohya")
TOOLS = ("ComfyUI", "AUTOMATIC1111", "Forge", "sd-scripts", "diffusers")
FORGE_UNMATCHED_LIMIT = 12  # Forge: extensions-builtin/sd_forge_lora/networks.py, load_lora_for_models

# UNet layers every UI maps under its diffusers name: A1111's name conversion covers these blocks.
_UNET_DIFFUSERS = re.compile(
    r"((down_blocks|up_blocks)\.\d+\.(attentions|resnets)\.\d+|mid_block\.(attentions|resnets)\.\d+)\..+"
    r"|(down_blocks|up_blocks)\.\d+\.(downsamplers|upsamplers)\.0\.conv|conv_in|conv_out|time_embedding\.linear_[12]"
)
# UNet layers A1111 knows only under the original (LDM) checkpoint's name, which ComfyUI and Forge map too.
_UNET_LDM = {
    "conv_norm_out": "out.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# Text encoder layers all UIs map: the attention and MLP linears of each encoder layer.
_TEXT_LORA = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
# sd-scripts' LoRA lives only inside these blocks (networks/lora.py: Transformer2DModel, ResnetBlock2D,
# Down/Upsample2D, CLIPAttention, CLIPMLP) and reads only lora_down / lora_up / alpha.
_SD_SCRIPTS = re.compile(
    r"unet\.(.+\.(attentions|resnets)\.\d+\..+|.+\.(down|up)samplers\.0\.conv)|text_encoder(_2)?\..+"
)


def _keep(d: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    """Indices of the entries of d to keep: the `rank` largest |d|, or the fewest reaching `energy` of Σd²."""
    order = d.abs().argsort(descending=True)
    if rank is not None:
        return order[: max(1, min(rank, d.numel()))]
    cum = (d[order] ** 2).cumsum(0)
    k = int((cum < energy * cum[-1]).sum()) + 1 if cum[-1] > 0 else 1
    return order[: min(k, d.numel())]


def _check_rank(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise SvdiffError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise SvdiffError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SvdiffError(f"--energy must be in (0, 1], not {energy}")


def _shifted(components: dict[str, nn.Module]):
    """(key, module, shift, d) of every layer whose shifts are active; keys are `<component>.<module path>` in the
    published checkpoints' names."""
    for component, model in components.items():
        for name, (module, shift) in shifted_modules(model).items():
            d = shift.diagonal_change()
            if d is not None:
                yield (
                    f"{component}.{checkpoint_name(model, name).removesuffix('.weight')}",
                    module,
                    shift,
                    d.detach().float(),
                )


@torch.no_grad()
def lora_layers(
    components: dict[str, nn.Module], rank: int | None = None, energy: float | None = None, embeddings: bool = False
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{"<component>.<module path>": {"down": …, "up": …}} for every shifted linear/conv layer (and embedding, if
    asked) of the loaded shift sets at their current scales, and a report of the errors and of what is left out."""
    _check_rank(rank, energy)
    layers, errors, dropped, total = {}, {}, [], [0.0, 0.0]
    for key, module, shift, d in _shifted(components):
        plain = isinstance(shift.kind, Linear | Conv) and shift.kind.can_factor
        if not (plain or (embeddings and isinstance(shift.kind, Embedding))):
            dropped.append(key)
            continue
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
        layers[key] = {"down": down.contiguous(), "up": up.contiguous()}
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


@torch.no_grad()
def norm_differences(components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{"<component>.<module path>": w' − w} of every shifted 1-D norm weight: exact whole differences."""
    return {key: d.contiguous() for key, _, shift, d in _shifted(components) if shift.kind.is_vector}


def kohya_name(key: str, sdxl: bool = False) -> str | None:
    """The kohya-layout name of layer `key` ("<component>.<module path>") that AUTOMATIC1111, Forge and ComfyUI all
    map, or None if there is none."""
    component, path = key.split(".", 1)
    if component == "unet":
        if path in _UNET_LDM:
            return "lora_unet_" + _UNET_LDM[path].replace(".", "_")
        return "lora_unet_" + path.replace(".", "_") if _UNET_DIFFUSERS.fullmatch(path) else None
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}.get(component)
    return f"{prefix}_{path.replace('.', '_')}" if prefix and _TEXT_LORA.fullmatch(path) else None


# Flux.1: diffusers module path → original (BFL) module path, for the modules that are one weight in both
# (ComfyUI comfy/utils.py `flux_to_diffusers`; sd-scripts networks/convert_flux_lora.py).
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_BASIC = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
# diffusers' final AdaLayerNorm puts (scale, shift) where the original has (shift, scale): rows swap halves.
_FLUX_SWAPPED = {"norm_out.linear"}


def flux_layout(transformer: nn.Module) -> dict[str, tuple[str, int, int]]:
    """{diffusers module path: (BFL module path, first row, rows)} of a FluxTransformer2DModel: the rows the layer
    fills in the original checkpoint's weight (fused q/k/v and single-block linear1 hold several layers)."""
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    out = {}
    for i, block in enumerate(transformer.transformer_blocks):
        a, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"{a}.attn.{img}"] = (f"{b}.img_attn.qkv", j * hidden, hidden)
            out[f"{a}.attn.{txt}"] = (f"{b}.txt_attn.qkv", j * hidden, hidden)
        for ours, theirs in _FLUX_DOUBLE.items():
            out[f"{a}.{ours}"] = (f"{b}.{theirs}", 0, block.get_submodule(ours).out_features)
    for i, block in enumerate(transformer.single_transformer_blocks):
        a, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            out[f"{a}.{part}"] = (f"{b}.linear1", j * hidden, hidden)
        out[f"{a}.proj_mlp"] = (f"{b}.linear1", 3 * hidden, block.proj_mlp.out_features)
        for ours, theirs in _FLUX_SINGLE.items():
            out[f"{a}.{ours}"] = (f"{b}.{theirs}", 0, block.get_submodule(ours).out_features)
    for ours, theirs in _FLUX_BASIC.items():
        if (module := _submodule(transformer, ours)) is not None:
            out[ours] = (theirs, 0, module.out_features)
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def comfyui_name(key: str, model: nn.Module) -> str | None:
    """ComfyUI's generic name of a text encoder layer (`text_encoders.clip_l.transformer.<module path>`)."""
    component, path = key.split(".", 1)
    if component == "text_encoder_2":
        clip = "clip_g"
    elif component == "text_encoder":
        clip = "clip_h" if getattr(getattr(model, "config", None), "hidden_size", 768) == 1024 else "clip_l"
    else:
        return None
    return f"text_encoders.{clip}.transformer.{path}"


def _lora_entries(name: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # kohya scales a layer by alpha / rank. One alpha for every layer (1, with the rank folded into up) keeps the
    # scale right in loaders that apply a single default alpha to layers they cannot match.
    rank = t["down"].shape[0]
    return {
        f"{name}.lora_down.weight": t["down"],
        f"{name}.lora_up.weight": t["up"] * rank,
        f"{name}.alpha": torch.tensor(1.0),
    }


def to_state_dict(layers: dict[str, dict[str, torch.Tensor]], fmt: str) -> dict[str, torch.Tensor]:
    """The LoRA in diffusers' (PEFT) key layout or in kohya's (`kohya_name`; a layer without one is refused)."""
    if fmt not in FORMATS:
        raise SvdiffError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    sdxl = any(k.startswith("text_encoder_2.") for k in layers)
    out = {}
    for key, t in layers.items():
        if fmt == "diffusers":
            out[f"{key}.lora_A.weight"] = t["down"]
            out[f"{key}.lora_B.weight"] = t["up"]
        elif name := kohya_name(key, sdxl):
            out |= _lora_entries(name, t)
        else:
            raise SvdiffError(f"{key} has no name the UIs map; leave it out of a kohya export")
    return out


def _tool_report(shifted: list[str], carried: dict[str, list[str]], refused: dict[str, str]) -> dict:
    """Per target tool: how many layers it applies and which shifted layers it drops; `refused` names the tools
    that refuse the whole file, and why."""
    out = {}
    for tool in TOOLS:
        kept = set() if tool in refused else set(carried[tool])
        out[tool] = {"carries": len(kept), "drops": [k for k in shifted if k not in kept]}
        if tool in refused:
            out[tool]["refuses_file"] = refused[tool]
    return out


def _forge_refusal(unmatched: int) -> dict[str, str]:
    if unmatched <= FORGE_UNMATCHED_LIMIT:
        return {}
    return {"Forge": f"{unmatched} keys it cannot place, more than its limit of {FORGE_UNMATCHED_LIMIT}"}


def kohya_export(
    components: dict[str, nn.Module],
    *,
    rank: int | None = None,
    energy: float | None = None,
    include_norms: bool = False,
    comfyui_extras: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The kohya-layout state dict for the UIs and a report: per target tool, the layers it applies and drops."""
    layers, report = lora_layers(components, rank=rank, energy=energy, embeddings=comfyui_extras)
    sdxl = "text_encoder_2" in components
    state: dict[str, torch.Tensor] = {}
    entries = []  # (layer, written for every UI?, a LoRA?)
    comfy_only_keys = 0
    parts = [(k, t, True) for k, t in layers.items()] + [(k, d, False) for k, d in norm_differences(components).items()]
    for key, value, is_lora in parts:
        name = kohya_name(key, sdxl)
        if name and (is_lora or include_norms):
            ui = True
        elif comfyui_extras and (name := comfyui_name(key, components[key.split(".")[0]])):
            ui = False
        else:
            continue
        written = _lora_entries(name, value) if is_lora else {f"{name}.diff": value}
        state |= written
        comfy_only_keys += 0 if ui else len(written)
        entries.append((key, ui, is_lora))
    carried = {
        "ComfyUI": [k for k, _, _ in entries],
        "AUTOMATIC1111": [k for k, ui, _ in entries if ui],
        "Forge": [k for k, ui, _ in entries if ui],
        "sd-scripts": [k for k, ui, lora in entries if ui and lora and _SD_SCRIPTS.fullmatch(k)],
        "diffusers": [k for k, ui, lora in entries if ui and lora],
    }
    refused = _forge_refusal(comfy_only_keys)
    if any(not lora for _, _, lora in entries) or comfy_only_keys:  # lora_conversion_utils refuses other keys
        refused["diffusers"] = "load_lora_weights refuses .diff keys and names without 'lora'"
    report["tools"] = _tool_report([key for key, *_ in _shifted(components)], carried, refused)
    report["layers"] = len(entries)
    return state, report


def flux_kohya_export(
    components: dict[str, nn.Module], *, rank: int | None = None, energy: float | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Flux's kohya-layout state dict (`lora_unet_double_blocks_0_img_attn_qkv`, …, the CLIP encoder as
    `lora_te1_…`) and the report of what each tool applies and drops."""
    layers, report = lora_layers(components, rank=rank, energy=energy)
    layout = flux_layout(components["transformer"])
    rows: dict[str, int] = {}
    for bfl, start, n in layout.values():
        rows[bfl] = max(rows.get(bfl, 0), start + n)
    parts: dict[str, list] = {}
    state: dict[str, torch.Tensor] = {}
    entries = []  # (our layer, inside a double or single block?)
    for key, t in layers.items():
        component, path = key.split(".", 1)
        if component == "transformer" and path in layout:
            bfl, start, _ = layout[path]
            up = t["up"].roll(t["up"].shape[0] // 2, dims=0) if path in _FLUX_SWAPPED else t["up"]
            parts.setdefault(bfl, []).append((start, up, t["down"]))
            entries.append((key, bfl.startswith(("double_blocks.", "single_blocks."))))
        elif component == "text_encoder" and (name := kohya_name(key, sdxl=True)):  # CLIP-L, as sd-scripts names it
            state |= _lora_entries(name, t)
            entries.append((key, True))
    for bfl, pieces in parts.items():
        down = torch.cat([d for _, _, d in pieces])
        up = down.new_zeros(rows[bfl], down.shape[0])
        col = 0
        for start, u, d in pieces:
            up[start : start + u.shape[0], col : col + d.shape[0]] = u
            col += d.shape[0]
        state |= _lora_entries("lora_unet_" + bfl.replace(".", "_"), {"down": down, "up": up})
    every = [k for k, _ in entries]
    carried = {
        "ComfyUI": every,
        "Forge": every,
        "diffusers": every,
        # networks/lora_flux.py puts LoRA modules only in the double and single blocks (and CLIP's layers)
        "sd-scripts": [k for k, in_block in entries if in_block],
        "AUTOMATIC1111": [],  # it has no Flux support
    }
    report["tools"] = _tool_report([key for key, *_ in _shifted(components)], carried, {})
    report["layers"] = len(entries)
    report["ranks"] = {k: v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    return state, report


def diffusers_tools_report(components: dict[str, nn.Module], layers: dict) -> dict:
    """Per target tool, the layers of a diffusers-layout export it applies and drops."""

    # ComfyUI maps a diffusers UNet attention projection only as `.processor.to_q`, which diffusers cannot load,
    # and a text encoder layer only if it is an encoder layer's linear.
    def comfy(key: str) -> bool:
        component, path = key.split(".", 1)
        if component == "unet":
            return not re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", path)
        return bool(_TEXT_LORA.fullmatch(path))

    comfy_keys = [k for k in layers if comfy(k)]
    carried = {
        "diffusers": list(layers),
        "ComfyUI": comfy_keys,
        "Forge": comfy_keys,
        "AUTOMATIC1111": [],
        "sd-scripts": [],
    }
    refused = _forge_refusal(2 * (len(layers) - len(comfy_keys)))
    return _tool_report([key for key, *_ in _shifted(components)], carried, refused)


def export_lora(
    shift_path: str | Path,
    output: str | Path,
    *,
    fmt: str = "diffusers",
    rank: int | None = None,
    energy: float | None = None,
    base: str | Path | None = None,
    include_norms: bool = False,
    comfyui_extras: bool = False,
) -> dict:
    """Write a shift file as a LoRA file for `base` (default: the base named in the file). Returns the report,
    with what each target tool will apply and drop."""
    if fmt not in FORMATS:
        raise SvdiffError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt != "kohya" and (include_norms or comfyui_extras):
        raise SvdiffError("--include-norms and --comfyui-text-extras need --format kohya")
    _check_rank(rank, energy)
    shift_file = read_shift_file(shift_path)
    if base is None:
        named = shift_file.metadata["base_model"]
        base = None if named == base_name(None) else named
    components = load_components(base)
    flux = type(components.get("transformer")).__name__ == "FluxTransformer2DModel"
    if fmt == "kohya" and "transformer" in components and not flux:
        raise SvdiffError(
            "--format kohya names the layers of SD 1.x/2.x, SDXL and Flux; export SD3 shifts with "
            "--format diffusers, which diffusers' load_lora_weights and ComfyUI load"
        )
    if fmt == "kohya" and flux and (include_norms or comfyui_extras):
        raise SvdiffError("--include-norms and --comfyui-text-extras name UNet and CLIP layers, not Flux's")
    attach(components, shift_file, progress=False)
    meta = {"format": "pt"}
    if fmt == "kohya":
        if flux:
            state, report = flux_kohya_export(components, rank=rank, energy=energy)
        else:
            state, report = kohya_export(
                components, rank=rank, energy=energy, include_norms=include_norms, comfyui_extras=comfyui_extras
            )
        meta |= {
            "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
            "ss_network_alpha": "1.0",
            "ss_network_dim": str(max(report["ranks"].values())),
        }
    else:
        layers, report = lora_layers(components, rank=rank, energy=energy)
        state = to_state_dict(layers, fmt)
        report["tools"] = diffusers_tools_report(components, layers)
    output = Path(output)
    with atomic_path(output) as temp:
        save_file(state, temp, metadata=meta)
    return report | {"output": str(output), "bytes": output.stat().st_size, "format": fmt}
