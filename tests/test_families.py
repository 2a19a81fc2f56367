"""Training on every model family: tiny random-weight SDXL, SD3 and Flux.1 pipelines saved as diffusers folders
(tests/tiny_families.py), through the same loop, files and commands as SD 1.x."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

import svdiff
from svdiff.cli import main
from svdiff.data.concepts import Concept
from svdiff.data.images import load_image_folder
from svdiff.families import family_of
from svdiff.families.noise import RectifiedFlow
from svdiff.format import WEIGHTS_NAME, read_shift_file
from svdiff.sample import load_pipeline, sample
from svdiff.train import TrainConfig, TrainingStep, resolve
from svdiff.train.methods import prepare
from svdiff.train.step import build_optimizer
from tiny_families import FAMILIES, RESOLUTION, save_family_pipeline
from tiny_models import SUBJECT, cli_args, lora_layers_loaded

PROMPT = "a photo of sks heart"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_pipeline(family, root) for family in FAMILIES}


def draw(pipe, prompt="a photo of a heart"):
    images = sample(pipe, prompt, num_images=2, num_inference_steps=2, guidance_scale=3.0, progress=False)
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_lower_the_loss_on_a_fixed_batch(pipelines, family):
    pipe = load_pipeline(pipelines[family])
    config = resolve(
        TrainConfig(
            instance_data_dir=str(SUBJECT),
            instance_prompt=PROMPT,
            resolution=RESOLUTION,
            learning_rate=3e-2,
            pretrained_model_name_or_path=str(pipelines[family]),
            progress=False,
        )
    )
    training = TrainingStep(config, pipe)
    family_ = training.family
    trainable = prepare(config, family_.components(True), family_.lora_targets)
    optimizer = build_optimizer(config, trainable.groups)
    concept = Concept(PROMPT, SUBJECT, instance_images=load_image_folder(SUBJECT))
    losses = []
    for _ in range(20):
        loss = training.loss(training.batch([concept], step=0))  # the same examples, noise and timesteps each time
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shifts_reproduce_the_base_images_bit_for_bit(pipelines, family):
    pipe = load_pipeline(pipelines[family])
    before = draw(pipe)
    fam = family_of(pipe)
    for model in fam.components(train_text_encoder=True).values():
        assert svdiff.add_shifts(model)  # δ = 0 on every target of the denoiser and the CLIP encoders
    assert np.array_equal(draw(pipe), before)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_and_generate_on_each_family(pipelines, family, tmp_path):
    """`svdiff train` with prior preservation (class images drawn by the family's own pipeline), a resume from a
    checkpoint that ends on the same δ bit for bit, and `svdiff generate` with the file."""
    base = pipelines[family]
    flags = ["--resolution", str(RESOLUTION), "--max_train_steps", "4", "--checkpointing_steps", "2"]
    flags += ["--with_prior_preservation", "--class_prompt", "a photo of a heart", "--num_class_images", "2"]
    flags += ["--class_data_dir", str(tmp_path / "class")]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(cli_args(base, straight, *flags)) == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert main(cli_args(base, resumed, *flags, "--resume_from_checkpoint", "latest")) == 0
    a, b = (read_shift_file(out / WEIGHTS_NAME) for out in (straight, resumed))
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    denoiser = family_of(load_pipeline(base)).denoiser
    assert any(k.startswith(f"{denoiser}.") for k in a.tensors) and any(
        k.startswith("text_encoder.") for k in a.tensors
    )
    card = (straight / "README.md").read_text()  # the model card names this family's pipeline and hub tag
    pipeline = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    tag = {"sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux"}[family]
    assert f"pipe = {pipeline}.from_pretrained(" in card and f"- {tag}\n" in card

    out = tmp_path / "generated.png"
    argv = ["generate", "--base", str(base), "--shifts", str(straight / WEIGHTS_NAME), "--prompt", PROMPT]
    assert main([*argv, "--num_images", "2", "--num_inference_steps", "2", "--output", str(out)]) == 0
    assert out.is_file()


def test_flow_objective_is_the_straight_path_with_its_target():
    flow = RectifiedFlow({"num_train_timesteps": 1000, "shift": 3.0}, weighting_scheme="cosmap")
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    noisy, timesteps, target, weight = flow.corrupt(x0, eps, g)
    sigma = timesteps / 1000  # the flow scheduler's timesteps are σ·1000
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.equal(target, eps - x0)
    assert torch.allclose(weight, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)), atol=1e-5)
    at_noisy, at_target = flow.at(x0, eps, timesteps)  # the same point, given its timesteps
    assert torch.allclose(at_noisy, noisy, atol=1e-6) and torch.equal(at_target, target)
    # the density: logit-normal σ concentrate in the middle, uniform ones spread; the same generator, the same σ
    draws = {}
    for scheme in ("none", "logit_normal", "mode"):
        f = RectifiedFlow({"num_train_timesteps": 1000}, weighting_scheme=scheme)
        gens = [torch.Generator().manual_seed(i) for i in range(400)]
        draws[scheme] = f.corrupt(torch.zeros(400, 1, 1, 1), torch.ones(400, 1, 1, 1), gens)[1] / 1000
        again = (
            f.corrupt(
                torch.zeros(400, 1, 1, 1),
                torch.ones(400, 1, 1, 1),
                [torch.Generator().manual_seed(i) for i in range(400)],
            )[1]
            / 1000
        )
        assert torch.equal(draws[scheme], again)
    middle = {k: ((v > 0.25) & (v < 0.75)).float().mean().item() for k, v in draws.items()}
    assert middle["logit_normal"] > middle["none"] + 0.1


def test_flux_dev_embeds_the_training_guidance(pipelines):
    pipe = load_pipeline(pipelines["flux"])
    assert family_of(pipe).guidance == 3.5
    assert family_of(pipe, TrainConfig(guidance_scale=1.0)).guidance == 1.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unmix_reads_the_image_to_text_part_of_joint_attention(pipelines, family, monkeypatch):
    """The maps the Unmix loss reads on a joint-attention block are the softmax probabilities the block itself
    computes (recorded here from scaled_dot_product_attention), image queries over text keys; the blocks' outputs
    are untouched."""
    from svdiff.train.unmix import Unmix

    pipe = load_pipeline(pipelines[family])
    fam = family_of(pipe)
    unmix = Unmix(fam)
    config = resolve(TrainConfig(instance_data_dir="-", instance_prompt="-", resolution=RESOLUTION))
    training = TrainingStep(config, fam, unmix=unmix)
    concepts = [
        Concept(f"a photo of {phrase}", SUBJECT.parent / name, instance_images=load_image_folder(SUBJECT.parent / name))
        for phrase, name in (("sks heart", "heart_sks"), ("zwx star", "star_zwx"))
    ]
    batch = training.batch(concepts, step=0)
    recorded, real = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        recorded.append((query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        denoising, term = training.loss_terms(batch)
        unmix.remove()
        plain, _ = TrainingStep(config, fam).loss_terms(training.batch(concepts, step=0))
    assert len(unmix.layers) >= 1 and term.item() > 0 and torch.equal(denoising, plain)
    unmix = Unmix(fam)
    with torch.no_grad(), unmix.capturing_maps():
        TrainingStep(config, fam).loss_terms(training.batch(concepts, step=0))
        maps = list(unmix.sink)
    unmix.remove()
    image_tokens, text_tokens = (RESOLUTION // fam.patch) ** 2, maps[0].shape[-1]
    first = next(r for r in recorded if r.shape[-1] == image_tokens + text_tokens)  # the first joint block's
    expected = first[:, :, :image_tokens, image_tokens:] if family == "sd3" else first[:, :, text_tokens:, :text_tokens]
    assert maps[0].shape == expected.shape
    torch.testing.assert_close(maps[0], expected, rtol=1e-4, atol=1e-6)
    positions = fam.text_positions(batch["prompts"][0], "zwx star")
    assert positions and max(positions) < maps[0].shape[-1]


def test_an_unknown_pipeline_names_the_supported_families():
    class SanaPipeline:
        pass

    with pytest.raises(svdiff.SvdiffError, match="SanaPipeline is not a supported pipeline.*FluxPipeline"):
        family_of(SanaPipeline())


def test_unmix_reads_the_cross_attention_of_sdxl(pipelines):
    from svdiff.train.unmix import Unmix

    pipe = load_pipeline(pipelines["sdxl"])
    config = resolve(
        TrainConfig(instance_data_dir="-", instance_prompt="-", resolution=RESOLUTION, train_text_encoder=False)
    )
    concepts = [
        Concept(f"a photo of {phrase}", SUBJECT.parent / name, instance_images=load_image_folder(SUBJECT.parent / name))
        for phrase, name in (("sks heart", "heart_sks"), ("zwx star", "star_zwx"))
    ]
    unmix = Unmix(family_of(pipe))
    training = TrainingStep(config, pipe, unmix=unmix)
    with torch.no_grad():
        denoising, term = training.loss_terms(training.batch(concepts, step=0))
    unmix.remove()
    assert math.isfinite(denoising.item()) and term.item() > 0  # random attention leaks across the halves


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_lora_export_at_full_rank_draws_what_the_shifts_draw(pipelines, family, tmp_path):
    from svdiff.adapters import save_shifts
    from svdiff.export import export_lora

    base = pipelines[family]
    pipe = load_pipeline(base)
    components = family_of(pipe).components(train_text_encoder=True)
    torch.manual_seed(0)
    for model in components.values():
        with torch.no_grad():
            for delta in svdiff.add_shifts(model, "attn").values():  # LoRA carries the attention layers
                delta.normal_(0, 0.3)
    shifts = save_shifts(tmp_path / "s.safetensors", components, base_model=str(base), preset="attn", dtype="fp32")
    with_shifts = draw(pipe).astype(int)
    report = export_lora(shifts, tmp_path / "lora.safetensors", fmt="diffusers", rank=10_000, base=str(base))
    assert report["relative_error"] == 0.0
    stock = load_pipeline(base)
    stock.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")  # diffusers' own loader
    assert np.abs(draw(stock).astype(int) - with_shifts).max() <= 1  # the 8-bit rounding of the same picture
    assert np.abs(draw(load_pipeline(base)).astype(int) - with_shifts).max() > 4  # the shifts do change it


def test_flux_kohya_export_draws_what_the_shifts_draw_through_stock_diffusers(pipelines, tmp_path):
    """The BFL-named file (fused qkv) through diffusers' own kohya converter. That converter splits a single
    block's linear1 at Flux.1's real widths only, so this tiny model shifts the double blocks (the ComfyUI rules
    cover every layer: tests/test_export_tools.py)."""
    from svdiff.adapters import save_shifts
    from svdiff.export import export_lora

    base = pipelines["flux"]
    pipe = load_pipeline(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for delta in svdiff.add_shifts(pipe.transformer, "attn", exclude=["single_transformer_blocks"]).values():
            delta.normal_(0, 1.0)
    shifts = save_shifts(
        tmp_path / "s.safetensors", {"transformer": pipe.transformer}, base_model=str(base), preset="attn"
    )
    with_shifts = draw(pipe).astype(int)
    report = export_lora(shifts, tmp_path / "k.safetensors", fmt="kohya", rank=10_000, base=str(base))
    assert report["relative_error"] == 0.0 and report["tools"]["diffusers"]["drops"] == []
    stock = load_pipeline(base)
    stock.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    assert np.abs(draw(stock).astype(int) - with_shifts).max() <= 1
    assert np.abs(draw(load_pipeline(base)).astype(int) - with_shifts).max() > 4


def test_kohya_export_of_sd3_is_refused_in_one_line(pipelines, tmp_path):
    from svdiff.adapters import save_shifts
    from svdiff.export import export_lora

    pipe = load_pipeline(pipelines["sd3"])
    svdiff.add_shifts(pipe.transformer, "attn")
    path = save_shifts(tmp_path / "s.safetensors", {"transformer": pipe.transformer}, base_model="x", preset="attn")
    with pytest.raises(svdiff.SvdiffError, match="export SD3 shifts with --format diffusers"):
        export_lora(path, tmp_path / "k.safetensors", fmt="kohya", rank=4, base=str(pipelines["sd3"]))
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_style_mixing_splits_a_transformer_at_half_its_blocks(pipelines, family, tmp_path):
    from svdiff.adapters import save_shifts
    from svdiff.sample import apply_shifts
    from svdiff.spectral import shifted_modules

    base = pipelines[family]
    files = []
    for name in ("a", "b"):
        pipe = load_pipeline(base)
        svdiff.add_shifts(pipe.transformer, "attn")
        files.append(
            save_shifts(
                tmp_path / f"{name}.safetensors", {"transformer": pipe.transformer}, base_model="x", preset="attn"
            )
        )
    pipe = load_pipeline(base)
    apply_shifts(pipe, style_mix={"geometry": files[0], "appearance": files[1]}, fused=False)
    blocks = family_of(pipe).geometry_layers()
    order = [n for n in ("transformer_blocks", "single_transformer_blocks") if hasattr(pipe.transformer, n)]
    total = sum(len(getattr(pipe.transformer, n)) for n in order)
    assert len(blocks) == total // 2
    for key, (_, shift) in shifted_modules(pipe.transformer).items():
        geometry = any(re.match(p, f"transformer.{key}") for p in blocks)
        assert [n.split(":")[1] for n in shift.deltas] == (["a"] if geometry else ["b"]), key


def _sample_latents(pipe, fam, start, steps: int):
    """What the pipeline itself draws from `start` (None: fresh noise) at guidance 1, as (batch, c, h, w) latents."""
    out = pipe(
        PROMPT,
        latents=None if start is None else fam.pipeline_latents(start),
        num_inference_steps=steps,
        guidance_scale=1.0,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    return out if out.ndim == 4 else pipe._unpack_latents(out, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)


@pytest.mark.parametrize("family, bound", [("sd3", 0.05), ("flux", 0.15)])  # Flux's latents are 5× smaller
def test_flow_inversion_converges_to_the_image_as_steps_grow(pipelines, family, bound):
    """The reversed Euler ODE undoes the pipeline's own sampling up to its first-order error: sampling the
    inverted noise map returns the image's latents, closer with every doubling of the steps (Flux: inverted
    and sampled at the same embedded guidance)."""
    from svdiff.edit import encode_image, invert

    pipe = load_pipeline(pipelines[family])
    fam = family_of(pipe)
    fam.guidance = 1.0  # Flux-dev: what _sample_latents passes as guidance_scale
    latents = encode_image(pipe, load_image_folder(SUBJECT)[0], RESOLUTION)
    errors = []
    for steps in (10, 40):
        back = _sample_latents(pipe, fam, invert(fam, latents, PROMPT, steps), steps)
        errors.append(float((back - latents).norm() / latents.norm()))
    fresh = float((_sample_latents(pipe, fam, None, 40) - latents).norm() / latents.norm())
    assert errors[1] < 0.4 * errors[0] and errors[1] < bound and fresh > 10 * errors[1], (errors, fresh)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_fine_tunes_inverts_and_draws_on_each_family(pipelines, family, tmp_path):
    from svdiff.edit import edit_image

    result = edit_image(
        SUBJECT / sorted(p.name for p in SUBJECT.glob("*.png"))[0],
        PROMPT,
        ["a photo of sks heart on the left"],
        tmp_path / "edits.png",
        base=str(pipelines[family]),
        max_train_steps=2,
        num_inference_steps=4,
        progress=False,
    )
    assert (tmp_path / "edits.png").is_file() and len(result["pictures"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_concepts_list_trains_with_cut_mix_unmix(pipelines, family, tmp_path):
    listing = tmp_path / "concepts.json"
    subjects = [("heart_sks", "a photo of sks heart"), ("star_zwx", "a photo of zwx star")]
    entries = [{"instance_prompt": p, "instance_data_dir": str(SUBJECT.parent / n)} for n, p in subjects]
    listing.write_text(json.dumps(entries))
    argv = ["train", "--base", str(pipelines[family]), "--concepts_list", str(listing), "--resolution", str(RESOLUTION)]
    argv += ["--output_dir", str(tmp_path / "o"), "--max_train_steps", "3", "--cut_mix_unmix_prob", "1"]
    argv += ["--validation_steps", "0", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    assert main([*argv, "--report_to", "none", "--no-progress"]) == 0
    assert (tmp_path / "o" / WEIGHTS_NAME).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_processes_give_the_shifts_of_one_process_at_twice_the_batch(pipelines, family, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    flags = ["--resolution", str(RESOLUTION), "--max_train_steps", "3", "--save_dtype", "fp32"]
    two = cli_args(pipelines[family], tmp_path / "two", *flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    subprocess.run([*torchrun, "-m", "svdiff", *two], env=env, check=True, capture_output=True, timeout=600)
    one = cli_args(pipelines[family], tmp_path / "one", *flags, "--train_batch_size", "2")
    subprocess.run([sys.executable, "-m", "svdiff", *one], env=env, check=True, capture_output=True, timeout=600)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 2 and summary["processes_agree"]
    a, b = load_file(tmp_path / "two" / WEIGHTS_NAME), load_file(tmp_path / "one" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_baselines_train_on_flux_and_draw_through_apply_trained(pipelines, method, tmp_path):
    from svdiff.sample import apply_trained

    base = pipelines["flux"]
    out = tmp_path / method
    argv = cli_args(base, out, "--resolution", str(RESOLUTION), "--max_train_steps", "2", "--method", method)
    argv += ["--learning_rate", "0.01"]
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    card = (out / "README.md").read_text()
    assert "pipe = FluxPipeline.from_pretrained(" in card
    if method == "full":
        assert "transformer = FluxTransformer2DModel.from_pretrained(" in card and "fine-tuned transformer" in card
    pipe = load_pipeline(base)
    before = draw(pipe)
    apply_trained(pipe, summary["weights"], method)
    assert not np.array_equal(draw(pipe), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_baseline_file_loads_whole_in_its_pipeline(pipelines, family, tmp_path):
    from svdiff.sample import apply_trained

    argv = cli_args(pipelines[family], tmp_path, "--resolution", str(RESOLUTION), "--max_train_steps", "1")
    assert main([*argv, "--method", "lora"]) == 0
    pipe = load_pipeline(pipelines[family])
    apply_trained(pipe, tmp_path / "pytorch_lora_weights.safetensors", "lora")
    held, carried = lora_layers_loaded(pipe, tmp_path / "pytorch_lora_weights.safetensors")
    assert held == carried and any(layer.startswith(("unet.", "transformer.")) for layer in held)


def test_a_mixed_batch_on_flux_draws_each_sample_as_its_shift_set_alone(pipelines, tmp_path):
    from svdiff.adapters import save_shifts
    from svdiff.sample import sample_per_prompt

    base = pipelines["flux"]
    for i in range(2):
        pipe = load_pipeline(base)
        components = family_of(pipe).components(train_text_encoder=True)
        torch.manual_seed(i)
        for model in components.values():
            with torch.no_grad():
                for delta in svdiff.add_shifts(model).values():
                    delta.normal_(0, 0.2)
        save_shifts(tmp_path / f"s{i}.safetensors", components, base_model=str(base), preset="all")
    pipe = load_pipeline(base)
    for i in range(2):
        svdiff.load_shifts(pipe, tmp_path / f"s{i}.safetensors", f"s{i}", progress=False)
    settings = dict(num_images=1, num_inference_steps=2, guidance_scale=3.0, height=RESOLUTION, width=RESOLUTION)
    settings["progress"] = False
    prompts, sets = ["a photo of a heart", "a photo of a star"], [{"s0": 1.0, "s1": 0.0}, {"s0": 0.0, "s1": 1.0}]
    together = sample_per_prompt(pipe, prompts, sets, **settings)
    for prompt, scales, drawn in zip(prompts, sets, together, strict=True):
        svdiff.set_scales(pipe, scales)
        alone = sample_per_prompt(pipe, [prompt], **settings)[0]
        # the same picture, up to the rounding of a batched product against a single one
        assert np.abs(np.asarray(drawn[0]).astype(int) - np.asarray(alone[0]).astype(int)).max() <= 1


def test_bf16_training_loads_the_frozen_flux_in_bf16_and_trains_fp32_shifts(pipelines, tmp_path, monkeypatch):
    import svdiff.train.loop as loop

    loaded = []
    real = loop.load_pipeline
    monkeypatch.setattr(loop, "load_pipeline", lambda *a, **kw: loaded.append(kw["dtype"]) or real(*a, **kw))
    argv = cli_args(pipelines["flux"], tmp_path / "o", "--resolution", str(RESOLUTION), "--max_train_steps", "2")
    assert main([*argv, "--mixed_precision", "bf16", "--save_dtype", "fp32"]) == 0
    assert loaded == [torch.bfloat16]  # never the whole fp32 model in memory first
    tensors = read_shift_file(tmp_path / "o" / WEIGHTS_NAME).tensors
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for t in tensors.values())


def test_a_setting_of_another_objective_is_refused_in_one_line(pipelines):
    cases = [
        ("flux", dict(snr_gamma=5.0), "--snr_gamma weighs DDPM timesteps"),
        ("sdxl", dict(weighting_scheme="logit_normal"), "--weighting_scheme draws flow-matching timesteps"),
        ("sd3", dict(guidance_scale=3.5), "--guidance_scale is the guidance Flux-dev takes"),
    ]
    for family, settings, message in cases:
        with pytest.raises(svdiff.SvdiffError, match=message):
            family_of(load_pipeline(pipelines[family]), TrainConfig(**settings))


def test_sd3_without_t5_computes_its_empty_t5_tokens_as_one(pipelines):
    """Loaded without T5, SD3 conditions on 256 tokens of zeros after the CLIP tokens. svdiff passes one, weighted
    for all: the denoiser's output, the pictures and the Unmix maps over the CLIP tokens are the stock pipeline's."""
    from diffusers import StableDiffusion3Pipeline

    def without_t5():
        pipe = StableDiffusion3Pipeline.from_pretrained(pipelines["sd3"], text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    stock, pipe = without_t5(), without_t5()
    fam = family_of(pipe)
    clip_tokens = pipe.tokenizer_max_length
    short = fam.encode([PROMPT, "a photo of a star"])
    assert short["encoder_hidden_states"].shape[1] == clip_tokens + 1
    full = StableDiffusion3Pipeline.encode_prompt(
        stock, [PROMPT, "a photo of a star"], None, None, device="cpu", do_classifier_free_guidance=False
    )[0]
    assert full.shape[1] == clip_tokens + 256
    noisy = torch.randn(2, 4, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        ours = fam.predict(noisy, t, short)
        theirs = stock.transformer(
            hidden_states=noisy, timestep=t, encoder_hidden_states=full, pooled_projections=short["pooled_projections"]
        ).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    expected = stock(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="np")
    assert np.abs(draw(pipe, PROMPT)[0] / 255.0 - expected.images[0]).max() <= 1 / 255 + 1e-6

    attn = pipe.transformer.transformer_blocks[0].attn
    inputs = {"hidden_states": torch.randn(2, 16, attn.query_dim)}
    text = torch.randn(2, clip_tokens, attn.to_add_out.out_features)
    tail = torch.randn(2, 1, text.shape[-1])
    maps = {}
    for name, tokens in (("ours", 1), ("theirs", 256)):
        inputs["encoder_hidden_states"] = torch.cat([text, tail.expand(-1, tokens, -1)], dim=1)
        with torch.no_grad():
            maps[name] = fam.image_text_attention(attn, inputs)[..., :clip_tokens]
    torch.testing.assert_close(maps["ours"], maps["theirs"], rtol=1e-4, atol=1e-6)
