"""Spectral shifts on the flow-matching transformers (SD3/3.5 MMDiT, Flux.1): the published architectures built
on meta tensors, every layer kind they hold shifted exactly (qk-norm RMSNorm included), and their presets."""

import json

import pytest
import torch

from svdiff.adapters import components_of
from svdiff.cli import main
from svdiff.errors import SvdiffError
from svdiff.models import build_architecture
from svdiff.spectral import add_shifts, find_targets, get_deltas, remove_shifts, set_deltas
from tiny_models import tiny_flux, tiny_sd3


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        pooled_projections=torch.randn(2, 6, generator=g),
        timestep=torch.tensor([10.0, 500.0]),
    )


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(2, 16, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        pooled_projections=torch.randn(2, 6, generator=g),
        timestep=torch.tensor([0.1, 0.9]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5, 3.5]),
    )


@pytest.mark.parametrize(
    "name, params, shifts",
    [("flux-dev", 11_901_408_320, 1_553_792), ("sd35-large", 8_056_627_520, 1_308_416)],
)
def test_published_transformers_count_on_meta(name, params, shifts):
    transformer = build_architecture(name)["transformer"]
    assert all(p.is_meta for p in transformer.parameters())
    assert sum(p.numel() for p in transformer.parameters()) == params
    assert sum(t.length for t in find_targets(transformer)) == shifts


def test_t5_is_never_a_shifted_component():
    flux = build_architecture("flux-dev")
    assert set(flux) == {"transformer", "text_encoder"}
    sd3 = build_architecture("sd3-medium", frozen=True)
    assert type(sd3["text_encoder_3"]).__name__ == "T5EncoderModel"

    class Pipe:  # what a diffusers FluxPipeline exposes as .components
        components = {"transformer": flux["transformer"], "text_encoder_2": sd3["text_encoder_3"]}

    assert set(components_of(Pipe())) == {"transformer"}


@pytest.mark.parametrize("build, inputs", [(tiny_sd3, sd3_inputs), (tiny_flux, flux_inputs)])
def test_every_layer_kind_is_shifted_exactly(build, inputs):
    model = build()
    with torch.no_grad():
        base = model(**inputs()).sample
    targets = {t.name: type(t.module).__name__ for t in find_targets(model)}
    assert {"Linear", "RMSNorm"} <= set(targets.values())
    assert any(".norm_q." in n or ".norm_added_k." in n for n in targets)  # the qk-norm scales
    assert any(".norm1.linear." in n for n in targets)  # AdaLayerNorm modulation
    params = add_shifts(model, progress=False, cache=False)
    assert [t.name for t in find_targets(model)] == list(targets) == list(params)  # the same once shifted
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, base)  # δ = 0: bit for bit
    set_deltas(model, {k: torch.full_like(v, 0.05) for k, v in params.items()})
    out = model(**inputs()).sample
    assert (out - base).abs().max() > 1e-3
    out.square().mean().backward()
    # the qk-norm scales of the first block all reach the output (the last block's context queries do not)
    norms = [k for k in params if targets[k] == "RMSNorm" and k.startswith("transformer_blocks.0.")]
    assert norms
    assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in norms)
    remove_shifts(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, base)


def test_library_norm_runs_its_own_forward_with_the_shifted_scale():
    model = tiny_sd3()
    norm = model.transformer_blocks[0].attn.norm_q
    x = torch.randn(3, 2, 4)
    add_shifts(model, include=[r"transformer_blocks\.0\.attn\.norm_q\."], progress=False, cache=False)
    delta = torch.tensor([0.5, -0.25, 0.0, 1.0])
    set_deltas(model, {"transformer_blocks.0.attn.norm_q.weight": delta})
    shifted = norm(x)
    remove_shifts(model)
    with torch.no_grad():
        norm.weight += delta
    assert torch.equal(shifted, norm(x))


def test_transformer_presets():
    flux = tiny_flux()
    names = lambda preset: [t.name for t in find_targets(flux, preset)]  # noqa: E731
    attn, mlp = names("attn"), names("mlp")
    assert (
        "transformer_blocks.0.attn.add_q_proj.weight" in attn and "transformer_blocks.0.attn.to_add_out.weight" in attn
    )
    assert "transformer_blocks.0.ff_context.net.2.weight" in mlp
    assert {"single_transformer_blocks.1.proj_mlp.weight", "single_transformer_blocks.1.proj_out.weight"} <= set(mlp)
    assert not set(attn) & set(mlp)
    assert all(n.startswith("single_transformer_blocks.1.") for n in names("single:1-1")) and names("single:1-1")
    assert all(n.startswith("transformer_blocks.0.") for n in names("blocks:0-0"))
    assert names("single:5-9") == []
    assert set(names("norm")) == {t.name for t in find_targets(flux) if t.module.weight.ndim == 1}
    for bad in ("single:3-1", "double:0-1", "blocks:x-2"):
        with pytest.raises(SvdiffError, match="unknown preset"):
            find_targets(flux, bad)


def test_shift_sets_on_a_transformer_round_trip():
    model = tiny_flux()
    params = add_shifts(model, "attn", progress=False, cache=False)
    values = {k: torch.randn_like(v) * 0.01 for k, v in params.items()}
    set_deltas(model, values)
    assert all(torch.equal(get_deltas(model)[k], values[k]) for k in values)


def test_targets_command_on_flux(capsys):
    assert main(["targets", "--base", "flux-dev", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["transformer"]["values"] == 1_553_792
    assert set(report["components"]) == {"transformer", "text_encoder"}
    assert main(["targets", "--base", "flux-dev", "--preset", "single:0-37", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)["components"]
    # 38 blocks of norm_q, norm_k (128 each), norm.linear (3072 × 9216), proj_mlp (3072 × 12288), proj_out
    # (15360 × 3072), to_q, to_k, to_v (3072 × 3072): 38 × (256 + 6 × 3072) values, no text-encoder weight
    assert single == {
        "transformer": {"tensors": 38 * 8, "values": 38 * (256 + 6 * 3072)},
        "text_encoder": {"tensors": 0, "values": 0},
    }
