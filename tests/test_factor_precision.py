"""Factors and a frozen base held in fp8 (one byte a value, a scale per row): δ = 0 is still the base bit for bit,
the update and δ's gradients agree with bf16, and casting the model keeps them fp8."""

import re

import pytest
import torch
from torch import nn

import svdiff
from svdiff.families import family_of
from svdiff.sample import load_pipeline
from svdiff.spectral import shifted_modules
from svdiff.spectral.fp8 import HeldLinear, hold_in_fp8
from tiny_families import save_family_pipeline


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()


def shifted(factor_dtype):
    m = model()
    deltas = svdiff.add_shifts(m, factor_dtype=factor_dtype, progress=False)
    return m, deltas


def test_fp8_factors_take_a_byte_a_value_and_keep_zero_shifts_exact():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model()(x)
        m, _ = shifted(torch.float8_e4m3fn)
        assert torch.equal(m(x), base)  # U·diag(0)·Vᵀ = 0 whatever the factors' precision
    shift = shifted_modules(m)["0.weight"][1]
    assert shift.U_fp8.dtype == torch.float8_e4m3fn and shift.U_fp8.element_size() == 1
    assert shift.U.shape == (96, 64) and shift.Vh.shape == (64, 64) and shift.U.dtype == torch.bfloat16
    m.half().float()  # a cast there and back keeps the factors in fp8
    assert shifted_modules(m)["0.weight"][1].U_fp8.dtype == torch.float8_e4m3fn


def test_fp8_factors_give_the_update_and_gradients_of_bf16_factors():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    grads, outputs = {}, {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        m, deltas = shifted(dtype)
        with torch.no_grad():
            for i, d in enumerate(deltas.values()):
                d.copy_(torch.linspace(-0.2, 0.3, d.numel()) * (i + 1))
        out = m(x)
        out.square().mean().backward()
        outputs[dtype] = out.detach()
        grads[dtype] = torch.cat([d.grad for d in deltas.values()])
    a, b = grads[torch.bfloat16], grads[torch.float8_e4m3fn]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (outputs[torch.bfloat16] - outputs[torch.float8_e4m3fn]).abs().max() < 0.02


def test_fp8_factors_on_a_flux_transformer_keep_its_images(tmp_path):
    folder = save_family_pipeline("flux", tmp_path)
    pipe = load_pipeline(folder)
    settings = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="np")
    before = pipe("a photo of a heart", generator=torch.Generator().manual_seed(0), **settings).images
    svdiff.add_shifts(family_of(pipe).model, factor_dtype=torch.float8_e4m3fn, progress=False)
    after = pipe("a photo of a heart", generator=torch.Generator().manual_seed(0), **settings).images
    assert (before == after).all()


def test_train_with_fp8_factors(tmp_path):
    from svdiff.cli import main
    from svdiff.format import WEIGHTS_NAME, read_shift_file
    from tiny_models import cli_args

    folder = save_family_pipeline("sd3", tmp_path)
    argv = cli_args(folder, tmp_path / "out", "--resolution", "16", "--max_train_steps", "2")
    assert main([*argv, "--factor_dtype", "float8_e4m3fn"]) == 0
    tensors = read_shift_file(tmp_path / "out" / WEIGHTS_NAME).tensors
    assert tensors and any(t.abs().max() > 0 for t in tensors.values())


def test_a_base_held_in_fp8_is_half_of_bf16_and_zero_shifts_reproduce_it():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    held = model().to(torch.bfloat16).requires_grad_(False)
    assert hold_in_fp8(held) == 2
    with torch.no_grad():
        base = held(x)
    assert isinstance(held[0], HeldLinear) and held[0].weight_fp8.element_size() == 1
    assert held[0].weight.dtype == torch.bfloat16 and held[0].weight.shape == (96, 64)
    m = model().to(torch.bfloat16).requires_grad_(False)
    deltas = svdiff.add_shifts(m, factor_dtype=torch.bfloat16, progress=False)  # factors of the full weights
    hold_in_fp8(m)
    assert torch.equal(m(x).detach(), base)  # δ = 0 trains (a plan of this call), and is the held base exactly
    with torch.no_grad():
        assert torch.equal(m(x), base)
    m.float().to(torch.bfloat16)  # a cast keeps the weights in fp8
    assert m[0].weight_fp8.dtype == torch.float8_e4m3fn and m[0].weight_scale.dtype == torch.float32
    assert all(d.dtype == torch.float32 for d in deltas.values())


def test_gradients_on_a_base_held_in_fp8_agree_with_bf16():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16, requires_grad=True)
    grads, outputs, inputs = {}, {}, {}
    for held in (False, True):
        m = model().to(torch.bfloat16).requires_grad_(False)
        deltas = svdiff.add_shifts(m, factor_dtype=torch.bfloat16, progress=False)
        if held:
            hold_in_fp8(m)
        with torch.no_grad():
            for i, d in enumerate(deltas.values()):
                d.copy_(torch.linspace(-0.2, 0.3, d.numel()) * (i + 1))
        x.grad = None
        out = m(x)
        out.float().square().mean().backward()
        outputs[held], inputs[held] = out.detach().float(), x.grad.float()
        grads[held] = torch.cat([d.grad for d in deltas.values()])
    cos = torch.nn.functional.cosine_similarity
    assert cos(grads[False], grads[True], dim=0) > 0.99
    assert cos(inputs[False].flatten(), inputs[True].flatten(), dim=0) > 0.99  # x's gradient through held weights
    assert (outputs[False] - outputs[True]).abs().max() < 0.05


@pytest.mark.slow
def test_train_flux_on_a_base_held_in_fp8(tmp_path, capsys):
    from svdiff.cli import main
    from svdiff.format import WEIGHTS_NAME, read_shift_file
    from tiny_models import cli_args

    folder = save_family_pipeline("flux", tmp_path)
    argv = cli_args(folder, tmp_path / "out", "--resolution", "16", "--max_train_steps", "2")
    argv += ["--mixed_precision", "bf16", "--base_dtype", "float8_e4m3fn"]
    assert main(argv) == 0
    tensors = read_shift_file(tmp_path / "out" / WEIGHTS_NAME).tensors
    assert tensors and any(t.abs().max() > 0 for t in tensors.values())
    held = re.search(r"base: (\d+) linear layers held in float8_e4m3fn", capsys.readouterr().out)
    assert held and int(held[1]) > 20  # the transformer's and both text encoders' linears
    assert main([*argv, "--method", "lora", "--output_dir", str(tmp_path / "lora")]) == 2
    assert "needs --method svdiff" in capsys.readouterr().err
    assert main([*argv, "--step_path", "merged", "--output_dir", str(tmp_path / "merged")]) == 2
    assert "drop --step_path merged and --compile" in capsys.readouterr().err
