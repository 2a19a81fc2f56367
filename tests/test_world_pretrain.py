"""The pretraining script: timestep sampling, and a few-step run end to end that stock diffusers loads."""

import json

import pytest
import torch
from safetensors import safe_open

from svdiff.world.denoisers import sample_timesteps
from svdiff.world.pretrain import encode_scenes, main, make_vae
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


@pytest.mark.slow
def test_a_flow_base_from_a_unet_base_loads_in_stock_diffusers_and_draws_as_svdiff_does(tmp_path):
    """`--family sd3`: an SD3 pipeline whose autoencoder is the UNet base's, whose first text encoder starts from
    the UNet base's, and whose T5 slot is silent; stock `from_pretrained` loads it whole, and svdiff, which computes
    the empty T5 tokens as one, draws what the stock call draws."""
    import numpy as np
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from svdiff.families.sd3 import AbsentT5Attention
    from svdiff.sample import load_pipeline, sample
    from svdiff.world import default_base

    out = tmp_path / "flow"
    main(
        ["--family", "sd3", "--out", str(out), "--work_dir", str(tmp_path / "work"), "--init_from", str(default_base())]
        + ["--num_scenes", "8", "--steps", "2", "--batch_size", "2", "--checkpoint_every", "1", "--preview_every", "2"]
    )
    assert (tmp_path / "work" / "preview_000002.png").exists()
    assert not any("_name_or_path" in json.loads(c.read_text()) for c in out.glob("*/config.json"))
    stock = DiffusionPipeline.from_pretrained(out)
    assert isinstance(stock, StableDiffusion3Pipeline)
    assert not any(p.any() for p in stock.text_encoder_3.parameters())
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["family"] == "sd3" and record["phase_minutes"]["autoencoder"] == 0.0
    assert stock.vae.config.shift_factor == record["shift_factor"] != 0
    shipped = DiffusionPipeline.from_pretrained(default_base())
    for a, b in zip(shipped.vae.parameters(), stock.vae.parameters(), strict=True):
        assert torch.equal(a, b)
    first = stock.text_encoder.text_model.state_dict()
    close = [torch.allclose(v, first[k], atol=0.02) for k, v in shipped.text_encoder.state_dict().items()]
    assert all(close)  # two steps from the UNet base's encoder
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        "a photo of a red heart",
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    pipe = load_pipeline(out)
    (image,) = sample(
        pipe, "a photo of a red heart", num_images=1, num_inference_steps=4, guidance_scale=4.0, progress=False
    )
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, AbsentT5Attention)
    assert np.abs(np.asarray(image) / 255.0 - expected).max() <= 1 / 255 + 1e-6
