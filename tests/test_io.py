"""Shift files: round trips, atomic writes, and one clear ShiftFileError for every bad file, fuzzed."""

import json
import os
import re
import resource
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svdiff.adapters import check_against
from svdiff.format import (
    FORMAT_VERSION,
    WEIGHTS_NAME,
    ShiftFile,
    ShiftFileError,
    fingerprint_mismatch,
    read_shift_file,
    save_shift_file,
)
from svdiff.inspection import format_summary, summarize

FINGERPRINT = {
    "unet": {"shapes": "3f9a", "probe": [0.2718, -1.4142, 3.1416]},
    "text_encoder": {"shapes": "77c1", "probe": [0.5772, 0.1234]},
}
TARGETS = {"unet": {"down.0.conv.weight": 8, "mid.norm.weight": 5}, "text_encoder": {"q_proj.weight": 4}}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ITEM_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1}


def deltas(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{c}.{p}": torch.randn(n, generator=g) for c, params in TARGETS.items() for p, n in params.items()}


def save(path: Path, tensors: dict | None = None, **kwargs) -> Path:
    kwargs = {"base_model": "tiny-base", "fingerprint": FINGERPRINT, "preset": "all", **kwargs}
    return save_shift_file(path, deltas() if tensors is None else tensors, **kwargs)


def svdiff_metadata(**changes: str | None) -> dict[str, str]:
    """Metadata of a valid file; a change to None drops that key."""
    metadata = {
        "format": "svdiff",
        "format_version": "1",
        "base_model": "tiny-base",
        "fingerprint": json.dumps(FINGERPRINT),
        "preset": "all",
        **changes,
    }
    return {key: value for key, value in metadata.items() if value is not None}


def framed(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ShiftFileError) as info:
        read_shift_file(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message
    return message


# --- writing and reading back ---


@pytest.mark.parametrize(
    "dtype, torch_dtype", [("fp16", torch.float16), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_round_trip(tmp_path, dtype, torch_dtype):
    original = deltas()
    original["text_encoder.q_proj.weight"] = torch.nn.Parameter(original["text_encoder.q_proj.weight"])
    extra = {"training_args": {"lr": 1e-3, "steps": 500}, "note": "sks dog", "numbers": [1, 2.5], "text": "7"}
    file = save(tmp_path / "dog.safetensors", original, dtype=dtype, extra=extra)
    assert file == tmp_path / "dog.safetensors"

    shift = read_shift_file(file)
    assert shift.path == file
    assert shift.tensors.keys() == original.keys()
    for key, delta in original.items():
        assert shift.tensors[key].dtype == torch_dtype
        assert torch.equal(shift.tensors[key], delta.detach().to(torch_dtype))
    meta = shift.metadata
    assert (meta["format"], meta["format_version"]) == ("svdiff", FORMAT_VERSION)
    assert (meta["base_model"], meta["preset"], meta["dtype"]) == ("tiny-base", "all", dtype)
    assert meta["fingerprint"] == FINGERPRINT
    assert {key: meta[key] for key in extra} == extra
    components = shift.components()
    assert {name: set(params) for name, params in components.items()} == {c: set(p) for c, p in TARGETS.items()}
    assert torch.equal(components["unet"]["mid.norm.weight"], shift.tensors["unet.mid.norm.weight"])


def test_folder_paths(tmp_path):
    assert save(tmp_path) == tmp_path / WEIGHTS_NAME
    nested = tmp_path / "runs" / "final"
    assert save(nested) == nested / WEIGHTS_NAME
    assert read_shift_file(nested).path == nested / WEIGHTS_NAME


@pytest.mark.parametrize("target", ["os.replace", "os.fsync", "safetensors.torch.save"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file(tmp_path, monkeypatch, target, error):
    file = save(tmp_path, deltas(seed=1))
    before = file.read_bytes()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, fail)
    with pytest.raises(ShiftFileError if isinstance(error, OSError) else KeyboardInterrupt) as info:
        save(tmp_path, deltas(seed=2))
    if isinstance(error, OSError):
        assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert file.read_bytes() == before
    assert os.listdir(tmp_path) == [WEIGHTS_NAME]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"dtype": "int4"}, "dtype 'int4' is not one of fp16, fp32, bf16, int8"),
        ({"tensors": {"unet.x.weight": torch.ones(2, 2)}}, "1-D"),
        ({"tensors": {"unet.x.weight": torch.ones(0)}}, "non-empty"),
        ({"tensors": {"unet.x.weight": [1.0]}}, "a shift is a tensor"),
        ({"tensors": {"nodot": torch.ones(2)}}, "<component>.<parameter>"),
        ({"tensors": {"unet.x.weight": torch.tensor([1.0, float("nan")])}}, "non-finite"),
        (
            {"tensors": {"unet.x.weight": torch.tensor([1e6])}},
            "non-finite values (NaN or inf) once stored as fp16",
        ),
        ({"tensors": {"vae.x.weight": torch.ones(2)}}, "fingerprint lacks component vae"),
        ({"fingerprint": {"unet": {"shapes": "3f9a"}}}, "fingerprint of unet needs"),
        ({"fingerprint": {"unet": {"shapes": "3f9a", "probe": [float("nan")]}}}, "fingerprint of unet needs"),
        ({"extra": {"format": "pt"}}, "'format' is reserved"),
        ({"extra": {"callback": object()}}, "'callback' is not JSON-serializable"),
    ],
)
def test_save_refuses_bad_arguments(tmp_path, change, fragment):
    with pytest.raises(ShiftFileError, match=re.escape(fragment)):
        save(tmp_path, **change)
    assert list(tmp_path.iterdir()) == []


# --- bad files ---


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "nope.safetensors", "no such file")


