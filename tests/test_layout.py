"""The shift file's layout (one δ tensor per component, a key table in the metadata, optional int8) and its key
names (the published checkpoints' names, read onto whatever names the installed libraries use)."""

import base64
import json
import zlib

import pytest
import safetensors.torch
import torch
from torch import nn

import svdiff
from svdiff.adapters import attach, components_of, count_targets, save_shifts, with_live_names
from svdiff.format import ShiftFileError, read_shift_file, save_shift_file
from svdiff.spectral import fingerprint, get_deltas
from svdiff.spectral.shifts import shape_hash
from tiny_models import tiny_text_encoder

PRINT = {"shapes": "0" * 16, "probe": [0.5]}


def _random_deltas(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "unet.down_blocks.0.resnets.0.conv1.weight": torch.randn(8, generator=g) * 0.1,
        "unet.mid_block.attentions.0.norm.weight": torch.randn(16, generator=g) * 1e-3,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(4, generator=g),
    }


def _save(path, tensors, **kw):
    prints = {k.partition(".")[0]: PRINT for k in tensors}
    return save_shift_file(path, tensors, base_model="b", fingerprint=prints, preset="all", **kw)


def test_one_tensor_per_component_with_a_key_table(tmp_path):
    tensors = _random_deltas()
    file = _save(tmp_path / "a.safetensors", tensors, dtype="fp32")
    with safetensors.safe_open(file, "pt") as f:
        assert sorted(f.keys()) == ["text_encoder.delta", "unet.delta"]
        table = json.loads(zlib.decompress(base64.b64decode(f.metadata()["key_table"])))
    assert table["unet"] == [["down_blocks.0.resnets.0.conv1.weight", 8], ["mid_block.attentions.0.norm.weight", 16]]
    back = read_shift_file(file)
    assert list(back.tensors) == list(tensors) and "key_table" not in back.metadata
    for key, value in tensors.items():
        assert torch.equal(back.tensors[key], value)


def test_the_per_layer_layout_of_version_1_still_reads(tmp_path):
    tensors = _random_deltas()
    meta = {
        "format": "svdiff",
        "format_version": "1",
        "base_model": "b",
        "preset": "all",
        "fingerprint": json.dumps({"unet": PRINT, "text_encoder": PRINT}),
    }
    file = tmp_path / "v1.safetensors"
    file.write_bytes(safetensors.torch.save(tensors, meta))
    back = read_shift_file(file)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())


