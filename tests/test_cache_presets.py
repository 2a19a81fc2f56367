"""The SVD cache, the Table-1 preset counts on the SD 1.5 architecture, and shift files on real models."""

import json

import pytest
import torch
from torch import nn

import svdiff
from svdiff.adapters import attach, save_shifts
from svdiff.cli import main
from svdiff.format import ShiftFileError, read_shift_file
from svdiff.models import build_architecture
from svdiff.spectral import SVDCache, find_targets
from svdiff.spectral.shifts import compute_bases


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDIFF_CACHE", str(tmp_path / "cache"))
    return SVDCache()


def test_cache_hit_gives_identical_factors(cache, monkeypatch):
    torch.manual_seed(0)
    mats = [torch.randn(12, 30), torch.randn(30, 12), torch.randn(12, 30)]
    first = compute_bases(mats, cache=cache, progress=False)
    assert len(cache.entries()) == 3

    def no_svd(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("svdiff.spectral.shifts.decompose", no_svd)
    second = compute_bases(mats, cache=cache, progress=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_cache_entry_is_recomputed(cache, damage):
    torch.manual_seed(0)
    mat = torch.randn(10, 16)
    (good,) = compute_bases([mat], cache=cache, progress=False)
    (entry,) = cache.entries()
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the factor data: only the CRC can tell
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00" * 8 + b"not a header")
    else:
        data = bytearray()
    entry.write_bytes(bytes(data))
    assert cache.get(entry.stem, mat) is None
    assert not entry.exists()  # the bad entry is gone
    (again,) = compute_bases([mat], cache=cache, progress=False)
    assert torch.equal(again.U, good.U) and torch.equal(again.S, good.S)
    assert len(cache.entries()) == 1


def test_cache_key_follows_content_not_name(cache):
    a = nn.Linear(8, 6)
    b = nn.Sequential(nn.Linear(8, 6))
    with torch.no_grad():
        b[0].weight.copy_(a.weight)
    svdiff.add_shifts(a, cache=cache, progress=False)
    svdiff.add_shifts(b, cache=cache, progress=False)
    assert len(cache.entries()) == 1
    assert torch.equal(a.spectral_shift.U, b[0].spectral_shift.U)


TABLE_1 = {  # SVDiff paper, Table 1, SD 1.5 UNet: shifts counted as min(M, N) per matrix, length per 1-D weight
    "all": 322_856,
    "unet-ca": 43_776,
    "unet-ca-kv": 18_816,
    "unet-1d": 100_160,
    "unet-2d": 140_416,
    "unet-4d": 82_280,
    "up": 181_568,
    "down": 107_072,
    "mid": 32_256,
    "up-ca": 23_808,
    "down-ca": 15_872,
    "mid-ca": 4_096,
}


@pytest.fixture(scope="module")
def sd15():
    return build_architecture("sd15", device="meta")


@pytest.mark.parametrize("preset", TABLE_1)
def test_table1_preset_counts(sd15, preset):
    assert sum(t.length for t in find_targets(sd15["unet"], preset)) == TABLE_1[preset]


def test_text_encoder_count(sd15):
    assert sum(t.length for t in find_targets(sd15["text_encoder"])) == 75_341
    assert find_targets(sd15["text_encoder"], "unet-ca") == []


def test_targets_cli_json(capsys):
    assert main(["targets", "--base", "sd15", "--preset", "unet-ca", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["unet"] == {"tensors": 64, "values": 43_776}
    assert report["values"] == 43_776
    assert 43_776 * 2 < report["file_bytes_fp16"] < report["file_bytes_fp32"] < 43_776 * 4 + 20_000


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["targets", "--base", "sd15", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset") and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["targets", "--base", str(tmp_path)]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


def _tiny_pair(seed):
    torch.manual_seed(seed)
    unet = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 3, 1))
    te = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    return {"unet": unet, "text_encoder": te}


def test_shift_file_round_trip_on_models(tmp_path, cache, capsys):
    src = _tiny_pair(0)
    for model in src.values():
        params = svdiff.add_shifts(model, cache=cache, progress=False)
        with torch.no_grad():
            for p in params.values():
                p.normal_(std=0.2)
    path = save_shifts(tmp_path / "out", src, base_model="tiny", preset="all", dtype="fp32")
    assert path.name == "svdiff_weights.safetensors"
    dst = _tiny_pair(0)
    attach(dst, path, cache=cache, progress=False)
    x = torch.randn(2, 3, 5, 5)
    tokens = torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        assert torch.equal(src["unet"](x), dst["unet"](x))
        assert torch.equal(src["text_encoder"](tokens), dst["text_encoder"](tokens))
    assert main(["inspect", str(path)]) == 0
    assert "tiny" in capsys.readouterr().out


def test_shift_file_refuses_another_base(tmp_path, cache):
    src = _tiny_pair(0)
    svdiff.add_shifts(src["unet"], cache=cache, progress=False)
    path = save_shifts(tmp_path, {"unet": src["unet"]}, base_model="tiny", preset="all")
    with pytest.raises(ShiftFileError, match="trained on 'tiny'.*weights differ"):
        attach(_tiny_pair(1), path, cache=cache, progress=False)
    other = _tiny_pair(0)
    other["unet"] = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1))
    with pytest.raises(ShiftFileError, match="architecture"):
        attach(other, path, cache=cache, progress=False)
    assert read_shift_file(path).metadata["preset"] == "all"


def test_fp16_loaded_base_still_matches(tmp_path, cache):
    """The same base loaded in fp16 passes the fingerprint check (another base does not, above) and gets the
    file's δ exactly."""
    src = _tiny_pair(0)
    params = svdiff.add_shifts(src["unet"], cache=cache, progress=False)
    with torch.no_grad():
        for p in params.values():
            p.normal_(std=0.2)
    path = save_shifts(tmp_path, {"unet": src["unet"]}, base_model="tiny", preset="all")
    half = {k: v.half() for k, v in _tiny_pair(0).items()}
    attach(half, path, cache=cache, progress=False)
    (adapter,) = svdiff.spectral.shift_sets(half["unet"])  # the name the file was loaded under
    loaded = svdiff.get_deltas(half["unet"], adapter)
    assert loaded.keys() == params.keys()
    for name, delta in params.items():
        assert torch.equal(loaded[name], delta.detach().half().float())  # the file holds fp16 δ


def test_cache_entry_for_other_values_is_rejected(cache):
    """A well-formed entry whose factors do not reconstruct this weight is never used."""
    torch.manual_seed(0)
    mat, other = torch.randn(10, 16), torch.randn(10, 16)
    (good,) = compute_bases([mat], cache=cache, progress=False)
    (entry,) = cache.entries()
    (wrong,) = compute_bases([other], cache=False, progress=False)
    cache.put(entry.stem, wrong)
    assert cache.get(entry.stem, mat) is None
    (again,) = compute_bases([mat], cache=cache, progress=False)
    assert torch.equal(again.S, good.S)


def test_zero_matrix_cache_entry_is_kept(cache):
    zero = torch.zeros(6, 20)
    compute_bases([zero], cache=cache, progress=False)
    (entry,) = cache.entries()
    assert cache.get(entry.stem, zero) is not None
    assert entry.exists()


def test_attn_preset_is_the_layers_lora_adapts(sd15):
    from svdiff.families import StableDiffusion

    for component, suffixes in StableDiffusion.lora_targets.items():
        model = sd15[component]
        chosen = {t.name.removesuffix(".weight") for t in find_targets(model, "attn")}
        lora = {
            n for n, m in model.named_modules() if any(n.endswith("." + s) for s in suffixes) and hasattr(m, "weight")
        }
        assert chosen == lora and chosen
    assert sum(t.length for t in find_targets(sd15["unet"], "attn")) == 93_696
