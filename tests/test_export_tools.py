"""The exports as each tool loads them: the key rules of ComfyUI, AUTOMATIC1111, Forge and sd-scripts (rewritten
from their loaders in `loader_rules.py`) applied to what `svdiff export` writes, on a small UNet laid out like
SD 1.5 (four levels, two layers per block) and a three-layer text encoder. Each tool must apply exactly the layers
the export's report says it carries, and each applied layer must reproduce svdiff's ΔW."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import loader_rules as rules
import svdiff
from svdiff.export import diffusers_tools_report, kohya_export, lora_layers, to_state_dict
from svdiff.names import checkpoint_name, live_name
from svdiff.spectral import shifted_modules


def sd15_like() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=4,
    )
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    components = {"unet": unet, "text_encoder": CLIPTextModel(config)}
    g = torch.Generator().manual_seed(1)
    for model in components.values():
        for p in svdiff.add_shifts(model, cache=False, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.numel() < 40 else 0.05))
    return components


@pytest.fixture(scope="module")
def model():
    return sd15_like()


def layer_kinds(components) -> dict[str, str]:
    """Our shifted layers (published names) and what they are: "unet" or ComfyUI's clip name."""
    out = {}
    for component, m in components.items():
        where = "unet" if component == "unet" else rules.clip_name(component, m.config.hidden_size)
        for name in shifted_modules(m):
            out[f"{component}.{checkpoint_name(m, name).removesuffix('.weight')}"] = where
    return out


def svdiff_delta(components, key) -> torch.Tensor:
    component, path = key.split(".", 1)
    m = components[component]
    shifted = shifted_modules(m)
    module, shift = shifted[live_name(m, f"{path}.weight", shifted)]
    return shift.delta_weight(shift.diagonal_change(), module.weight).double()


def applied(components, patches) -> set[str]:
    """The layers of `patches` after checking each reproduces svdiff's ΔW."""
    for key, patch in patches.items():
        want = svdiff_delta(components, key)
        got = rules.weight_difference(patch, want.shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=key)
    return set(patches)


def carried(report, tool, kinds) -> set[str]:
    """The layers the export's report says `tool` applies."""
    return set(kinds) - set(report["tools"][tool]["drops"])


@pytest.fixture(scope="module")
def kinds(model):
    return layer_kinds(model)


NORMS = {"norm", "norm1", "norm2", "norm3", "conv_norm_out", "layer_norm1", "layer_norm2", "final_layer_norm"}


def is_norm(key):
    return key.rsplit(".", 1)[-1] in NORMS


def is_embedding(key):
    return ".embeddings." in key


@pytest.mark.parametrize("include_norms", [False, True])
def test_kohya_export_loads_completely_in_comfyui_a1111_and_forge(model, kinds, include_norms):
    state, report = kohya_export(model, rank=10_000, include_norms=include_norms)
    config = model["unet"].config
    comfy, left = rules.comfyui_load(state, rules.comfyui_key_map(kinds, config))
    assert left == [] and applied(model, comfy) == carried(report, "ComfyUI", kinds)
    forge, left = rules.forge_load(state, rules.comfyui_key_map(kinds, config, forge=True))
    assert left == [] and applied(model, forge) == carried(report, "Forge", kinds)
    a1111, failed = rules.a1111_load(state, rules.a1111_modules(kinds, config))
    assert failed == [] and applied(model, a1111) == carried(report, "AUTOMATIC1111", kinds)
    # what the UIs cannot place is only the text encoder's norms and embeddings (and, by default, all norms)
    expected_drops = {
        k for k in kinds if (is_norm(k) and (k.startswith("text") or not include_norms)) or is_embedding(k)
    }
    assert set(kinds) - set(comfy) == expected_drops
    assert not any(k.endswith(".w_norm") for k in state)  # A1111 refuses a w_norm without b_norm