def test_folder_without_file(tmp_path):
    expect_error(tmp_path, str(tmp_path), f"no {WEIGHTS_NAME} in this folder")
    (tmp_path / WEIGHTS_NAME).mkdir()
    expect_error(tmp_path, "not a regular file")


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "not an svdiff shift file (it has no metadata)"),
        ({"format": "pt"}, "not an svdiff shift file (format='pt')"),
        ({"lora_adapter_metadata": "{}"}, "not an svdiff shift file (its metadata has no 'format')"),
    ],
)
def test_foreign_safetensors_file(tmp_path, metadata, fragment):
    file = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"unet.x.lora_A.weight": torch.ones(4, 2)}, file, metadata=metadata)
    expect_error(file, "cannot read", "lora.safetensors", fragment)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format_version": "7"}, "format_version 7 is newer than this svdiff understands (2)"),
        ({"format_version": "one"}, "format_version 'one' is not a positive integer"),
        ({"format_version": "0"}, "format_version '0' is not a positive integer"),
        ({"format_version": None}, "lacks the required key 'format_version'"),
        ({"base_model": None}, "lacks the required key 'base_model'"),
        ({"fingerprint": None}, "lacks the required key 'fingerprint'"),
        ({"preset": None}, "lacks the required key 'preset'"),
        ({"fingerprint": "{not json"}, "fingerprint metadata is not valid JSON"),
        ({"fingerprint": "[1, 2]"}, "fingerprint is not a map of components"),
        ({"fingerprint": '{"unet": 3}'}, "fingerprint of unet needs"),
        ({"fingerprint": json.dumps({"text_encoder": FINGERPRINT["text_encoder"]})}, "lacks component unet"),
    ],
)
def test_bad_metadata(tmp_path, changes, fragment):
    file = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"unet.x.weight": torch.ones(3)}, file, metadata=svdiff_metadata(**changes))
    expect_error(file, fragment)


@pytest.mark.parametrize(
    "name, tensor, fragment",
    [
        ("unet.x.weight", torch.tensor([0.0, float("nan")]), "unet.x.weight has non-finite values"),
        ("unet.x.weight", torch.tensor([float("-inf")], dtype=torch.float16), "unet.x.weight has non-finite"),
        ("unet.x.weight", torch.ones(2, 3), "tensor unet.x.weight has shape [2, 3]; a shift is 1-D"),
        ("unet.x.weight", torch.ones(0), "has shape [0]"),
        ("unet.x.weight", torch.ones(3, dtype=torch.float64), "has dtype F64"),
        ("unet.x.weight", torch.ones(3, dtype=torch.int64), "has dtype I64"),
        ("unet.x.weight", torch.ones(3, dtype=torch.uint8), "has dtype U8"),
        ("unet.x.weight", torch.ones(3, dtype=torch.bool), "has dtype BOOL"),
        ("weight", torch.ones(3), "key weight is not of the form '<component>.<parameter>'"),
    ],
)
def test_bad_tensors(tmp_path, name, tensor, fragment):
    file = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({name: tensor}, file, metadata=svdiff_metadata())
    expect_error(file, fragment)