def _rewrite(file, out, change_meta=None, change_tensors=None):
    with safetensors.safe_open(file, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(change_meta or {})
    tensors = (change_tensors or (lambda t: t))(tensors)
    out.write_bytes(safetensors.torch.save(tensors, meta))
    return out


def _table(obj) -> str:
    return base64.b64encode(zlib.compress(json.dumps(obj).encode())).decode()


@pytest.mark.parametrize(
    "change_meta, change_tensors, fragment",
    [
        ({"key_table": "not base64 !"}, None, "key_table is not valid"),
        ({"fingerprint": json.dumps({"unet": PRINT})}, None, "fingerprint is not valid"),
        ({"fingerprint": _table({"unet": {"shapes": 3}})}, None, "fingerprint of unet needs"),
        ({"key_table": base64.b64encode(b"not zlib").decode()}, None, "key_table is not valid"),
        ({"key_table": _table(["unet"])}, None, "key_table is not a map of components"),
        ({"key_table": _table({"unet": [["a.weight", 0]]})}, None, "gives a.weight the length 0"),
        ({"key_table": _table({"unet": [["a", 4], ["a", 4]]})}, None, "names a twice"),
        ({"key_table": _table({"unet": [["a", 4]], "text_encoder": [["b", 4]]})}, None, "unet.delta does not hold"),
        ({"key_table": _table({"unet": [["a", 24]]})}, None, "text_encoder.delta is not in the key table"),
        ({"dtype": "int8"}, None, "tensor text_encoder.scale is missing"),
        (None, lambda t: t | {"unet.extra": torch.ones(2)}, "unet.extra is not in the key table"),
        (
            None,
            lambda t: t | {"unet.delta": t["unet.delta"].to(torch.int8)},
            "unet.delta is I8, the metadata says fp32",
        ),
    ],
)
def test_the_reader_refuses_a_layout_that_disagrees_with_its_key_table(tmp_path, change_meta, change_tensors, fragment):
    file = _save(tmp_path / "a.safetensors", _random_deltas(), dtype="fp32")
    bad = _rewrite(file, tmp_path / "bad.safetensors", change_meta, change_tensors)
    with pytest.raises(ShiftFileError, match=fragment):
        read_shift_file(bad)


def test_a_key_table_that_inflates_beyond_a_header_is_refused(tmp_path):
    bomb = base64.b64encode(zlib.compress(b"[" + b" " * (17 * 2**20) + b"]", 9)).decode()
    file = _save(tmp_path / "a.safetensors", _random_deltas(), dtype="fp32")
    with pytest.raises(ShiftFileError, match="larger than a header may be"):
        read_shift_file(_rewrite(file, tmp_path / "bomb.safetensors", {"key_table": bomb}))


def test_int8_rounds_each_layer_to_127_steps_of_its_largest_value(tmp_path):
    tensors = _random_deltas()
    tensors["unet.zero.weight"] = torch.zeros(3)
    file = _save(tmp_path / "q.safetensors", tensors, dtype="int8")
    back = read_shift_file(file)
    assert back.metadata["dtype"] == "int8"
    for key, value in tensors.items():
        step = value.abs().max() / 127
        assert (back.tensors[key] - value).abs().max() <= step / 2 + 1e-9
    assert torch.equal(back.tensors["unet.zero.weight"], torch.zeros(3))
    negative = _rewrite(
        file, tmp_path / "neg.safetensors", change_tensors=lambda t: t | {"unet.scale": -t["unet.scale"]}
    )
    with pytest.raises(ShiftFileError, match="negative scale"):
        read_shift_file(negative)


def test_sd15_all_file_is_at_most_0_81_mb():
    report = count_targets("sd15", "all")
    assert report["values"] == 398_197
    # fp16 data alone is 796,394 bytes: the header (key table, fingerprint, metadata) adds under 14 kB
    assert report["file_bytes_fp16"] <= 810_000
    assert report["file_bytes_int8"] <= 410_000


class CLIPTextModel(nn.Module):
    """transformers 4's layout of the text encoder (weights under `text_model`), by class name as svdiff sees it."""

    def __init__(self, flat):
        super().__init__()
        self.text_model = flat


def _shifted_text_encoder(seed=0):
    torch.manual_seed(seed)
    te = tiny_text_encoder()
    g = torch.Generator().manual_seed(5)
    for p in svdiff.add_shifts(te, cache=False, progress=False).values():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return te


def test_text_encoder_keys_carry_the_text_model_level(tmp_path):
    te = _shifted_text_encoder()
    assert not hasattr(te, "text_model")  # transformers 5
    file = save_shifts(tmp_path / "s.safetensors", {"text_encoder": te}, base_model="b", preset="all")
    keys = list(read_shift_file(file).tensors)
    assert keys and all(k.startswith("text_encoder.text_model.") for k in keys)
    fresh = _shifted_text_encoder()
    svdiff.remove_shifts(fresh)
    attach({"text_encoder": fresh}, file, progress=False, cache=False)
    want, got = get_deltas(te), get_deltas(fresh)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k].half().float(), got[k]) for k in want)


