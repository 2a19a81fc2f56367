"""Mixed-subject batches: one forward whose samples each carry their own shift sets and scales gives what running
each sample alone with only its sets gives."""

import pytest
import torch
from torch import nn

import svdiff
from svdiff.adapters import mixed_batch, set_scales
from svdiff.spectral.batches import per_sample
from tiny_models import tiny_pipeline

ASSIGNMENT = [{"A": 1.0}, {"B": 0.7}, {}, {"A": 0.5, "B": -0.5}]


def two_sets(components):
    g = torch.Generator().manual_seed(2)
    for model in components.values():
        for name in ("A", "B"):
            for p in svdiff.add_shifts(model, name=name, cache=False, progress=False).values():
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    two_sets({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    return pipe


def _outputs(pipe, ids, x):
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(x, 10, text).sample


def _alone(pipe, entry, ids, x):
    set_scales(pipe, {"A": entry.get("A", 0.0), "B": entry.get("B", 0.0)})
    return _outputs(pipe, ids, x)


def test_each_sample_of_a_mixed_batch_matches_running_it_alone(pipe):
    g = torch.Generator().manual_seed(1)
    ids, x = torch.randint(0, 50, (4, 8), generator=g), torch.randn(4, 4, 8, 8, generator=g)
    with mixed_batch(pipe, ASSIGNMENT):
        text, noise = _outputs(pipe, ids, x)
    for i, entry in enumerate(ASSIGNMENT):
        want_text, want_noise = _alone(pipe, entry, ids[i : i + 1], x[i : i + 1])
        torch.testing.assert_close(text[i : i + 1], want_text, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(noise[i : i + 1], want_noise, rtol=1e-4, atol=1e-5)
    set_scales(pipe, {"A": 1.0, "B": 1.0})


def test_a_guided_batch_repeats_the_assignment(pipe):
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 8, 16, generator=g)
    with torch.no_grad(), per_sample([pipe.unet], ASSIGNMENT[:2]):
        mixed = pipe.unet(x, 10, text).sample  # [uncond 0, uncond 1, cond 0, cond 1]
    for i in range(4):
        entry = ASSIGNMENT[i % 2]
        set_scales(pipe, {"A": entry.get("A", 0.0), "B": entry.get("B", 0.0)})
        with torch.no_grad():
            want = pipe.unet(x[i : i + 1], 10, text[i : i + 1]).sample
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-4, atol=1e-5)
    set_scales(pipe, {"A": 1.0, "B": 1.0})


def test_layers_that_cannot_be_factored_run_each_samples_weight():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2), nn.GroupNorm(2, 4)
    )
    for name in ("A", "B"):
        for p in svdiff.add_shifts(model, name=name, cache=False, progress=False).values():
            p.data.normal_(std=0.2)
    x = torch.randn(3, 4, 5, 5)
    assignment = [{"A": 1.0}, {"B": 1.0}, {"A": 1.0}]
    with torch.no_grad(), per_sample([model], assignment):
        mixed = model(x)
    for i, entry in enumerate(assignment):
        svdiff.spectral.set_scales(model, {"A": entry.get("A", 0.0), "B": entry.get("B", 0.0)})
        with torch.no_grad():
            torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1]), rtol=1e-4, atol=1e-5)


def test_mixed_batches_refuse_what_they_cannot_do(pipe):
    with pytest.raises(svdiff.SvdiffError, match="no shift set named 'C'"):
        with mixed_batch(pipe, [{"C": 1.0}]):
            pass
    x, text = torch.randn(3, 4, 8, 8), torch.randn(3, 8, 16)
    with pytest.raises(svdiff.SvdiffError, match="a batch of 3 cannot hold a mixed batch of 2"):
        with torch.no_grad(), mixed_batch(pipe, ASSIGNMENT[:2]):
            pipe.unet(x, 10, text)
    svdiff.spectral.fuse(pipe.unet)
    with pytest.raises(svdiff.SvdiffError, match="unfuse it"):
        with mixed_batch(pipe, ASSIGNMENT):
            pass
    svdiff.spectral.unfuse(pipe.unet)
    assert all(s.per_sample is None for _, s in svdiff.spectral.shifted_modules(pipe.unet).values())


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    from svdiff.adapters import save_shifts
    from svdiff.models import load_components
    from svdiff.world.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("mixed")
    tiny_pipeline(build_tokenizer(root / "tok", max_length=8), vae_levels=2).save_pretrained(root / "base")
    files = []
    for seed in (1, 2):
        components = load_components(root / "base")
        g = torch.Generator().manual_seed(seed)
        for model in components.values():
            for p in svdiff.add_shifts(model, cache=False, progress=False).values():
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
        files.append(save_shifts(root / f"s{seed}", components, base_model=str(root / "base"), preset="all"))
    return root / "base", files


def _generate(base, out, *extra):
    from PIL import Image

    from svdiff.cli import main

    args = ["generate", "--base", str(base), "--num_images", "2", "--num_inference_steps", "2"]
    assert main([*args, "--guidance_scale", "2", "--output", str(out), *extra]) == 0
    return [
        [torch.tensor(list(Image.open(out.with_name(f"{out.stem}-{p}-{i}.png")).tobytes())) for i in range(2)]
        for p in range(extra.count("--prompt"))
    ]


def test_generate_per_prompt_draws_each_prompt_with_its_own_subject_in_one_batch(two_files, tmp_path):
    base, (a, b) = two_files
    prompts = ["a photo of a red circle", "a photo of a blue square"]
    mixed = _generate(
        base, tmp_path / "m" / "g.png", "--per-prompt", "--prompt", prompts[0], "--prompt", prompts[1],
        "--shifts", str(a), "--shifts", f"{b}:0.8",
    )  # fmt: skip
    alone = [
        _generate(base, tmp_path / "a" / "g.png", "--prompt", prompts[0], "--shifts", str(a))[0],
        _generate(base, tmp_path / "b" / "g.png", "--prompt", prompts[1], "--shifts", f"{b}:0.8")[0],
    ]
    swapped = _generate(base, tmp_path / "s" / "g.png", "--prompt", prompts[1], "--shifts", str(a))[0]
    for p in range(2):
        for i in range(2):
            assert (mixed[p][i] - alone[p][i]).abs().max() <= 2  # within 2/255: fused vs factored rounding
    assert (mixed[1][0] - swapped[0]).abs().max() > 2  # prompt 1 really drew with file b, not a


def test_generate_per_prompt_needs_one_file_per_prompt(two_files, tmp_path, capsys):
    from svdiff.cli import main

    base, (a, _) = two_files
    args = ["generate", "--base", str(base), "--per-prompt", "--prompt", "x", "--prompt", "y", "--shifts", str(a)]
    assert main([*args, "--output", str(tmp_path / "g.png")]) == 2
    assert "one --shifts FILE[:SCALE] per --prompt" in capsys.readouterr().err
