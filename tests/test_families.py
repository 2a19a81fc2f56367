"""Training on every model family: tiny random-weight SDXL, SD3 and Flux.1 pipelines saved as diffusers folders
(tests/tiny_families.py), through the same loop, files and commands as SD 1.x."""

import math
import shutil

import numpy as np
import pytest
import torch

import svdiff
from svdiff.cli import main
from svdiff.data.concepts import Concept
from svdiff.data.images import load_image_folder
from svdiff.families import Flux, family_of
from svdiff.families.noise import RectifiedFlow
from svdiff.format import WEIGHTS_NAME, read_shift_file
from svdiff.sample import load_pipeline, sample
from svdiff.train import TrainConfig, TrainingStep, resolve
from svdiff.train.methods import prepare
from svdiff.train.step import build_optimizer
from tiny_families import FAMILIES, RESOLUTION, save_family_pipeline
from tiny_models import SUBJECT, cli_args

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


def test_unmix_on_joint_attention_is_refused_in_one_line(pipelines, tmp_path, capsys):
    import json

    subjects = SUBJECT.parent
    listing = tmp_path / "concepts.json"
    listing.write_text(
        json.dumps(
            [
                {"instance_prompt": PROMPT, "instance_data_dir": str(subjects / "heart_sks")},
                {"instance_prompt": "a photo of zwx star", "instance_data_dir": str(subjects / "star_zwx")},
            ]
        )
    )
    argv = ["train", "--base", str(pipelines["sd3"]), "--concepts_list", str(listing), "--output_dir"]
    assert main([*argv, str(tmp_path / "o"), "--resolution", str(RESOLUTION), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the Unmix loss reads cross-attention") and "--unmix_weight 0" in err[-1]


def test_an_unknown_pipeline_names_the_supported_families():
    class SanaPipeline:
        pass

    with pytest.raises(svdiff.SvdiffError, match="SanaPipeline is not a supported pipeline.*FluxPipeline"):
        family_of(SanaPipeline())
    assert Flux.pipelines == ("FluxPipeline",)


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
    unmix = Unmix(pipe.unet)
    training = TrainingStep(config, pipe, unmix=unmix)
    with torch.no_grad():
        denoising, term = training.loss_terms(training.batch(concepts, step=0))
    unmix.remove()
    assert math.isfinite(denoising.item()) and term.item() > 0  # random attention leaks across the halves