def test_kohya_export_in_sd_scripts_skips_layers_outside_its_blocks(model, kinds):
    state, report = kohya_export(model, rank=10_000, include_norms=True)
    patches = rules.sd_scripts_load(state, rules.sd_scripts_modules(model, sdxl=False))
    assert applied(model, patches) == carried(report, "sd-scripts", kinds)
    outside = {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2"}
    assert outside <= set(report["tools"]["sd-scripts"]["drops"])
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in patches)


def test_comfyui_extras_carry_every_layer_in_comfyui_and_make_forge_refuse(model, kinds):
    state, report = kohya_export(model, rank=10_000, include_norms=True, comfyui_extras=True)
    config = model["unet"].config
    comfy, left = rules.comfyui_load(state, rules.comfyui_key_map(kinds, config))
    assert left == [] and applied(model, comfy) == set(kinds) == carried(report, "ComfyUI", kinds)
    a1111, failed = rules.a1111_load(state, rules.a1111_modules(kinds, config))
    assert applied(model, a1111) == carried(report, "AUTOMATIC1111", kinds) and all(
        k.startswith("text_encoders.") for k in failed
    )
    forge, left = rules.forge_load(state, rules.comfyui_key_map(kinds, config, forge=True))
    assert len(left) > rules.FORGE_LIMIT and forge == {}
    assert (
        report["tools"]["Forge"]["carries"] == 0
        and "more than its limit of 12" in report["tools"]["Forge"]["refuses_file"]
    )


def test_diffusers_layout_per_tool(model, kinds):
    layers, _ = lora_layers(model, rank=10_000)
    state = to_state_dict(layers, "diffusers")
    report = {"tools": diffusers_tools_report(model, layers)}
    config = model["unet"].config
    comfy, _ = rules.comfyui_load(state, rules.comfyui_key_map(kinds, config))
    assert applied(model, comfy) == carried(report, "ComfyUI", kinds)
    assert any(k.startswith("text_encoder.") for k in comfy)  # the text_model level makes ComfyUI map them
    _, left = rules.forge_load(state, rules.comfyui_key_map(kinds, config, forge=True))
    assert len(left) > rules.FORGE_LIMIT and report["tools"]["Forge"]["refuses_file"]
    a1111, _ = rules.a1111_load(state, rules.a1111_modules(kinds, config))
    assert a1111 == {} and carried(report, "AUTOMATIC1111", kinds) == set()


def test_sdxl_text_encoders_are_te1_and_te2():
    from svdiff.export import kohya_name

    assert kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1", sdxl=True).startswith("lora_te1_text_model_")
    assert kohya_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", sdxl=True).startswith(
        "lora_te2_text_model_"
    )
    assert (
        kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    )
    assert kohya_name("unet.conv_norm_out") == "lora_unet_out_0"  # the LDM name A1111 knows
    assert kohya_name("text_encoder_2.text_projection", sdxl=True) is None


def test_stock_diffusers_loads_the_default_kohya_export_and_refuses_one_with_norms(tmp_path):
    from safetensors.torch import save_file

    from tiny_models import tiny_pipeline

    pipe = tiny_pipeline()
    for component in ("unet", "text_encoder"):
        for p in svdiff.add_shifts(getattr(pipe, component), cache=False, progress=False).values():
            p.data.normal_(std=0.05)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for include_norms in (False, True):
        state, report = kohya_export(components, rank=100, include_norms=include_norms)
        save_file(state, tmp_path / "k.safetensors")
        fresh = tiny_pipeline()
        if include_norms:
            assert "refuses .diff keys" in report["tools"]["diffusers"]["refuses_file"]
            with pytest.raises(ValueError, match="not been correctly renamed"):
                fresh.load_lora_weights(str(tmp_path / "k.safetensors"))
        else:
            assert "refuses_file" not in report["tools"]["diffusers"]
            fresh.load_lora_weights(str(tmp_path / "k.safetensors"))