def test_multi_gigabyte_tensor_in_small_file_is_refused_without_allocating(tmp_path):
    file = tmp_path / "bomb.safetensors"
    declared = {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}
    file.write_bytes(framed({"__metadata__": svdiff_metadata(), "unet.x.weight": declared}, bytes(16)))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expect_error(file, "the tensors span 4294967296 bytes but the data section holds 16")
    # the 4 GiB the header declares were never allocated (the peak resident size grew by less than 100 MiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 100 * 1024


DEEP = [0]
for _ in range(300):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    "entry, fragment",
    [
        (
            {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 8]},
            "data offsets [0, 8] that disagree with its shape",
        ),
        ({"dtype": "F32", "shape": [2, 2**62], "data_offsets": [0, 8]}, "a shift is 1-D"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "has shape [-2]"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "has shape [True]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "disagree with its shape"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "has dtype ['F32']"),
        ({"dtype": "F32", "shape": [2]}, "malformed header entry"),
        (
            {"dtype": "F32", "shape": DEEP, "data_offsets": [0, 4]},
            "has shape [[[[[[[...]]]]]]]; a shift is 1-D",
        ),
    ],
)
def test_absurd_entries(tmp_path, entry, fragment):
    file = tmp_path / "absurd.safetensors"
    file.write_bytes(framed({"__metadata__": svdiff_metadata(), "unet.x.weight": entry}, bytes(8)))
    expect_error(file, "tensor unet.x.weight", fragment)


def test_overlapping_tensors(tmp_path):
    file = tmp_path / "overlap.safetensors"
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    b = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    file.write_bytes(framed({"__metadata__": svdiff_metadata(), "unet.a": a, "unet.b": b}, bytes(8)))
    expect_error(file, "overlaps another tensor or leaves a gap")


@pytest.mark.parametrize("declared", [2**63, 2**64 - 1, 17 * 2**20])
def test_absurd_header_length(tmp_path, declared):
    file = tmp_path / "huge_header.safetensors"
    with file.open("wb") as f:
        f.write(struct.pack("<Q", declared) + b"{}")
        f.truncate(18 * 2**20)  # sparse: big enough that only the 16 MiB header cap refuses 17 MiB
    expect_error(file, f"declared header length {declared} is impossible")


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b"", "too short to be a safetensors file"),
        (struct.pack("<Q", 4) + b"[1] ", "header is not a JSON object"),
        (struct.pack("<Q", 200_000) + b"[" * 200_000, "header is not valid JSON"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not valid JSON"),
        (
            framed({"__metadata__": {**svdiff_metadata(), "seed": 3}}),
            "header metadata is not a map of text to text",
        ),
        (framed({"__metadata__": ["svdiff"]}), "header metadata is not a map of text to text"),
        (struct.pack("<Q", 20) + b'{"a.b": 1, "a.b": 2}', "header is not valid JSON (a key appears twice)"),
    ],
)
def test_malformed_headers(tmp_path, header, fragment):
    file = tmp_path / "malformed.safetensors"
    file.write_bytes(header)
    expect_error(file, fragment)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format": "x" * 10_000_000}, "not an svdiff shift file (format='xxxx"),
        ({"fingerprint": "[" * 5_000_000}, "fingerprint metadata is not valid JSON"),
        ({"format_version": "9" * 10_000_000}, "is not a positive integer"),
    ],
)
def test_huge_hostile_metadata_is_refused_briefly(tmp_path, changes, fragment):
    file = tmp_path / "hostile.safetensors"
    file.write_bytes(framed({"__metadata__": svdiff_metadata(**changes)}))
    expect_error(file, fragment)