def test_files_written_without_the_level_load_with_or_without_it(tmp_path):
    te = _shifted_text_encoder()
    bare = {f"text_encoder.{k}": v for k, v in get_deltas(te).items()}
    file = save_shift_file(
        tmp_path / "bare.safetensors",
        bare,
        base_model="b",
        fingerprint={"text_encoder": fingerprint(te)},
        preset="all",
        dtype="fp32",
    )
    flat = _shifted_text_encoder()
    svdiff.remove_shifts(flat)
    attach({"text_encoder": flat}, file, progress=False, cache=False)
    assert set(get_deltas(flat)) == set(get_deltas(te))
    nested = _shifted_text_encoder()
    svdiff.remove_shifts(nested)
    wrapped = CLIPTextModel(nested)
    targets = {"text_encoder": {t.name: t.length for t in svdiff.spectral.find_targets(wrapped)}}
    renamed = with_live_names(read_shift_file(file), {"text_encoder": wrapped}, targets)
    assert set(renamed.tensors) == {f"text_encoder.text_model.{k}" for k in get_deltas(te)}


def test_a_file_loads_into_the_text_encoder_of_either_transformers_layout(tmp_path):
    """A file written now (published names and architecture hash) and one written before the published names
    (flat names and hash), each loaded into transformers 5's flat text encoder and transformers 4's nested one."""
    te = _shifted_text_encoder()
    want = {k: v.half().float() for k, v in get_deltas(te).items()}
    published = save_shifts(tmp_path / "published.safetensors", {"text_encoder": te}, base_model="b", preset="all")
    flat_names = save_shift_file(
        tmp_path / "flat.safetensors",
        {f"text_encoder.{k}": v for k, v in get_deltas(te).items()},
        base_model="b",
        fingerprint={"text_encoder": fingerprint(te)},
        preset="all",
    )

    def flat():
        model = _shifted_text_encoder()
        svdiff.remove_shifts(model)
        return model, ""

    def nested():
        model, _ = flat()
        return CLIPTextModel(model), "text_model."

    nested_model, _ = nested()
    assert read_shift_file(published).metadata["fingerprint"]["text_encoder"]["shapes"] == shape_hash(nested_model)
    for file in (published, flat_names):
        for make in (flat, nested):
            model, level = make()
            attach({"text_encoder": model}, file, progress=False, cache=False)
            got = get_deltas(model)
            assert got.keys() == {level + k for k in want}
            assert all(torch.equal(got[level + k], v) for k, v in want.items())


def test_int8_generations_match_fp16_within_2_of_255_on_the_embedded_base(tmp_path):
    import numpy as np

    from svdiff.sample import apply_shifts, load_pipeline, sample

    pipe = load_pipeline(None, device="cpu")
    g = torch.Generator().manual_seed(4)
    components = components_of(pipe)
    for model in components.values():
        for p in svdiff.add_shifts(model, progress=False).values():
            # shifts that move the pictures far from the base's without turning them into noise
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    files = {
        d: save_shifts(tmp_path / f"{d}.safetensors", components, base_model="svdiff-tiny", preset="all", dtype=d)
        for d in ("fp16", "int8")
    }
    values = sum(d.numel() for d in read_shift_file(files["fp16"]).tensors.values())
    layers = len(read_shift_file(files["fp16"]).tensors)
    # a byte per value less, plus one float32 scale per layer and its header entries
    assert files["fp16"].stat().st_size - files["int8"].stat().st_size >= values - 4 * layers - 300
    images = {}
    for dtype, file in files.items():
        fresh = load_pipeline(None, device="cpu")
        apply_shifts(fresh, [(file, 1.0)])
        images[dtype] = [
            np.asarray(im, dtype=np.int16)
            for im in sample(fresh, "a photo of a red heart", num_images=2, num_inference_steps=8, progress=False)
        ]
    base = [
        np.asarray(im, dtype=np.int16)
        for im in sample(
            load_pipeline(None, device="cpu"),
            "a photo of a red heart",
            num_images=2,
            num_inference_steps=8,
            progress=False,
        )
    ]
    assert max(np.abs(a - b).max() for a, b in zip(images["fp16"], base, strict=True)) > 10  # the shifts matter
    assert max(np.abs(a - b).max() for a, b in zip(images["fp16"], images["int8"], strict=True)) <= 2