def test_export_command_prints_what_each_tool_carries(tmp_path, capsys):
    import json

    from svdiff.adapters import save_shifts
    from svdiff.cli import main
    from tiny_models import tiny_pipeline

    pipe = tiny_pipeline()
    folder = tmp_path / "base"
    pipe.save_pretrained(folder)
    for p in svdiff.add_shifts(pipe.unet, cache=False, progress=False).values():
        p.data.normal_(std=0.2)
    shifts = save_shifts(tmp_path / "subject", {"unet": pipe.unet}, base_model=str(folder), preset="all")
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(shifts), "--format", "kohya", "--rank", "4", "--include-norms", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for tool in ("ComfyUI", "AUTOMATIC1111", "Forge", "sd-scripts", "diffusers"):
        assert tool in text
    assert "sd-scripts     carries" in text and "diffusers      carries 0 layers" in text
    assert main(["export", str(shifts), "--rank", "4", "--include-norms", "-o", str(out)]) == 2
    assert "need --format kohya" in capsys.readouterr().err
    assert main(["export", str(shifts), "--format", "kohya", "--rank", "4", "-o", str(out), "--json"]) == 0
    tools = json.loads(capsys.readouterr().out)["tools"]
    assert tools["Forge"]["drops"] == tools["AUTOMATIC1111"]["drops"] and all(
        "norm" in k for k in tools["Forge"]["drops"]
    )


def flux_like():
    """The tiny Flux transformer (one double and two single blocks, guidance embedder) with every layer shifted."""
    from tiny_models import tiny_flux

    transformer = tiny_flux()
    g = torch.Generator().manual_seed(1)
    for p in svdiff.add_shifts(transformer, cache=False, progress=False).values():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def test_flux_kohya_export_patches_the_original_checkpoint_as_comfyui_and_forge_map_it():
    from svdiff.export import flux_kohya_export

    transformer = flux_like()
    state, report = flux_kohya_export({"transformer": transformer}, rank=10_000)
    assert report["relative_error"] == 0.0
    mapping = rules.flux_to_bfl(1, 2, 16)
    bfl_weights = sorted({bfl for bfl, _, _ in mapping.values()})
    patches, unmatched = rules.comfyui_flux_load(state, bfl_weights)
    assert unmatched == []  # every key lands, so Forge (its copy of this loader, limit 12) takes the file too
    shapes: dict[str, list[int]] = {}
    for name, (bfl, offset, _) in mapping.items():
        rows = transformer.get_parameter(name).shape
        size = shapes.setdefault(bfl, [0, rows[1]])
        size[0] = max(size[0], (offset[1] + offset[2]) if offset else rows[0])
    expected = {bfl: torch.zeros(shape, dtype=torch.float64) for bfl, shape in shapes.items()}
    carried = set()
    for name, (module, shift) in shifted_modules(transformer).items():
        if shift.kind.is_vector:
            continue  # the qk-norm scales are not LoRA layers
        bfl, offset, function = mapping[name]
        delta = shift.delta_weight(shift.diagonal_change(), module.weight).double().detach()
        delta = function(delta) if function else delta
        target = expected[bfl] if offset is None else expected[bfl].narrow(*offset)
        target += delta
        carried.add(f"transformer.{name.removesuffix('.weight')}")
    assert set(patches) == {bfl for bfl in expected if expected[bfl].abs().sum() > 0}
    for bfl, patch in patches.items():
        torch.testing.assert_close(rules.weight_difference(patch, expected[bfl].shape), expected[bfl])
    tools = report["tools"]
    assert (
        set(tools["ComfyUI"]["drops"])
        == set(tools["Forge"]["drops"])
        == {f"transformer.{n.removesuffix('.weight')}" for n, (_, s) in shifted_modules(transformer).items()} - carried
    )
    assert tools["AUTOMATIC1111"]["carries"] == 0
    written = {k.rsplit(".", 2)[0] for k in state}
    in_blocks = written & rules.sd_scripts_flux_names(bfl_weights)
    assert written - in_blocks == {
        "lora_unet_" + w for w in ("img_in", "txt_in", "final_layer_linear", "final_layer_adaLN_modulation_1")
    } | {f"lora_unet_{p}_{q}" for p in ("time_in", "vector_in", "guidance_in") for q in ("in_layer", "out_layer")}
    blocks = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")
    assert tools["sd-scripts"]["carries"] == sum(1 for k in carried if k.startswith(blocks))
