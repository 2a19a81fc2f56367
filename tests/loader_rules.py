"""Which LoRA keys each tool maps onto which weight, and how it turns them into a weight difference: the facts the
export tests check against, rewritten from the tools' own loaders (read 2026-12; the file each fact comes from is
named beside it). A tool's "target" here is our own `<component>.<module path>` of the layer it would patch.
"""

from __future__ import annotations

import re

import torch

# --- ComfyUI: comfy/utils.py `unet_to_diffusers` (UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_RESNET,
# UNET_MAP_BASIC): each diffusers UNet weight and the original (LDM) checkpoint's name of it. A1111 and Forge patch
# the same LDM modules.
ATTENTION = ("proj_in", "proj_out", "norm")
TRANSFORMER_BLOCK = (
    "norm1 norm2 norm3 attn1.to_q attn1.to_k attn1.to_v attn1.to_out.0 "
    "attn2.to_q attn2.to_k attn2.to_v attn2.to_out.0 ff.net.0.proj ff.net.2"
).split()
RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2"}
RESNET |= {"skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
BASIC |= {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
BASIC |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_ldm(config: dict) -> dict[str, str]:
    """{diffusers module path: LDM module path} of a UNet2DConditionModel config."""
    levels = len(config["down_block_types"])
    per_level = config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, int) else depth[0]
    out: dict[str, str] = {}

    def attention(diff: str, ldm: str) -> None:
        out.update({f"{diff}.{b}": f"{ldm}.{b}" for b in ATTENTION})
        for t in range(depth):
            out.update(
                {f"{diff}.transformer_blocks.{t}.{b}": f"{ldm}.transformer_blocks.{t}.{b}" for b in TRANSFORMER_BLOCK}
            )

    n = 1
    for x, kind in enumerate(config["down_block_types"]):
        for i in range(per_level):
            out.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{ld}" for ld, d in RESNET.items()})
            if "CrossAttn" in kind:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1")
            n += 1
        if x < levels - 1:
            out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    attention("mid_block.attentions.0", "middle_block.1")
    for i, m in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{m}.{ld}" for ld, d in RESNET.items()})
    n = 0
    for x, kind in enumerate(config["up_block_types"]):
        for i in range(per_level + 1):
            out.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{ld}" for ld, d in RESNET.items()})
            if "CrossAttn" in kind:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1")
            if i == per_level and x < levels - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if 'CrossAttn' in kind else 1}.conv"
            n += 1
    return out | BASIC


