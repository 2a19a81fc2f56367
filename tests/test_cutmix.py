"""Cut-Mix-Unmix: collages, their prompts and masks, the draw probability, the Unmix loss and a short run."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from svdiff.data.cutmix import (
    border_color,
    collage,
    draw_concepts,
    nearest_background,
    pair_prompt,
    phrase,
    side_masks,
)
from svdiff.errors import SvdiffError
from svdiff.families import family_of
from svdiff.families.base import token_positions
from svdiff.families.sd import unmix_layers
from svdiff.sample import load_pipeline
from svdiff.train import train
from svdiff.train.unmix import CaptureProcessor, Unmix
from tiny_models import quick, save_tiny_pipeline

SUBJECTS = Path(__file__).parents[1] / "examples" / "subjects"


def solid(value: float, size: int = 16) -> torch.Tensor:
    return torch.full((3, size, size), value)


def test_collage_puts_each_whole_image_at_half_scale_on_its_side():
    left = solid(-1.0)
    left[:, 4:12, 4:12] = 1.0  # a white square in the middle of a black image
    right = solid(0.5)
    out = collage(left, right)
    assert out.shape == (3, 16, 16)
    assert torch.all(out[:, :, 8:] == 0.5)
    # Left half: the image at half scale (8×8) centred vertically, black bands above and below.
    assert torch.all(out[:, :4, :8] == -1.0) and torch.all(out[:, 12:, :8] == -1.0)
    assert torch.all(out[:, 6:10, 2:6] == 1.0) and torch.all(out[:, 4:6, :8] == -1.0)
    with pytest.raises(ValueError):
        collage(solid(0, 15), solid(0, 15))
    for bad in (0.4, 1.1):
        with pytest.raises(ValueError):
            collage(left, left, scale=bad)


def test_collage_moves_each_subject_to_the_middle_of_its_half():
    low = solid(-1.0)
    low[:, 11:15, 1:5] = 1.0  # a 4 px subject near the bottom-left corner
    out = collage(low, solid(0.5), scale=1.0)
    assert torch.all(out[:, :, 8:] == 0.5)
    expected = solid(-1.0)[:, :, :8]
    expected[:, 6:10, 2:6] = 1.0  # its centre (13, 3) moved to the half's (8, 4); what it uncovers is border
    assert torch.equal(out[:, :, :8], expected)
    even = solid(-1.0)
    even[:, 10:14, 2:6] = 1.0  # at half scale a 2 px square centred at (6, 2) of the 8 px copy → (8, 4)
    half = collage(even, solid(0.5), scale=0.5)[:, :, :8]
    assert torch.all(half[:, 7:9, 3:5] == 1.0) and int((half == 1.0).sum()) == 3 * 4
    wide = solid(-1.0)
    wide[:, 4:12, 2:14] = 1.0  # wider than a half: its middle is kept, its ends cut
    assert torch.equal(collage(wide, solid(0.5), scale=1.0)[:, :, :8], wide[:, :, 4:12])
    # Nothing differs from the border color: the middle strip; a gradient differs alike on both sides: the same.
    assert torch.equal(collage(solid(0.25), solid(0.5), scale=1.0)[:, :, :8], solid(0.25)[:, :, 4:12])
    plain = torch.linspace(-1, 1, 16).expand(3, 16, 16)
    assert torch.equal(collage(plain, solid(0.5), scale=1.0)[:, :, :8], plain[:, :, 4:12])


def test_the_right_image_is_the_one_whose_border_is_nearest():
    from PIL import Image

    def photo(color):
        im = Image.new("RGB", (16, 16), color)
        im.paste((255, 0, 0), (4, 4, 12, 12))  # a subject in the middle does not count
        return im

    candidates = [photo((0, 0, 0)), photo((200, 200, 200)), photo((120, 120, 120))]
    assert nearest_background(photo((190, 200, 210)), candidates) == 1
    assert nearest_background(photo((100, 120, 130)), candidates) == 2
    assert torch.allclose(border_color(photo((0, 0, 255))), torch.tensor([-1.0, -1.0, 1.0]))


def test_collage_batches_pair_photos_on_the_same_background():

    from svdiff.data.concepts import Concept
    from svdiff.data.images import load_image_folder
    from svdiff.train import TrainConfig
    from svdiff.train.step import draw_batch

    concepts = [
        Concept(f"a photo of {n}", SUBJECTS / n, instance_images=load_image_folder(SUBJECTS / n))
        for n in ("heart_sks", "star_zwx")
    ]
    for match in (True, False):
        config = TrainConfig(resolution=64, center_crop=True, cut_mix_scale=0.5, cut_mix_match_background=match)
        seams = 0
        for step in range(12):
            pixels = draw_batch(config, concepts, step)["pixels"][0]
            seams += not torch.equal(border_color(pixels[:, :, :32]), border_color(pixels[:, :, 32:]))
        assert (seams == 0) if match else (seams > 4)  # each subject has one photo per background


def test_prompts_name_each_subject_on_its_side():
    assert phrase("a photo of sks heart") == "sks heart" and phrase("a photo of a heart") == "heart"
    prompts = {pair_prompt("a photo of sks heart", "a photo of zwx star", 0, step) for step in range(40)}
    assert prompts == {
        "a photo of a sks heart on the left and a zwx star on the right",
        "a photo of a sks heart and a zwx star",
    }
    # The instance and class collages of one step use the same template.
    for step in range(20):
        a = pair_prompt("a photo of sks heart", "a photo of zwx star", 3, step)
        b = pair_prompt("a photo of a heart", "a photo of a star", 3, step)
        assert ("on the left" in a) == ("on the left" in b)


def test_side_masks():
    masks = side_masks(4, 6)
    assert masks.shape == (2, 4, 6)
    assert masks[0, :, :3].all() and not masks[0, :, 3:].any() and masks[1, :, 3:].all() and not masks[1, :, :3].any()
    odd = side_masks(2, 5)
    assert odd[0].sum() == odd[1].sum() == 4 and not odd[:, :, 2].any()


def test_the_collage_probability_is_honoured():
    draws = [draw_concepts(3, 0, step, 0.6) for step in range(5000)]
    pairs = [d for d in draws if len(d) == 2]
    assert abs(len(pairs) / len(draws) - 0.6) < 0.03
    assert all(a != b for a, b in pairs)
    assert {p for p in pairs} == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert all(len(draw_concepts(1, 0, s, 0.6)) == 1 for s in range(100))
    assert all(len(draw_concepts(3, 0, s, 0.0)) == 1 for s in range(100))
    assert draws == [draw_concepts(3, 0, step, 0.6) for step in range(5000)]  # a function of (seed, step)


def fake_unmix(maps) -> Unmix:
    u = Unmix.__new__(Unmix)
    u.sink, u.layers = list(maps), []
    return u


def test_unmix_loss_is_zero_inside_its_region_and_positive_when_attention_leaks():
    heads, h, w, tokens = 2, 4, 4, 6
    left_pixels = side_masks(h, w)[0].flatten().bool()
    probs = torch.full((1, heads, h * w, tokens), 0.1)
    probs[..., 1] = 0.0
    probs[..., 2] = 0.0
    probs[:, :, left_pixels, 1] = 0.5  # token 1 (left subject) attends only on the left
    probs[:, :, ~left_pixels, 2] = 0.5  # token 2 (right subject) only on the right
    assert fake_unmix([probs]).loss([(0, [1], [2])], (h, w)) == 0
    leaking = probs.clone()
    leaking[:, :, ~left_pixels, 1] = 0.2
    loss = fake_unmix([leaking]).loss([(0, [1], [2])], (h, w))
    # token 1: 0.5 on the left, 0.2 on the right, mean 0.35; half the pixels at 0.2 / 0.35, squared, averaged
    assert loss == pytest.approx((0.2 / 0.35) ** 2 / 2)
    # The loss reads where a token looks, not how strongly: attending less everywhere does not lower it.
    fainter = leaking.clone()
    fainter[..., 1] *= 0.01
    assert fake_unmix([fainter]).loss([(0, [1], [2])], (h, w)) == pytest.approx(loss)
    # Maps at a coarser layer (2×2 of a 4×4 latent) are compared with masks at their own size.
    coarse = torch.zeros((1, heads, 4, tokens))
    coarse[:, :, [1, 3], 1] = 1.0  # right column: twice the mean there
    assert fake_unmix([coarse]).loss([(0, [1], [2])], (h, w)) == pytest.approx(2.0**2 / 2)
    assert fake_unmix([probs]).loss([None], (h, w)) == 0  # no collage in the batch


def test_capture_keeps_the_attention_output_and_only_leaves_the_fast_path_where_asked():
    pipe = load_pipeline(None)
    unet = pipe.unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        expected = unet(x, 500, context).sample
    unmix = Unmix(family_of(pipe))
    with torch.no_grad():
        unet(x, 500, context)
        assert unmix.sink == []  # sampling keeps no maps
        with unmix.capturing_maps():
            got = unet(x, 500, context).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(unmix.sink) == len(unmix.layers) == len(unmix_layers(unet))
    captured = {n for n, p in unet.attn_processors.items() if isinstance(p, CaptureProcessor)}
    assert captured == {n + ".processor" for n in unmix.layers}
    assert len(captured) < len(unet.attn_processors)
    # The embedded base's latents are 16×16: watched layers are the 8×8 and 4×4 ones.
    assert sorted({m.shape[2] for m in unmix.sink}) == [16, 64]
    unmix.remove()
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())


def two_subjects(tmp_path, *names) -> Path:
    entries = []
    for name in names:
        card = json.loads((SUBJECTS / name / "subject.json").read_text())
        entries.append({"instance_prompt": card["instance_prompt"], "instance_data_dir": str(SUBJECTS / name)})
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(entries))
    return path


def test_a_two_subject_run_trains_with_cut_mix_and_unmix(tmp_path):
    concepts = two_subjects(tmp_path, "heart_sks", "heart_xyz")

    def run(name, weight):
        args = quick(
            None,
            tmp_path / name,
            concepts_list=str(concepts),
            cut_mix_unmix_prob=1.0,
            unmix_weight=weight,
            max_train_steps=2,
        )
        return train(args)

    with_unmix, without = run("unmix", 1e3), run("cut-mix", 0.0)
    first = [json.loads((tmp_path / n / "loss.json").read_text())[0][1] for n in ("unmix", "cut-mix")]
    assert first[0] > first[1]  # the same collage, noise and timestep: the difference is the Unmix term
    assert Path(with_unmix["weights"]).is_file() and Path(without["weights"]).is_file()


def test_names_lost_to_truncation_are_one_clear_error(tmp_path):
    base = save_tiny_pipeline(tmp_path / "tiny")  # 8-token prompts: the second subject's name is cut off
    with pytest.raises(SvdiffError, match="Unmix: 'zwx star' is not in the tokenized prompt"):
        train(quick(base, tmp_path / "out", concepts_list=str(two_subjects(tmp_path, "heart_sks", "star_zwx"))))


def test_token_positions():
    tokenizer = load_pipeline(None).tokenizer
    prompt = "a photo of a sks heart on the left and a zwx star on the right"
    assert len(token_positions(tokenizer, prompt, "sks")) == 1
    assert token_positions(tokenizer, prompt, "sks heart") == [5, 6]  # after <start> a photo of a
    assert token_positions(tokenizer, prompt, "sks heart") < token_positions(tokenizer, prompt, "zwx star")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cut_mix_unmix_works_for_the_baselines(tmp_path, method):
    concepts = two_subjects(tmp_path, "heart_sks", "star_zwx")
    args = quick(
        None, tmp_path / method, concepts_list=str(concepts), cut_mix_unmix_prob=1.0, method=method, max_train_steps=2
    )
    assert Path(train(args)["weights"]).is_file()
    losses = [v for _, v in json.loads((tmp_path / method / "loss.json").read_text())]
    assert len(losses) == 2 and all(v == v for v in losses)
