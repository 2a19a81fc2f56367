"""The training-memory report: its activation counts on meta tensors are what a real forward keeps, and its
weight, factor and optimizer figures follow from the shapes."""

import json

import pytest
import torch

from svdiff.cli import main
from svdiff.memory import factor_bytes, saved_activations, training_memory
from tiny_models import tiny_flux, tiny_sd3, tiny_unet


@pytest.mark.parametrize("build", [tiny_unet, tiny_sd3, tiny_flux])
def test_meta_count_is_what_a_real_forward_saves(build):
    """On the CPU, scaled_dot_product_attention runs fused; the meta count stands in for it with what a fused
    kernel keeps, so both counts agree to the byte."""
    real = build().float().train().requires_grad_(False)
    meta = build().float().train().requires_grad_(False).to("meta")
    for resolution in (32, 64):
        counted = saved_activations(meta, resolution, batch=2, dtype="fp32")
        measured = saved_activations(real, resolution, batch=2, dtype="fp32", device="cpu")
        assert counted == measured
        assert 0 < counted["gradient_checkpointing"] < counted["no_checkpointing"]
    bigger = saved_activations(meta, 64, batch=4, dtype="fp32")["no_checkpointing"]
    assert bigger > saved_activations(meta, 64, batch=2, dtype="fp32")["no_checkpointing"]


def test_factor_bytes():
    sizes = [(8, 4, 4), (6, 0, 0)]  # a 8 × 4 matrix of rank 4, and a norm of 6 (no factors)
    assert factor_bytes(sizes, "fp32") == (8 * 4 + 4 * 4) * 4 + 4 * 4
    assert factor_bytes(sizes, "bf16") == (8 * 4 + 4 * 4) * 2 + 4 * 4
    assert factor_bytes(sizes, "fp8") == (8 * 4 + 4 * 4) + 4 * 4 + 4 * (8 + 4)


def test_flux_dev_report():
    from svdiff.models import build_architecture

    report = training_memory("flux-dev", resolutions=(256,))
    transformer = report["components"]["transformer"]
    assert transformer["parameters"] == 11_901_408_320 and transformer["weights"] == 2 * 11_901_408_320
    assert transformer["shifts"] == 1_553_792
    # fp32 and bf16 factors differ by two bytes per value of U and V: min(m, n)·(m + n) per Linear
    linears = [m for m in build_architecture("flux-dev")["transformer"].modules() if isinstance(m, torch.nn.Linear)]
    values = sum(min(m.in_features, m.out_features) * (m.in_features + m.out_features) for m in linears)
    factors = transformer["factors"]
    assert factors["fp32"] - factors["bf16"] == 2 * values
    assert factors["bf16"] - factors["fp8"] == values - 4 * sum(m.out_features + min(m.weight.shape) for m in linears)
    assert "shifts" not in report["components"]["text_encoder_2"]  # T5: frozen, weights only
    assert report["trainable"] == 16 * (transformer["shifts"] + report["components"]["text_encoder"]["shifts"])
    acts = report["activations"][256]
    assert 0 < acts["gradient_checkpointing"] < acts["no_checkpointing"]
    held = training_memory("flux-dev", resolutions=(256,), dtype="fp8")["components"]["transformer"]["weights"]
    in_linears = sum(m.weight.numel() for m in linears)
    # a held base: each Linear weight at a byte a value and a float32 scale per row, everything else bf16
    assert held == 2 * 11_901_408_320 - in_linears + 4 * sum(m.out_features for m in linears)


def test_targets_memory_command(capsys):
    assert main(["targets", "--base", "sd15", "--memory", "--resolution", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["components"]) == {"unet", "text_encoder"}
    assert main(["targets", "--base", "sd15", "--memory", "--resolution", "256"]) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing" in out and "GiB" in out
