"""Bases: a local diffusers folder (the real-model code path, on a tiny model saved here) and the built-in
architectures; the `targets` and `cache` commands on them."""

import json

import pytest
import torch

from svdiff.cli import main
from svdiff.models import build_architecture, load_components
from svdiff.spectral import find_targets
from tiny_models import tiny_text_encoder, tiny_unet


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A diffusers-layout folder with a tiny UNet and text encoder (random weights)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_load_local_folder_and_meta_counts_agree(sd_folder):
    real = load_components(sd_folder, dtype=torch.float16)
    meta = load_components(sd_folder, meta=True)
    assert set(real) == set(meta) == {"unet", "text_encoder"}
    assert real["unet"].dtype == torch.float16 and not any(p.requires_grad for p in real["unet"].parameters())
    for c in real:
        assert [(t.name, t.length) for t in find_targets(real[c])] == [
            (t.name, t.length) for t in find_targets(meta[c])
        ]
    assert next(meta["unet"].parameters()).is_meta


def test_targets_and_cache_commands_on_a_folder(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SVDIFF_CACHE", str(tmp_path / "cache"))
    assert main(["targets", "--pretrained_model_name_or_path", str(sd_folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    unet = load_components(sd_folder)["unet"]
    assert report["components"]["unet"]["values"] == sum(t.length for t in find_targets(unet))
    assert main(["cache", "build", "--base", str(sd_folder)]) == 0
    matrices = sum(1 for c in load_components(sd_folder).values() for t in find_targets(c) if not t.kind.is_vector)
    assert main(["cache", "list"]) == 0
    assert f"{matrices} entries" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert f"removed {matrices} entries" in capsys.readouterr().out


def test_builtin_architectures_build_on_meta():
    sdxl = build_architecture("sdxl")
    assert set(sdxl) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(p.is_meta for m in sdxl.values() for p in m.parameters())
    sd21 = build_architecture("sd21")
    assert sd21["unet"].config.cross_attention_dim == 1024
