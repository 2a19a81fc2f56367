"""The pretraining script: timestep sampling, and a few-step run end to end that stock diffusers loads."""

import json

import pytest
import torch
from safetensors import safe_open

from svdiff.world.pretrain import encode_scenes, main, make_vae, sample_timesteps
from svdiff.world.render import Scene, WorldObject, world_words
from svdiff.world.tokenizer import IDENTIFIERS


def test_timestep_shift():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(sample_timesteps(64, 1000, 1.0, g()), torch.randint(0, 1000, (64,), generator=g()))
    shifted = sample_timesteps(20000, 1000, 3.0, g())
    assert shifted.min() >= 0 and shifted.max() <= 999
    assert abs((shifted >= 500).float().mean().item() - 0.75) < 0.02  # u > 1/4 lands in the noisier half


def test_object_cells_of_the_latent_grid():
    scene = Scene((WorldObject("square", "red", size="small", position="left"),), background="dark")
    _, masks = encode_scenes(make_vae(), [scene], 1, "cpu")
    assert masks.shape == (1, 1, 16, 16) and masks.dtype == torch.bool
    rows, cols = masks[0, 0].nonzero(as_tuple=True)
    # A 16-pixel square centred at (17, 32) of 64: about 4 cells wide, on the left, halfway down.
    assert 4 <= len(rows) <= 36 and cols.max() < 8 and rows.min() >= 4 and rows.max() <= 11


@pytest.mark.slow
def test_a_few_steps_make_a_pipeline_and_a_second_call_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    flags = [
        "--out",
        str(tmp_path / "base"),
        "--work_dir",
        str(tmp_path / "work"),
        "--vae_steps",
        "2",
        "--vae_batch_size",
        "2",
        "--num_scenes",
        "8",
        "--steps",
        "2",
        "--batch_size",
        "2",
        "--checkpoint_every",
        "1",
        "--preview_every",
        "1000",
        "--timestep_shift",
        "3",
        "--object_weight",
        "5",
    ]
    main(flags)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["steps"] == 2 and record["timestep_shift"] == 3.0 and record["object_weight"] == 5.0
    assert record["minutes"] is not None and set(record["phase_minutes"]) == {"autoencoder", "encoding", "denoiser"}
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = pipe.tokenizer.convert_tokens_to_ids
    identifiers = table[[ids(w + "</w>") for w in IDENTIFIERS]].norm(dim=1)
    words = table[[ids(w + "</w>") for w in world_words()]].norm(dim=1)
    # identifiers, in no caption, are scaled to a trained word's size (stored in fp16)
    assert torch.allclose(identifiers, torch.tensor(record["identifier_norm"]), rtol=2e-3)
    assert record["identifier_norm"] == pytest.approx(float(words.median()), rel=2e-3)
    # weights stored in fp16, loaded back as float32 modules (configs say float32)
    for folder in ("unet", "vae", "text_encoder"):
        (weights,) = (tmp_path / "base" / folder).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    ckpt = tmp_path / "work" / "denoiser.safetensors"
    before = ckpt.read_bytes()
    with safe_open(str(ckpt), "pt") as f:
        worked = float(f.metadata()["seconds"])  # the work that reached the checkpoint, kept across resumes
    assert worked > 0
    main(flags)  # everything is checkpointed: nothing is trained again
    assert ckpt.read_bytes() == before
    again = json.loads((tmp_path / "work" / "run.json").read_text())
    assert again["minutes"] is not None and again["phase_minutes"]["denoiser"] >= round(worked / 60, 1)


@pytest.mark.slow
def test_init_from_trains_an_existing_base_further(tmp_path):
    from diffusers import StableDiffusionPipeline

    from svdiff.world import default_base

    out = tmp_path / "base"
    main(
        ["--out", str(out), "--work_dir", str(tmp_path / "work"), "--init_from", str(default_base())]
        + ["--num_scenes", "8", "--steps", "2", "--batch_size", "2", "--checkpoint_every", "1"]
        + ["--preview_every", "1000", "--right_first", "0.5"]
    )
    shipped, further = (StableDiffusionPipeline.from_pretrained(p) for p in (default_base(), out))
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["init_from"] == str(default_base()) and record["right_first"] == 0.5
    assert record["phase_minutes"]["autoencoder"] == 0.0  # the autoencoder is kept, not trained
    for a, b in zip(shipped.vae.parameters(), further.vae.parameters(), strict=True):
        assert torch.equal(a, b)
    moved = [not torch.equal(a, b) for a, b in zip(shipped.unet.parameters(), further.unet.parameters(), strict=True)]
    assert any(moved)
