"""Single-image editing: DDIM inversion, slerp (Eq. 7), a short edit run and its settings, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from svdiff.cli import main
from svdiff.edit import edit_image, encode_image, invert, slerp
from svdiff.errors import SvdiffError
from svdiff.families import family_of
from svdiff.sample import load_pipeline
from svdiff.world.render import Scene, WorldObject, caption, render

SCENE = Scene((WorldObject("star", "red", "striped", "medium", "left"),))
TARGET = "a photo of a medium blue striped star on the left on a white background"


@pytest.fixture
def scene_file(tmp_path):
    image, _ = render(SCENE)
    path = tmp_path / "scene.png"
    image.save(path)
    return path


def test_ddim_inversion_then_sampling_returns_the_latents():
    pipe = load_pipeline(None)
    image, _ = render(SCENE)
    latents = encode_image(pipe, image, 64)
    prompt = caption(SCENE)
    noise_map = invert(family_of(pipe), latents, prompt, 50)
    back = pipe(prompt, latents=noise_map, num_inference_steps=50, guidance_scale=1.0, output_type="latent").images
    error = float((back - latents).norm() / latents.norm())
    fresh = pipe(prompt, num_inference_steps=50, guidance_scale=1.0, output_type="latent").images
    # 0.10 on the embedded base (v-prediction, zero terminal SNR); it halves at 100 steps.
    assert error < 0.15, error
    assert float((fresh - latents).norm() / latents.norm()) > 4 * error  # a plain sample is far from the image


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    # Two independent Gaussians are nearly orthogonal: slerp keeps their norm where a straight mix shrinks it by √2.
    mid = slerp(0.5, a, b)
    assert abs(mid.norm() / a.norm() - 1) < 0.05
    assert ((a + b) / 2).norm() / a.norm() < 0.75
    assert torch.allclose(slerp(0.3, a, 2 * a), 1.3 * a, atol=1e-5)  # parallel: a straight mix
    with pytest.raises(SvdiffError, match="outside"):
        slerp(1.5, a, b)


def test_a_short_edit_run_changes_the_image_and_writes_its_settings(tmp_path, scene_file):
    out = tmp_path / "edits.png"
    result = edit_image(
        scene_file, caption(SCENE), [TARGET], out, max_train_steps=10, num_inference_steps=10, progress=False
    )
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings == {k: v for k, v in result.items() if k != "pictures"}
    assert settings["trained_steps"] == 10 and settings["ddim_inversion"] and settings["target_prompts"] == [TARGET]
    assert Image.open(out).size == (3 * 128, 128 + 12)
    source, reconstruction, edited = (np.asarray(im, dtype=float) for im in result["pictures"])
    assert np.abs(edited - reconstruction).mean() > 1.0

    # The saved shifts are reused without training again, and give the same pictures.
    again = edit_image(
        scene_file,
        caption(SCENE),
        [TARGET],
        tmp_path / "again.png",
        shifts=settings["shifts"],
        num_inference_steps=10,
        progress=False,
    )
    assert again["trained_steps"] is None
    assert np.array_equal(np.asarray(again["pictures"][2]), np.asarray(result["pictures"][2]))


def test_slerp_and_eta_add_noise_to_the_inverted_map(tmp_path, scene_file):
    shifts = edit_image(
        scene_file,
        caption(SCENE),
        [TARGET],
        tmp_path / "a.png",
        max_train_steps=2,
        num_inference_steps=10,
        progress=False,
    )["shifts"]
    kw = dict(shifts=shifts, num_inference_steps=10, progress=False)
    plain = edit_image(scene_file, caption(SCENE), [TARGET], tmp_path / "b.png", **kw)["pictures"][2]
    noisy = edit_image(scene_file, caption(SCENE), [TARGET], tmp_path / "c.png", slerp_alpha=0.5, **kw)["pictures"][2]
    eta = edit_image(scene_file, caption(SCENE), [TARGET], tmp_path / "d.png", eta=1.0, **kw)["pictures"][2]
    assert not np.array_equal(np.asarray(plain), np.asarray(noisy))
    assert not np.array_equal(np.asarray(plain), np.asarray(eta))


def test_full_fine_tuning_edits_too(tmp_path, scene_file):
    result = edit_image(
        scene_file,
        caption(SCENE),
        [TARGET],
        tmp_path / "full.png",
        method="full",
        max_train_steps=2,
        num_inference_steps=5,
        progress=False,
    )
    assert result["shifts"].endswith("unet/diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_small_image_is_enlarged_with_a_warning(tmp_path):
    image, _ = render(SCENE)
    small = tmp_path / "small.png"
    image.resize((32, 32)).save(small)
    with pytest.warns(UserWarning, match="smaller than 64"):
        edit_image(
            small,
            caption(SCENE),
            [TARGET],
            tmp_path / "e.png",
            max_train_steps=1,
            num_inference_steps=2,
            progress=False,
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "missing.png"], "cannot read image"),
        (["--image", "{bad}"], "cannot read image"),
        (["--source_prompt", " "], "must be non-empty"),
        (["--target_prompt", ""], "must be non-empty"),
        (["--slerp_alpha", "1.5"], "outside [0, 1]"),
        (["--eta", "-1"], "--eta -1.0 must be in [0, 1]"),
        (["--method", "full", "--shifts", "x.safetensors"], "needs --method svdiff"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, scene_file, capsys, flags, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args = {"--image": str(scene_file), "--source_prompt": caption(SCENE), "--target_prompt": TARGET}
    args.update({flags[i]: flags[i + 1].replace("{bad}", str(bad)) for i in range(0, len(flags), 2)})
    out = tmp_path / "out" / "edits.png"
    code = main(["edit", *[x for kv in args.items() for x in kv], "--output", str(out), "--max_train_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.parent.exists()
