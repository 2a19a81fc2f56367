"""LoRA export: loads with stock diffusers `load_lora_weights`, approaches the svdiff model as the rank grows and is
exact at full rank (without 1-D shifts), in both diffusers and kohya layouts."""

import json

import pytest
import torch

import svdiff
from svdiff.adapters import save_shifts
from svdiff.cli import main
from svdiff.export import lora_layers, to_state_dict
from tiny_models import tiny_pipeline

LINEAR_AND_CONV = {"unet": [r"norm"], "text_encoder": [r"layer_norm|embeddings"]}


def _pipe():
    return tiny_pipeline()


def _outputs(pipe):
    g = torch.Generator().manual_seed(1)
    ids, x = torch.randint(0, 50, (2, 8), generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(x, 10, text).sample


@pytest.fixture(scope="module")
def shifted():
    pipe = _pipe()
    g = torch.Generator().manual_seed(3)
    for component, exclude in LINEAR_AND_CONV.items():
        for p in svdiff.add_shifts(getattr(pipe, component), exclude=exclude, cache=False, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe, _outputs(pipe)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_loads_in_diffusers_and_converges_to_svdiff(shifted, fmt, tmp_path):
    from safetensors.torch import save_file

    pipe, target = shifted
    unet_errors = []
    for rank in (1, 4, None):
        layers, report = lora_layers({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, rank=rank or 10_000)
        path = tmp_path / f"{fmt}-{rank}.safetensors"
        save_file(to_state_dict(layers, fmt), path)
        lora = _pipe()
        lora.load_lora_weights(str(path))
        out = _outputs(lora)
        unet_errors.append(float((out[1] - target[1]).abs().max()))
        if rank is None:
            assert report["relative_error"] == 0.0
            for a, b in zip(out, target, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert unet_errors[0] > unet_errors[1] > unet_errors[2]


def test_energy_and_errors_per_layer(shifted):
    pipe, _ = shifted
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    _, low = lora_layers(comps, energy=0.5)
    _, high = lora_layers(comps, energy=0.99)
    assert sum(high["ranks"].values()) > sum(low["ranks"].values())
    assert high["relative_error"] < low["relative_error"] <= (1 - 0.5) ** 0.5 + 1e-6
    with pytest.raises(svdiff.SvdiffError, match="exactly one"):
        lora_layers(comps)
    with pytest.raises(svdiff.SvdiffError, match="energy"):
        lora_layers(comps, energy=1.5)


def test_export_command_reports_what_lora_cannot_carry(tmp_path, capsys):
    pipe = _pipe()
    folder = tmp_path / "base"
    pipe.unet.save_pretrained(folder / "unet")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    for p in svdiff.add_shifts(pipe.unet, cache=False, progress=False).values():
        p.data.normal_(std=0.2)
    shifts = save_shifts(tmp_path / "subject", {"unet": pipe.unet}, base_model=str(folder), preset="all")
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(shifts), "--format", "kohya", "--energy", "0.9", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["format"] == "kohya"
    assert any("norm" in k for k in report["not_carried"])  # the 1-D shifts
    assert main(["export", str(shifts), "--rank", "0", "-o", str(out)]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err