def test_huge_or_deep_extra_metadata_is_kept_as_text(tmp_path):
    junk = "[" * 100_000 + "]" * 100_000
    data = torch.ones(1).numpy().tobytes()
    header = {
        "__metadata__": svdiff_metadata(base_model="b" * 10_000_000, junk=junk),
        "unet.x.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    file = tmp_path / "hostile.safetensors"
    file.write_bytes(framed(header, data))
    shift = read_shift_file(file)
    assert shift.metadata["junk"] == junk and len(shift.metadata["base_model"]) == 10_000_000
    assert max(len(line) for line in format_summary(summarize(shift)).splitlines()) < 300


# --- fuzzing: any input ends in a ShiftFile or a short ShiftFileError ---


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    return save(tmp_path_factory.mktemp("valid"), dtype="fp32").read_bytes()


def read_or_refuse(scratch: Path, data: bytes) -> ShiftFile | str:
    """The file read back, or the message it was refused with."""
    scratch.write_bytes(data)
    try:
        return read_shift_file(scratch)
    except ShiftFileError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 400, message
        return message


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@FUZZ
@given(body=st.binary(max_size=2048), frame=st.booleans())
def test_fuzz_random_bytes(scratch, body, frame):
    # Framed bodies carry a plausible header length, so they reach the JSON parser.
    read_or_refuse(scratch, struct.pack("<Q", len(body)) + body if frame else body)


@FUZZ
@given(st.data())
def test_fuzz_truncated(scratch, valid, data):
    length = data.draw(st.integers(0, len(valid) - 1))
    assert isinstance(read_or_refuse(scratch, valid[:length]), str)


@FUZZ
@given(st.data())
def test_fuzz_flipped_header_byte(scratch, valid, data):
    position = data.draw(st.integers(0, header_end(valid) - 1))
    flipped = bytearray(valid)
    flipped[position] ^= data.draw(st.integers(1, 255))
    read_or_refuse(scratch, bytes(flipped))


@FUZZ
@given(st.data())
def test_fuzz_flipped_data_byte(scratch, valid, data):
    position = data.draw(st.integers(header_end(valid), len(valid) - 1))
    flipped = bytearray(valid)
    flipped[position] ^= data.draw(st.integers(1, 255))
    result = read_or_refuse(scratch, bytes(flipped))
    if isinstance(result, str):
        assert "non-finite values" in result or "beyond the bound" in result
    else:
        assert result.metadata["fingerprint"] == FINGERPRINT and result.tensors.keys() == deltas().keys()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["unet.a.weight", "unet.b.weight", "text_encoder.q.weight", "vae.x", "nodot", "", ".x"])
dtypes = st.sampled_from(list(ITEM_SIZES))
counts = st.sampled_from([0, 1, 3, 2**31, 2**62, 2**64]) | st.integers(-3, 2**70)
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | json_values,
        "shape": st.lists(counts, max_size=3) | json_values,
        "data_offsets": st.lists(counts, max_size=3) | json_values,
    }
)
metadata_keys = st.sampled_from(["format", "format_version", "fingerprint", "base_model", "preset", "dtype", "x"])
metadata = json_values | st.builds(
    lambda changes: {**svdiff_metadata(), **changes},
    st.dictionaries(metadata_keys, json_values | st.text(max_size=30) | st.just("1"), max_size=3),
)


@FUZZ
@given(
    meta=metadata,
    tensors=st.dictionaries(names | st.text(max_size=12), entries | json_values, max_size=4),
    data=st.binary(max_size=64),
)
def test_fuzz_hostile_header(scratch, meta, tensors, data):
    read_or_refuse(scratch, framed({"__metadata__": meta, **tensors}, data))


@FUZZ
@given(
    specs=st.lists(st.tuples(names, dtypes, st.sampled_from([1, 2, 5, 2**62]), st.booleans()), max_size=4),
    data=st.data(),
)
def test_fuzz_consistent_offsets(scratch, specs, data):
    """Entries whose offsets agree with their shapes: only dtype, rank, size, names or values can be wrong."""
    header, offset = {"__metadata__": svdiff_metadata()}, 0
    for name, dtype, n, flat in specs:
        size = n * ITEM_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": [n] if flat else [n, 1],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    body = data.draw(st.binary(min_size=offset, max_size=offset) if offset < 4096 else st.binary(max_size=64))
    result = read_or_refuse(scratch, framed(header, body))
    valid_names = len({name for name, *_ in specs}) == len(specs) and all(
        name.split(".")[0] in FINGERPRINT and "." in name for name, *_ in specs
    )
    sound = valid_names and all(d in ("F16", "BF16", "F32") and n < 2**62 and flat for _, d, n, flat in specs)
    if sound:  # random bytes are refused only for their values: non-finite, or beyond the bound of any real δ
        assert isinstance(result, ShiftFile) or "non-finite values" in result or "beyond the bound" in result


# --- applying to a model ---


