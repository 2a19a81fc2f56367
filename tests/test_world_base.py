"""The shipped base pipeline: stock diffusers loads it offline, it samples reproducibly, and it is the default."""

import random

import numpy as np
import pytest
import torch

from svdiff.errors import SvdiffError
from svdiff.world import BASE_DIR, BASE_DIRS, default_base
from svdiff.world.render import caption, random_scene, world_words
from svdiff.world.tokenizer import IDENTIFIERS

needs_base = pytest.mark.skipif(
    not (BASE_DIR / "model_index.json").is_file(), reason="the base pipeline is not shipped in this checkout"
)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(default_base())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_missing_base_is_a_one_line_error(monkeypatch, tmp_path):
    import svdiff.world as world

    monkeypatch.setitem(world.BASE_DIRS, "unet", tmp_path / "nowhere")
    with pytest.raises(SvdiffError, match="embedded unet base is not in this installation") as e:
        world.default_base()
    assert "\n" not in str(e.value)
    with pytest.raises(SvdiffError, match="unknown embedded base 'dit'; choose from unet, flow"):
        world.default_base("dit")


def test_embedded_bases_by_name(tmp_path, monkeypatch):
    import svdiff.world as world
    from svdiff.models import default_guidance, embedded_name, is_embedded_base, resolve_base
    from svdiff.train.config import default_learning_rate

    assert resolve_base("embedded:unet") == resolve_base(None) == world.BASE_DIRS["unet"]
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setitem(world.BASE_DIRS, "flow", tmp_path)
    assert resolve_base("embedded:flow") == tmp_path
    assert is_embedded_base("embedded:flow") and is_embedded_base(str(tmp_path)) and not is_embedded_base("sd15")
    assert default_guidance("embedded:flow") == world.GUIDANCE_SCALE
    # each embedded base has its own rates, by name or by folder; real bases the paper's and DreamBooth's
    assert embedded_name(str(tmp_path)) == "flow" and embedded_name(None) == "unet" and embedded_name("sd15") is None
    assert default_learning_rate("full", str(tmp_path)) == default_learning_rate("full", "embedded:flow") == 1e-4
    assert default_learning_rate("full", None) == 5e-5 and default_learning_rate("full", "sd15") == 5e-6


@needs_base
def test_stock_diffusers_loads_a_stable_diffusion_folder(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert 1e6 < sum(p.numel() for p in pipe.unet.parameters()) < 10e6
    size = sum(f.stat().st_size for f in default_base().rglob("*") if f.is_file())
    assert size <= 15 * 2**20


@needs_base
def test_fixed_seed_gives_identical_images(pipe):
    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        out = pipe(
            ["a photo of a red star", "a photo of a blue ring on the left"],
            num_inference_steps=4,
            guidance_scale=4.0,
            generator=gen,
            height=64,
            width=64,
            output_type="np",
        ).images
        return out

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (2, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@needs_base
def test_shipped_tokenizer_knows_every_caption_word(pipe):
    tok = pipe.tokenizer
    for word in world_words() + list(IDENTIFIERS):
        assert tok.convert_ids_to_tokens(tok(word).input_ids[1:-1]) == [word + "</w>"]
    rng = random.Random(0)
    for _ in range(50):
        text = caption(random_scene(rng))
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_text_separation_reads_the_encoder(pipe):
    from svdiff.world.quality import text_separation

    sep = text_separation(pipe)
    assert 0.1 < sep["colors"] < 2, sep  # a color word moves the encoding a lot
    # identifiers, in no pretraining caption, move it less even at a word's size (0.113 against 0.38 on the
    # shipped base; at their initial size, 0.046)
    assert 0.08 < sep["identifiers"] < sep["colors"], sep


@needs_base
def test_the_embedded_base_is_the_default():
    from svdiff.models import load_components, resolve_base

    assert resolve_base(None) == default_base()
    unet = load_components(None)["unet"]
    from diffusers import UNet2DConditionModel

    shipped = UNet2DConditionModel.from_pretrained(default_base(), subfolder="unet")
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), shipped.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


needs_flow_base = pytest.mark.skipif(
    not (BASE_DIRS["flow"] / "model_index.json").is_file(), reason="the flow base is not shipped in this checkout"
)


@needs_flow_base
def test_the_flow_base_is_a_stock_sd3_folder_in_fp16_under_15_mb():
    import json

    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors import safe_open

    folder = default_base("flow")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor is not None  # SD3's latents are centred as well as scaled
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 2**20
    for weights in folder.glob("*/*.safetensors"):
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, weights
    for config in folder.glob("*/*config.json"):
        assert "_name_or_path" not in json.loads(config.read_text()), config
    run = json.loads((folder / "pretrain_run.json").read_text())
    assert run["minutes"] > 0 and all(p["command"].startswith("python -m svdiff.world.pretrain") for p in run["phases"])


@needs_flow_base
def test_the_flow_base_draws_reproducibly_by_name():
    from svdiff.sample import load_pipeline, sample

    pipe = load_pipeline("embedded:flow", device="cpu")
    a, b = (
        sample(pipe, "a photo of a red star", num_images=1, num_inference_steps=3, progress=False) for _ in range(2)
    )
    assert a[0].size == (64, 64) and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
