"""Factors held in fp8 (one byte a value, a scale per row): δ = 0 is still the base bit for bit, the update and δ's
gradients agree with bf16 factors, and casting the model keeps them fp8."""

import torch
from torch import nn

import svdiff
from svdiff.families import family_of
from svdiff.sample import load_pipeline
from svdiff.spectral import shifted_modules
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
