"""Shift files on pipelines: several loaded at once, scales (Eq. 4, Eq. 5), style mixing by layer selection,
unloading, fusing, and merging files."""

import types

import pytest
import torch
from torch import nn

import svdiff
from svdiff.adapters import save_shifts
from svdiff.cli import main
from svdiff.format import read_shift_file


def _pipe(seed=0):
    torch.manual_seed(seed)
    unet = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 3, 1))
    te = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    return types.SimpleNamespace(components={"unet": unet, "text_encoder": te, "vae": nn.Linear(2, 2)})


def _run(pipe):
    torch.manual_seed(1)
    x, tokens = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        return pipe.components["unet"](x), pipe.components["text_encoder"](tokens)


def _subject_file(tmp_path, name, seed):
    """A shift file for the base of `_pipe()`, with random δ."""
    pipe = _pipe()
    g = torch.Generator().manual_seed(seed)
    for c in ("unet", "text_encoder"):
        for p in svdiff.add_shifts(pipe.components[c], cache=False, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_shifts(
        tmp_path / name,
        {c: pipe.components[c] for c in ("unet", "text_encoder")},
        base_model="tiny",
        preset="all",
        dtype="fp32",
    )


@pytest.fixture
def files(tmp_path):
    return _subject_file(tmp_path, "dog", 1), _subject_file(tmp_path, "cat", 2)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _merged(tmp_path, files, weights, name):
    out = tmp_path / f"{name}.safetensors"
    args = ["merge", *map(str, files), "--weights", *map(str, weights), "-o", str(out)]
    assert main(args) == 0
    return out


def test_names_scale_zero_and_unload(files):
    pipe = _pipe()
    base = _run(pipe)
    assert svdiff.load_shifts(pipe, files[0], cache=False, progress=False) == "dog"
    assert not _equal(_run(pipe), base)
    svdiff.set_scales(pipe, {"dog": 0.0})
    assert _equal(_run(pipe), base)
    with pytest.raises(svdiff.SvdiffError, match="already loaded"):
        svdiff.load_shifts(pipe, files[0], cache=False, progress=False)
    with pytest.raises(svdiff.SvdiffError, match="no shift set named 'cow'"):
        svdiff.set_scales(pipe, {"cow": 1.0})
    svdiff.unload_shifts(pipe)
    assert svdiff.shift_sets_of(pipe) == {}
    assert _equal(_run(pipe), base)


def test_a_folder_name_with_dots_names_the_set_with_underscores(tmp_path):
    path = _subject_file(tmp_path, "sks-dog-v1.5", 1)
    pipe = _pipe()
    assert svdiff.load_shifts(pipe, path, cache=False, progress=False) == "sks-dog-v1_5"
    with pytest.raises(svdiff.SvdiffError, match="cannot contain"):
        svdiff.load_shifts(pipe, path, adapter_name="a.b", cache=False, progress=False)


def test_two_files_add_and_interpolate_like_merged_files(tmp_path, files):
    pipe = _pipe()
    for f in files:
        svdiff.load_shifts(pipe, f, cache=False, progress=False)
    assert svdiff.shift_sets_of(pipe) == {"dog": 1.0, "cat": 1.0}
    both = _run(pipe)
    merged = _pipe()
    svdiff.load_shifts(merged, _merged(tmp_path, files, [1, 1], "sum"), cache=False, progress=False)
    assert _equal(both, _run(merged))  # Eq. 4: ReLU(σ + δ1 + δ2)

    alpha = 0.3
    svdiff.set_scales(pipe, {"dog": alpha, "cat": 1 - alpha})
    interp = _pipe()
    out = tmp_path / "interp.safetensors"
    assert main(["merge", str(files[0]), str(files[1]), "--interpolate", "--alpha", str(alpha), "-o", str(out)]) == 0
    svdiff.load_shifts(interp, out, cache=False, progress=False)
    _close(_run(pipe), _run(interp))  # Eq. 5
    assert read_shift_file(out).metadata["merged_from"][0]["weight"] == alpha


def test_style_mix_takes_each_layer_from_its_file(files):
    pipe = _pipe()
    svdiff.load_shifts(pipe, files[0], "geometry", include=[r"^unet\.0\."], cache=False, progress=False)
    svdiff.load_shifts(pipe, files[1], "appearance", exclude=[r"^unet\.0\."], cache=False, progress=False)
    shifted = svdiff.spectral.shifted_modules(pipe.components["unet"])
    assert list(shifted["0.weight"][1].deltas) == ["geometry"]
    assert list(shifted["2.weight"][1].deltas) == ["appearance"]
    dog = read_shift_file(files[0]).tensors["unet.0.weight"]
    assert torch.equal(shifted["0.weight"][1].deltas["geometry"].detach(), dog.float())


def test_fuse_matches_and_unfuse_restores(files):
    pipe = _pipe()
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in pipe.components.items()}
    svdiff.load_shifts(pipe, files[0], cache=False, progress=False)
    live = _run(pipe)
    svdiff.fuse(pipe)
    _close(_run(pipe), live)
    svdiff.unfuse(pipe)
    svdiff.unload_shifts(pipe, "dog")
    for c, m in pipe.components.items():
        assert all(torch.equal(m.state_dict()[k], v) for k, v in before[c].items())


def test_merge_refuses_other_bases_and_bad_flags(tmp_path, files, capsys):
    other = _pipe(seed=5)
    svdiff.add_shifts(other.components["unet"], cache=False, progress=False)
    foreign = save_shifts(tmp_path / "foreign", {"unet": other.components["unet"]}, base_model="x", preset="all")
    assert main(["merge", str(files[0]), str(foreign), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "different bases" in capsys.readouterr().err
    assert main(["merge", str(files[0]), str(files[1]), "--weights", "1", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "2 files but 1 weights" in capsys.readouterr().err
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(files[0]), str(files[1]), "--interpolate", "--alpha", "1.5", "-o", str(out)]) == 0
    assert "outside [0, 1]" in capsys.readouterr().err


def test_inspect_plot(files, tmp_path, capsys):
    out = tmp_path / "blocks.png"
    assert main(["inspect", str(files[0]), "--plot", str(out)]) == 0
    from PIL import Image

    image = Image.open(out)
    assert image.width > 400 and image.height > 30
    assert "wrote" in capsys.readouterr().out


def test_bare_module_takes_the_files_single_component(tmp_path):
    pipe = _pipe()
    svdiff.add_shifts(pipe.components["unet"], cache=False, progress=False)
    path = save_shifts(tmp_path / "u", {"unet": pipe.components["unet"]}, base_model="tiny", preset="all")
    unet = _pipe().components["unet"]
    assert svdiff.load_shifts(unet, path, cache=False, progress=False) == "u"


def test_inspect_plot_needs_png(files, tmp_path, capsys):
    assert main(["inspect", str(files[0]), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "must name a .png" in capsys.readouterr().err
