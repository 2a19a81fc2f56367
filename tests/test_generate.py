"""`svdiff generate` on a small diffusers pipeline folder saved here: files written, determinism, scale 0 = base,
shifts change the images, and each bad input ends in one error line."""

import json

import pytest
import torch
from PIL import Image

import svdiff
from svdiff.adapters import save_shifts
from svdiff.cli import main
from svdiff.models import default_guidance, load_components
from svdiff.train import TrainConfig, resolve
from svdiff.world import GUIDANCE_SCALE, default_base
from svdiff.world.tokenizer import build_tokenizer
from tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = tiny_pipeline(build_tokenizer(root / "tok", max_length=8), vae_levels=2)
    pipe.save_pretrained(root / "base")
    components = load_components(root / "base")
    g = torch.Generator().manual_seed(1)
    for model in components.values():
        for p in svdiff.add_shifts(model, cache=False, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_shifts(root / "subject", components, base_model=str(root / "base"), preset="all")
    return root


def _generate(folder, out, *extra):
    args = [
        "generate",
        "--base",
        str(folder / "base"),
        "--prompt",
        "a photo of a red circle",
        "--num_images",
        "2",
        "--num_inference_steps",
        "2",
        "--guidance_scale",
        "2",
        "--output",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    return [Image.open(out.with_name(f"{out.stem}-0-{i}.png")).tobytes() for i in range(2)]


def test_generate_writes_grid_singles_and_settings(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDIFF_CACHE", str(tmp_path / "cache"))
    base = _generate(folder, tmp_path / "a" / "grid.png")
    assert (tmp_path / "a" / "grid.png").is_file()
    settings = json.loads((tmp_path / "a" / "grid.json").read_text())
    assert settings["seed"] == 0 and settings["loaded_shifts"] == {}
    assert _generate(folder, tmp_path / "b.png") == base  # deterministic per seed
    shifts = str(folder / "subject" / "svdiff_weights.safetensors")
    assert _generate(folder, tmp_path / "zero.png", "--shifts", shifts + ":0") == base  # scale 0 = the base
    shifted = _generate(folder, tmp_path / "one.png", "--shifts", shifts)
    assert shifted != base
    assert _generate(folder, tmp_path / "interp.png", "--interpolate", shifts, shifts, "--alpha", "0.3") == shifted


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shifts", "x.safetensors:big"], "not a number"),
        (["--shifts", "missing.safetensors"], "missing.safetensors"),
        (["--alpha", "0.2"], "--alpha needs --interpolate"),
        (["--scheduler", "nope"], "unknown scheduler"),
        (["--output", "grid.jpg"], "must name a .png file"),
        (["--num_images", "0"], "--num_images 0 must be an integer in [1, 1024]"),
        (["--base", "sd15"], "built-in architecture without weights"),
        (["--style_mix", "a.safetensors", "b.safetensors"], "geometry=FILE appearance=FILE"),
    ],
)
def test_generate_bad_input(folder, tmp_path, capsys, extra, message):
    args = [
        "generate",
        "--base",
        str(folder / "base"),
        "--prompt",
        "a red circle",
        "--num_inference_steps",
        "1",
        "--output",
        str(tmp_path / "g.png"),
        *extra,
    ]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_guidance_defaults_to_what_the_base_draws_best_at(folder):
    assert default_guidance(None) == default_guidance(default_base()) == GUIDANCE_SCALE == 3.0
    assert default_guidance(folder / "base") == default_guidance("runwayml/stable-diffusion-v1-5") == 7.5
    for base, expected in ((None, 3.0), (str(folder / "base"), 7.5)):
        config = resolve(TrainConfig(instance_data_dir="-", instance_prompt="-", pretrained_model_name_or_path=base))
        assert config.validation_guidance_scale == expected


def test_collage_scale_defaults_to_the_base(folder):
    # the embedded base draws pairs at its subjects' photo size; elsewhere each photo is kept whole
    for base, expected in ((None, 1.0), (str(folder / "base"), 0.5)):
        config = resolve(TrainConfig(instance_data_dir="-", instance_prompt="-", pretrained_model_name_or_path=base))
        assert config.cut_mix_scale == expected
    config = resolve(TrainConfig(instance_data_dir="-", instance_prompt="-", cut_mix_scale=0.75))
    assert config.cut_mix_scale == 0.75