def test_fingerprint_tolerance():
    assert fingerprint_mismatch(FINGERPRINT, FINGERPRINT) is None
    near = {"unet": {"shapes": "3f9a", "probe": [0.272, -1.41, 3.15]}}
    assert fingerprint_mismatch({"unet": FINGERPRINT["unet"]}, near) is None
    far = {"unet": {"shapes": "3f9a", "probe": [0.3, -1.5, 3.0]}}
    assert fingerprint_mismatch(FINGERPRINT, far) == "unet: weights differ from the base this file was trained on"
    assert fingerprint_mismatch({"a": {"shapes": "", "probe": [0.0]}}, {"a": {"shapes": "", "probe": [5e-5]}}) is None


def test_check_against_accepts_same_base_in_half_precision(tmp_path):
    bf16 = {
        name: {
            "shapes": fp["shapes"],
            "probe": [torch.tensor(x, dtype=torch.bfloat16).item() for x in fp["probe"]],
        }
        for name, fp in FINGERPRINT.items()
    }
    check_against(read_shift_file(save(tmp_path)), TARGETS, bf16)


def test_check_against_accepts_a_subset(tmp_path):
    file = save(tmp_path, {"unet.mid.norm.weight": torch.ones(5)}, fingerprint={"unet": FINGERPRINT["unet"]})
    # The model's text encoder is neither shifted nor fingerprinted by this file: it may be anything.
    check_against(read_shift_file(file), TARGETS, {"unet": FINGERPRINT["unet"]})


@pytest.mark.parametrize(
    "actual, fragment",
    [
        (
            {**FINGERPRINT, "unet": {"shapes": "3f9a", "probe": [0.3, -1.5, 3.0]}},
            "unet: weights differ from the base this file was trained on",
        ),
        (
            {**FINGERPRINT, "text_encoder": {**FINGERPRINT["text_encoder"], "shapes": "0000"}},
            "text_encoder: architecture differs (layer shapes)",
        ),
        ({"unet": FINGERPRINT["unet"]}, "text_encoder: component missing from the base"),
    ],
)
def test_check_against_refuses_another_base(tmp_path, actual, fragment):
    with pytest.raises(ShiftFileError) as info:
        check_against(read_shift_file(save(tmp_path)), TARGETS, actual)
    assert fragment in str(info.value) and "trained on 'tiny-base'" in str(info.value)


@pytest.mark.parametrize(
    "targets, fragment",
    [
        ({**TARGETS, "unet": {"down.0.conv.weight": 8}}, "unknown layer unet.mid.norm.weight"),
        ({**TARGETS, "text_encoder": {}}, "unknown layer text_encoder.q_proj.weight"),
        (
            {**TARGETS, "unet": {"down.0.conv.weight": 16, "mid.norm.weight": 5}},
            "unet.down.0.conv.weight has 8 values, the model expects 16",
        ),
    ],
)
def test_check_against_refuses_layers_the_model_lacks(tmp_path, targets, fragment):
    with pytest.raises(ShiftFileError, match=re.escape(fragment)):
        check_against(read_shift_file(save(tmp_path)), targets, FINGERPRINT)


# --- inspecting ---


def test_summary_ranks_layers_by_rms(tmp_path):
    tensors = {
        "unet.down.0.conv.weight": torch.full((8,), 0.01),
        "unet.mid.norm.weight": torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5]),
        "text_encoder.q_proj.weight": torch.tensor([0.0, 0.0, 0.0, 0.9]),
    }
    file = save(tmp_path, tensors, dtype="fp32", extra={"training_args": {"lr": 0.001}})
    summary = summarize(read_shift_file(file), top=2)
    assert json.loads(json.dumps(summary)) == summary
    assert [layer["key"] for layer in summary["top_layers"]] == [
        "unet.mid.norm.weight",
        "text_encoder.q_proj.weight",
    ]
    assert summary["top_layers"][0] == {"key": "unet.mid.norm.weight", "rms": 0.5, "max_abs": 0.5, "n": 5}
    assert summary["top_layers"][1]["rms"] == pytest.approx(0.45)
    assert summary["components"] == {
        "unet": {"tensors": 2, "values": 13},
        "text_encoder": {"tensors": 1, "values": 4},
    }
    assert (summary["total_values"], summary["size_bytes"]) == (17, file.stat().st_size)
    assert summary["metadata"]["training_args"] == {"lr": 0.001}

    text = format_summary(summary)
    assert "tiny-base" in text and '"lr": 0.001' in text and "17 values" in text
    assert text.index("unet.mid.norm.weight") < text.index("text_encoder.q_proj.weight")
    assert "unet.down.0.conv.weight" not in text
