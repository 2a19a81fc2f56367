"""`svdiff import`: svdiff-pytorch's shift files, written here by a re-implementation of that format's rules
(svdiff_pytorch/layers.py and train_svdiff.py of mkshing/svdiff-pytorch: every Conv2d, Linear, GroupNorm and
LayerNorm of the UNet; Linear, LayerNorm and Embedding of the text encoder; conv kernels reshaped
c_out × (c_in·kh·kw); `torch.linalg.svd`; a norm weight as a 1 × N matrix; keys `<module>.delta` with the text
encoder under `text_model.`; float32, no metadata), load onto the base to the weights that format's own layers
compute: U·diag(ReLU(σ + δ))·Vᵀ."""

import pytest
import safetensors.torch
import torch
from torch import nn

from svdiff.adapters import attach
from svdiff.cli import main
from svdiff.format import read_shift_file
from svdiff.names import checkpoint_name
from svdiff.spectral import shifted_modules
from tiny_models import tiny_pipeline

UNET_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)
TEXT_LAYERS = (nn.Linear, nn.LayerNorm, nn.Embedding)


def their_matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.unsqueeze(0) if w.dim() == 1 else w.reshape(w.shape[0], -1)


def write_svdiff_pytorch(model: nn.Module, classes, path, seed: int, reshape=their_matrix) -> dict[str, torch.Tensor]:
    """A `spectral_shifts*.safetensors` as svdiff-pytorch writes it; returns {module path: the weight its layers
    run with}."""
    g = torch.Generator().manual_seed(seed)
    tensors, weights = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, classes) or getattr(module, "weight", None) is None:
            continue
        U, S, Vh = torch.linalg.svd(reshape(module).double(), full_matrices=False)
        delta = torch.randn(S.shape, generator=g, dtype=torch.float64) * (0.05 if module.weight.dim() == 1 else 0.3)
        path_name = checkpoint_name(model, name)  # transformers 4.27 layout: text_model.…
        tensors[f"{path_name}.delta"] = delta.float()
        weights[path_name] = (U @ torch.diag(torch.relu(S + delta)) @ Vh).reshape(module.weight.shape)
    safetensors.torch.save_file(tensors, path)
    return weights


@pytest.fixture()
def base(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    return tmp_path / "base", pipe


def effective_weights(components) -> dict[str, torch.Tensor]:
    out = {}
    for component, model in components.items():
        for name, (module, shift) in shifted_modules(model).items():
            w = module.weight.double() + shift.delta_weight(shift.diagonal_change(), module.weight).double()
            out[f"{component}.{checkpoint_name(model, name).removesuffix('.weight')}"] = w
    return out


def test_imported_files_give_the_weights_svdiff_pytorch_runs_with(base, tmp_path):
    folder, pipe = base
    runs = tmp_path / "run"
    runs.mkdir()
    want = {
        f"unet.{k}": w
        for k, w in write_svdiff_pytorch(pipe.unet, UNET_LAYERS, runs / "spectral_shifts.safetensors", 1).items()
    }
    te = write_svdiff_pytorch(pipe.text_encoder, TEXT_LAYERS, runs / "spectral_shifts_te.safetensors", 2)
    want |= {f"text_encoder.{k}": w for k, w in te.items()}
    out = tmp_path / "imported.safetensors"
    assert main(["import", str(runs), "--base", str(folder), "-o", str(out)]) == 0
    shift_file = read_shift_file(out)
    assert shift_file.metadata["base_model"] == str(folder)
    assert any(k.startswith("text_encoder.text_model.embeddings.token_embedding") for k in shift_file.tensors)
    fresh = tiny_pipeline()
    components = {"unet": fresh.unet, "text_encoder": fresh.text_encoder}
    attach(components, out, progress=False, cache=False)
    got = effective_weights(components)
    assert got.keys() == want.keys()
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-5, msg=key)


def test_the_norm_conversion_is_exact():
    from svdiff.importer import convert

    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.25]))
    for delta in (0.7, -0.4, -10.0):  # the last one takes ReLU to 0: the weight vanishes, in both
        [converted] = convert({"0.delta": torch.tensor([delta])}, "unet", nn.Sequential(norm)).values()
        U, S, Vh = torch.linalg.svd(norm.weight.detach().double().unsqueeze(0), full_matrices=False)
        theirs = (U @ torch.diag(torch.relu(S + delta)) @ Vh).squeeze(0)
        torch.testing.assert_close(norm.weight.double() + converted.double(), theirs, rtol=0, atol=1e-7)


def kohya_reshape(module):  # svdiff-kohya's layout, (c_out·kh·kw) × c_in
    w = module.weight.detach()
    return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.dim() == 4 else their_matrix(module)


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (lambda t: t | {"conv_in.delta": torch.zeros(4)}, "fits a (c_out·k·k) × c_in reshape"),
        (lambda t: t | {"conv_norm_out.delta": torch.zeros(8)}, "a full-length norm shift"),
        (lambda t: t | {"down_blocks.7.conv.delta": torch.zeros(3)}, "has no layer down_blocks.7.conv: another base"),
        (lambda t: t | {"conv_in.weight": torch.zeros(3)}, "is not an svdiff-pytorch shift file"),
    ],
)
def test_conventions_that_cannot_match_are_refused_in_one_line(base, tmp_path, capsys, tamper, fragment):
    folder, pipe = base
    file = tmp_path / "spectral_shifts.safetensors"
    write_svdiff_pytorch(pipe.unet, UNET_LAYERS, file, 1)
    tensors = safetensors.torch.load_file(file)
    safetensors.torch.save_file(tamper(tensors), file)
    assert main(["import", str(file), "--base", str(folder), "-o", str(tmp_path / "x.safetensors")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("error: ") and fragment in last
    assert not (tmp_path / "x.safetensors").exists()


def test_a_kohya_reshaped_conv_is_named(base, tmp_path, capsys):
    folder, pipe = base
    file = tmp_path / "spectral_shifts.safetensors"
    write_svdiff_pytorch(pipe.unet, (nn.Conv2d,), file, 1, reshape=kohya_reshape)
    assert main(["import", str(file), "--base", str(folder), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "svdiff-kohya" in capsys.readouterr().err