# --- ComfyUI: comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip` (LORA_CLIP_MAP), `load_lora`.
CLIP_LORA = {"mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"}
LORA_KINDS = (
    ("lora_up.weight", "lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    ("lora_B.weight", "lora_A.weight"),
    ("lora.up.weight", "lora.down.weight"),
)


def clip_name(component: str, hidden_size: int) -> str:
    """ComfyUI's name of a text encoder: SD 1.x and SDXL's first clip_l, SD 2.x clip_h, SDXL's second clip_g."""
    return "clip_g" if component == "text_encoder_2" else ("clip_h" if hidden_size == 1024 else "clip_l")


def comfyui_key_map(layers: dict[str, str], unet_config: dict | None, forge: bool = False) -> dict[str, str]:
    """{LoRA layer name ComfyUI (or Forge's copy of its loader) maps: our layer}. `layers` maps our layers
    (`<component>.<module path>`, text encoders in the published names, `text_model.…`) to what they are:
    "unet" or the ComfyUI clip name. Forge (packages_3rdparty/comfyui_lora_collection/lora.py) lacks the generic
    `text_encoders.` names of the text encoders."""
    ldm = unet_to_ldm(unet_config) if unet_config else {}
    back = {v: k for k, v in ldm.items()}
    out = {}
    clips = {clip for clip in layers.values() if clip != "unet"}
    for ours, where in layers.items():
        component, path = ours.split(".", 1)
        if where == "unet":
            if path in ldm:
                out[f"lora_unet_{path.replace('.', '_')}"] = ours
                for prefix in ("", "unet."):
                    name = prefix + path.replace(".to_", ".processor.to_")
                    out[name.removesuffix(".0") if name.endswith(".to_out.0") else name] = ours
            if path in ldm or path in back:  # the LDM names, as lora_unet_… and generic diffusion_model.…
                native = ldm.get(path, path)
                out[f"lora_unet_{native.replace('.', '_')}"] = ours
                out[f"diffusion_model.{native}"] = ours
            continue
        if not forge:
            out[f"text_encoders.{where}.transformer.{path}"] = ours
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
        if not (m and m.group(2) in CLIP_LORA):
            continue
        b, c = m.group(1), m.group(2).replace(".", "_")
        if where in ("clip_l", "clip_h"):
            out[f"lora_te_text_model_encoder_layers_{b}_{c}"] = ours
            out[f"lora_te1_text_model_encoder_layers_{b}_{c}"] = ours
            out[f"text_encoder.{path}"] = ours
        elif where == "clip_g" and "clip_l" in clips:
            out[f"lora_te2_text_model_encoder_layers_{b}_{c}"] = ours
            out[f"text_encoder_2.{path}"] = ours
    return out


def comfyui_load(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict, list[str]]:
    """ComfyUI's `load_lora`: {our layer: ("lora", up, down, alpha) or ("diff", tensor)} and the keys not loaded."""
    patches, loaded = {}, set()
    for name, ours in key_map.items():
        alpha = state.get(f"{name}.alpha")
        if alpha is not None:
            loaded.add(f"{name}.alpha")
        for up, down in LORA_KINDS:
            sep = "" if up.startswith("_") else "."
            if f"{name}{sep}{up}" in state:
                patches[ours] = ("lora", state[f"{name}{sep}{up}"], state[f"{name}{sep}{down}"], alpha)
                loaded |= {f"{name}{sep}{up}", f"{name}{sep}{down}"}
                break
        if f"{name}.diff" in state:
            patches[ours] = ("diff", state[f"{name}.diff"])
            loaded.add(f"{name}.diff")
    return patches, [k for k in state if k not in loaded]


# --- AUTOMATIC1111: extensions-builtin/Lora/networks.py (`convert_diffusers_name_to_compvis`,
# `assign_network_names_to_compvis_modules`, `load_network`), network_lora.py / network_full.py / network_norm.py.
A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0"}
A1111_RESNET |= {"time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert(key: str) -> str:
    """`convert_diffusers_name_to_compvis` for SD 1.x (and SDXL's first text encoder through the fallbacks)."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}",
        ),
    ]
    for pattern, out in rules:
        m = re.match(pattern, key)
        if m:
            return out(m.groups())
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        where, x, kind, i, rest = m.groups()
        suffix = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        block = 1 + int(x) * 3 + int(i) if where == "down" else int(x) * 3 + int(i)
        side = "input" if where == "down" else "output"
        return f"diffusion_model_{side}_blocks_{block}_{1 if kind == 'attentions' else 0}_{suffix}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, i, rest = m.groups()
        suffix = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else int(i) * 2}_{suffix}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def a1111_modules(layers: dict[str, str], unet_config: dict) -> dict[str, str]:
    """{A1111 module name: our layer} for an SD 1.x model: UNet modules under their LDM names
    (`diffusion_model_…`), the text encoder under FrozenCLIPEmbedder's (`transformer_text_model_…`)."""
    ldm = unet_to_ldm(unet_config)
    out = {}
    for ours, where in layers.items():
        component, path = ours.split(".", 1)
        if where == "unet" and path in ldm:
            out[f"diffusion_model_{ldm[path].replace('.', '_')}"] = ours
        elif component == "text_encoder":
            out[f"transformer_{path.replace('.', '_')}"] = ours
    return out


def a1111_load(state: dict[str, torch.Tensor], modules: dict[str, str]) -> tuple[dict, list[str]]:
    """A1111's `load_network`: {our layer: patch} and the keys it failed to match. A matched layer whose keys no
    module type accepts raises, as A1111 does (the whole LoRA fails)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    failed = []
    for key, weight in state.items():
        name, part = key.split(".", 1)
        module = modules.get(a1111_convert(name))
        if module is None and "lora_unet" in name:
            module = modules.get(name.replace("lora_unet", "diffusion_model"))
        elif module is None and "lora_te1_text_model" in name:
            module = modules.get(name.replace("lora_te1_text_model", "transformer_text_model"))
        if module is None:
            failed.append(key)
            continue
        groups.setdefault(module, {})[part] = weight
    patches = {}
    for module, w in groups.items():
        if "lora_up.weight" in w and "lora_down.weight" in w:
            alpha = w.get("alpha")
            patches[module] = ("lora", w["lora_up.weight"], w["lora_down.weight"], alpha)
        elif "diff" in w:
            patches[module] = ("diff", w["diff"])
        elif "w_norm" in w and "b_norm" in w:
            patches[module] = ("diff", w["w_norm"])
        else:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(w)}")
    return patches, failed


# --- Forge: extensions-builtin/sd_forge_lora/networks.py `load_lora_for_models`: ComfyUI's loader, and the whole
# LoRA is skipped ("LoRA version mismatch") when more than 12 keys stay unmatched.
FORGE_LIMIT = 12


def forge_load(state, key_map) -> tuple[dict, list[str]]:
    patches, unmatched = comfyui_load(state, key_map)
    return ({} if len(unmatched) > FORGE_LIMIT else patches), unmatched


# --- kohya sd-scripts: networks/lora.py `LoRANetwork` (create_network_from_weights, modules_dim from the file):
# Linear / Conv2d children of Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D in the UNet and of
# CLIPAttention / CLIPMLP in the text encoders, named prefix + module path with "_"; reads lora_down, lora_up, alpha.
SD_SCRIPTS_UNET = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
SD_SCRIPTS_TEXT = ("CLIPAttention", "CLIPMLP")


def sd_scripts_modules(components: dict[str, torch.nn.Module], sdxl: bool) -> dict[str, str]:
    """{kohya LoRA name: our layer} sd-scripts creates for these components."""
    from svdiff.names import checkpoint_name

    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    out = {}
    for component, model in components.items():
        targets = SD_SCRIPTS_UNET if component == "unet" else SD_SCRIPTS_TEXT
        for name, module in model.named_modules():
            if type(module).__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                if child_name and isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                    path = checkpoint_name(model, f"{name}.{child_name}")
                    out[f"{prefixes[component]}_{path.replace('.', '_')}"] = f"{component}.{path}"
    return out


def sd_scripts_load(state, modules) -> dict:
    patches = {}
    for name, ours in modules.items():
        if f"{name}.lora_down.weight" in state:
            up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
            patches[ours] = ("lora", up, down, state.get(f"{name}.alpha"))
    return patches


def weight_difference(patch, weight_shape) -> torch.Tensor:
    """ΔW a patch adds at strength 1: up·down · alpha / rank for a LoRA (rank = down's first dim), the tensor
    itself for a diff (comfy/weight_adapter/lora.py; A1111 network_lora.py, network_full.py)."""
    if patch[0] == "diff":
        return patch[1].reshape(weight_shape).double()
    _, up, down, alpha = patch
    scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
    return (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight_shape) * scale


# --- ComfyUI: comfy/utils.py `flux_to_diffusers` and comfy/lora.py `model_lora_keys_unet`. A Flux model is held in
# the original (BFL) checkpoint's names; a kohya LoRA names those modules (`lora_unet_` + path with "_"), and
# diffusers-named layers map onto parts of them: (BFL weight, (dim, start, length) or None, function or None).
def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_bfl(depth: int, depth_single: int, hidden: int) -> dict[str, tuple]:
    """{diffusers weight name: (BFL weight name, offset, function)} of a Flux transformer."""
    out: dict[str, tuple] = {}
    for i in range(depth):
        a, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"{a}.attn.{img}.weight"] = (f"{b}.img_attn.qkv.weight", (0, j * hidden, hidden), None)
            out[f"{a}.attn.{txt}.weight"] = (f"{b}.txt_attn.qkv.weight", (0, j * hidden, hidden), None)
        block = {
            "attn.to_out.0": "img_attn.proj",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
        }
        out |= {f"{a}.{k}.weight": (f"{b}.{v}.weight", None, None) for k, v in block.items()}
    for i in range(depth_single):
        a, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{a}.attn.{part}.weight"] = (f"{b}.linear1.weight", (0, j * hidden, hidden), None)
        out[f"{a}.proj_mlp.weight"] = (f"{b}.linear1.weight", (0, 3 * hidden, 4 * hidden), None)
        out[f"{a}.norm.linear.weight"] = (f"{b}.modulation.lin.weight", None, None)
        out[f"{a}.proj_out.weight"] = (f"{b}.linear2.weight", None, None)
    basic = {
        "final_layer.linear": "proj_out",
        "img_in": "x_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "txt_in": "context_embedder",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    }
    out |= {f"{d}.weight": (f"{b}.weight", None, None) for b, d in basic.items()}
    out["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    return out


def comfyui_flux_load(state: dict[str, torch.Tensor], bfl_weights: list[str]) -> tuple[dict, list[str]]:
    """ComfyUI's generic mapping of a Flux model's weights (`lora_unet_<path with _>` → `<path>.weight`) and
    `load_lora`: {BFL weight: patch} and the keys not loaded."""
    key_map = {"lora_unet_" + w.removesuffix(".weight").replace(".", "_"): w for w in bfl_weights}
    return comfyui_load(state, key_map)


# --- sd-scripts: networks/lora_flux.py — LoRA modules are the Linear children of DoubleStreamBlock and
# SingleStreamBlock only (and the text encoders'), named "lora_unet_" + path with "_".
def sd_scripts_flux_names(bfl_weights: list[str]) -> set[str]:
    return {
        "lora_unet_" + w.removesuffix(".weight").replace(".", "_")
        for w in bfl_weights
        if w.startswith(("double_blocks.", "single_blocks."))
    }
