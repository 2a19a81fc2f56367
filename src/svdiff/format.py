"""The shift-file format: one safetensors file of spectral shifts δ, plus metadata naming the base model they fit.

Keys are `<component>.<parameter name>` (`unet.down_blocks.0.resnets.0.conv1.weight`), values 1-D δ. Shift
files are shared between people, so reading checks the whole header itself (sizes, offsets, dtypes, metadata)
before safetensors sees a byte, and every problem ends in one `ShiftFileError` line that names the file. Pure:
the standard library, torch and safetensors only; putting files on models is `svdiff.adapters`'s job.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import json
import math
import os
import re
import reprlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import SvdiffError
from .files import write_atomic

WEIGHTS_NAME = "svdiff_weights.safetensors"
FORMAT, FORMAT_VERSION = "svdiff", 2
# int8: δ of each layer rounded to 127 steps of its own largest |δ| (the scale is stored beside it, in float32).
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
REQUIRED_KEYS = ("format", "format_version", "base_model", "fingerprint", "preset")
# Metadata kept as plain text; every other key is JSON (callers' extras are written as JSON).
TEXT_KEYS = frozenset({"format", "base_model", "preset", "svdiff_version", "dtype", "key_table"})
RESERVED_KEYS = TEXT_KEYS | {"format_version", "fingerprint"}

# An SDXL shift file with every target is a few MB. These bounds are far above any real file and keep a
# hostile one from costing more than its header in memory and time.
MAX_HEADER_BYTES = 16 * 2**20
MAX_FILE_BYTES = 4 * 2**30
_ITEM_SIZES = {"F16": 2, "BF16": 2, "F32": 4}
# Layout of version 2: one tensor `<component>.delta` per component, every layer's δ end to end in the order of
# the key table, a metadata entry that names the layers and their lengths (JSON, zlib-compressed, base64: the
# names cost a tenth of an SD 1.5 file written one tensor per layer); int8 files add `<component>.scale`.
PACKED_SIZES = _ITEM_SIZES | {"I8": 1}
# Loose enough that the same base loaded in fp16 or bf16 matches its fp32 fingerprint; another base does not.
PROBE_RTOL, PROBE_ATOL = 2e-2, 1e-4
# A layer's mean |w| moves by far less under fp16/bf16 rounding (unbiased, averaged over the whole weight).
MEAN_ABS_RTOL = 5e-3


# Bounded depth and length: a deeply nested JSON value from a file must not overflow the stack in a message.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


class ShiftFileError(SvdiffError):
    """A shift file that cannot be written, read or applied; the message names the file and its problem."""


class _ContentError(Exception):
    """A problem in a file's content or in an argument; the public functions turn it into a `ShiftFileError` that
    names the file."""


@dataclass
class ShiftFile:
    """δ per `<component>.<parameter>` key, in the stored dtype, and the decoded metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    path: Path | None = None

    def components(self) -> dict[str, dict[str, torch.Tensor]]:
        """δ grouped by component: `{"unet": {"down_blocks.0.resnets.0.conv1.weight": δ, ...}, ...}`."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, delta in self.tensors.items():
            component, _, param = key.partition(".")
            grouped.setdefault(component, {})[param] = delta
        return grouped


# --- writing ---


def save_shift_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    base_model: str,
    fingerprint: dict,
    preset: str,
    dtype: str = "fp16",
    extra: dict | None = None,
) -> Path:
    """Write δ and metadata so that readers see either the old file or the new one, never a partial one.

    `path` is a `.safetensors` file, or a folder (created if needed) that receives `WEIGHTS_NAME`. Values of
    `extra` may be anything JSON holds; `read_shift_file` gives them back as given. Returns the file written.
    """
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() or path.suffix != ".safetensors" else path
    try:
        prepared = _prepare(tensors, dtype)
        metadata = _encode_metadata(base_model, fingerprint, preset, dtype, extra or {})
        _check_coverage(prepared, fingerprint)
        packed, metadata["key_table"] = _pack(prepared, dtype)
        metadata["fingerprint"] = _deflate(metadata["fingerprint"])  # two numbers per layer: a third of it, packed
        write_atomic(file, safetensors.torch.save(packed, metadata))
    except _ContentError as e:
        raise ShiftFileError(f"cannot write {file}: {e}") from None
    except OSError as e:
        raise ShiftFileError(f"cannot write {file}: {e.strerror or e}") from None
    return file


def _prepare(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in DTYPES:
        raise _ContentError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    prepared = {}
    for key, value in tensors.items():
        _split_key(key)
        if not isinstance(value, torch.Tensor):
            raise _ContentError(f"{key}: a shift is a tensor, got {type(value).__name__}")
        if not (value.is_floating_point() and value.dim() == 1 and value.numel()):
            got = f"{list(value.shape)} {value.dtype}"
            raise _ContentError(f"{key}: a shift is a non-empty 1-D float tensor, got {got}")
        # A copy per key: safetensors refuses tensors that share memory, and the caller keeps its own.
        stored = torch.float32 if dtype == "int8" else DTYPES[dtype]  # int8 is rounded per layer in `_pack`
        delta = value.detach().to(device="cpu", dtype=stored, copy=True)
        if not torch.isfinite(delta).all():
            raise _ContentError(f"{key} has non-finite values (NaN or inf) once stored as {dtype}")
        check_shift_bound({key: delta})
        prepared[key] = delta
    return prepared


def _pack(prepared: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], str]:
    """The version 2 layout of `prepared` (see PACKED_SIZES): its tensors and the encoded key table."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, delta in prepared.items():
        component, param = _split_key(key)
        groups.setdefault(component, []).append((param, delta))
    packed, table = {}, {}
    for component, layers in groups.items():
        table[component] = [[param, delta.numel()] for param, delta in layers]
        if dtype == "int8":
            scales = torch.stack([delta.abs().max() / 127 for _, delta in layers])
            steps = [(delta / s).round() if s > 0 else delta for (_, delta), s in zip(layers, scales, strict=True)]
            packed[f"{component}.delta"] = torch.cat(steps).clamp(-127, 127).to(torch.int8)
            packed[f"{component}.scale"] = scales
        else:
            packed[f"{component}.delta"] = torch.cat([delta for _, delta in layers])
    return packed, _deflate(json.dumps(table, separators=(",", ":")))


def _deflate(text: str) -> str:
    """How version 2 stores its long metadata entries (key table, fingerprint): zlib-compressed, base64."""
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode()


def _inflate(text: Any, key: str) -> str:
    """The text of a `_deflate`d entry; its size is bounded before it is inflated, so a hostile entry costs no more
    than a header may."""
    if not isinstance(text, str):
        raise _ContentError(f"metadata lacks the required key {key!r}")
    try:
        inflater = zlib.decompressobj()
        plain = inflater.decompress(base64.b64decode(text, validate=True), MAX_HEADER_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("truncated, or larger than a header may be")
        return plain.decode("utf-8")
    except (ValueError, zlib.error) as e:
        raise _ContentError(f"{key} is not valid ({clip(str(e))})") from None


def _encode_metadata(base_model: str, fingerprint: dict, preset: str, dtype: str, extra: dict) -> dict:
    if not (isinstance(base_model, str) and isinstance(preset, str)):
        raise _ContentError("base_model and preset must be text")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_model": base_model,
        "fingerprint": json.dumps(_check_fingerprint(fingerprint), sort_keys=True),
        "preset": preset,
        "svdiff_version": _svdiff_version(),
        "dtype": dtype,
    }
    for key, value in extra.items():
        if not isinstance(key, str) or key in RESERVED_KEYS or key == "":
            raise _ContentError(f"extra metadata key {key!r} is reserved or not text")
        try:
            metadata[key] = json.dumps(value)
        except (TypeError, ValueError) as e:
            raise _ContentError(f"extra metadata {key!r} is not JSON-serializable ({e})") from None
    return metadata


@functools.cache
def _svdiff_version() -> str:
    # The installed distribution's version: the package's own `__version__` would import all of svdiff.
    return importlib.metadata.version("svdiff")


# --- reading ---


def read_shift_file(path: str | os.PathLike) -> ShiftFile:
    """Read and check a shift file, or a folder holding `WEIGHTS_NAME`; any defect raises `ShiftFileError`."""
    file = Path(path)
    try:
        if file.is_dir():
            if not (file / WEIGHTS_NAME).exists():
                raise _ContentError(f"no {WEIGHTS_NAME} in this folder")
            file = file / WEIGHTS_NAME
        metadata, data = _read_checked(file)
        tensors = _load(data)
        if metadata["format_version"] >= 2:
            tensors = _unpack(tensors, metadata.pop("key_table"))
        check_shift_bound(tensors)
    except _ContentError as e:
        raise ShiftFileError(f"cannot read {file}: {e}") from None
    except OSError as e:
        raise ShiftFileError(f"cannot read {file}: {e.strerror or e}") from None
    return ShiftFile(tensors, metadata, file)


def _read_checked(file: Path) -> tuple[dict[str, Any], bytes]:
    """Metadata and bytes of the file; the header is checked before the data is read, so junk costs little."""
    if not file.is_file():
        raise _ContentError("not a regular file" if file.exists() else "no such file")
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _ContentError(f"{size} bytes is far too big for a shift file")
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _ContentError("too short to be a safetensors file")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise _ContentError(f"declared header length {header_len} is impossible for a file of {size} bytes")
        header_bytes = f.read(header_len)
        header = _parse_header(header_bytes)
        metadata = _decode_metadata(header.pop("__metadata__", None))
        data_len = size - 8 - header_len
        packed = metadata["format_version"] >= 2
        _check_entries(header, data_len, PACKED_SIZES if packed else _ITEM_SIZES)
        if packed:
            metadata["key_table"] = _decode_key_table(metadata.get("key_table"))
            _check_packed(header, metadata)
        _check_coverage(metadata["key_table"] if packed else header, metadata["fingerprint"])
        body = f.read(data_len + 1)
    if len(header_bytes) != header_len or len(body) != data_len:
        raise _ContentError("the file changed while it was being read")
    return metadata, head + header_bytes + body


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise _ContentError(f"header is not valid JSON ({clip(str(e))})") from None
    if not isinstance(header, dict):
        raise _ContentError("header is not a JSON object")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, safetensors may not: refuse rather than guess which one counts.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice")
    return obj


def _decode_metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        raise _ContentError("not an svdiff shift file (it has no metadata)")
    if not isinstance(raw, dict) or not all(isinstance(value, str) for value in raw.values()):
        raise _ContentError("header metadata is not a map of text to text")
    if "format" not in raw:
        raise _ContentError("not an svdiff shift file (its metadata has no 'format')")
    if raw["format"] != FORMAT:
        raise _ContentError(f"not an svdiff shift file (format={clip(repr(raw['format']))})")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise _ContentError(f"metadata lacks the required key {key!r}")
    metadata: dict[str, Any] = {}
    version = _decode_version(raw["format_version"])
    for key, value in raw.items():
        if key == "format_version":
            metadata[key] = version
        elif key == "fingerprint":
            metadata[key] = _decode_fingerprint(_inflate(value, key) if version >= 2 else value)
        elif key in TEXT_KEYS:
            metadata[key] = value
        else:
            metadata[key] = _json_or_text(value)
    return metadata


def _decode_version(text: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]{0,8}", text):
        raise _ContentError(f"format_version {clip(repr(text))} is not a positive integer")
    version = int(text)
    if version > FORMAT_VERSION:
        raise _ContentError(f"format_version {version} is newer than this svdiff understands ({FORMAT_VERSION})")
    return version


def _decode_fingerprint(text: str) -> dict[str, dict[str, Any]]:
    try:
        fingerprint = json.loads(text)
    except (ValueError, RecursionError):
        raise _ContentError("fingerprint metadata is not valid JSON") from None
    return _check_fingerprint(fingerprint)


def _json_or_text(text: str) -> Any:
    # Extras written by svdiff are JSON; other tools may have added plain text, which is kept as it is.
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _check_fingerprint(fingerprint: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(fingerprint, dict):
        raise _ContentError("fingerprint is not a map of components")
    for component, entry in fingerprint.items():
        probe = entry.get("probe") if isinstance(entry, dict) else None
        if not (
            isinstance(component, str)
            and isinstance(entry, dict)
            and isinstance(entry.get("shapes"), str)
            and isinstance(probe, list)
            and all(_is_finite_number(x) for x in probe)
            and ("weights" not in entry or _summary(entry["weights"]) is not None)
        ):
            raise _ContentError(f"fingerprint of {clip(component)} needs 'shapes' text and a 'probe' of numbers")
    return fingerprint


def _summary(text: Any) -> list[float] | None:
    """A fingerprint's per-target numbers (base64 of little-endian float16 pairs), or None if malformed."""
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b"x"
    except ValueError:
        return None
    if len(raw) % 4:
        return None
    values = torch.frombuffer(bytearray(raw), dtype=torch.float16).tolist() if raw else []
    return values if all(math.isfinite(v) for v in values) else None


def _check_entries(entries: dict[str, Any], data_len: int, sizes: dict[str, int] = _ITEM_SIZES) -> None:
    """safetensors' rules plus ours (non-empty 1-D tensors of `sizes`' dtypes): past this, loading allocates only
    the data."""
    spans = []
    for name, entry in entries.items():
        _split_key(name)
        label = clip(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _ContentError(f"tensor {label} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(dtype, str) and dtype in sizes):
            *most, last = sizes
            raise _ContentError(
                f"tensor {label} has dtype {clip(dtype)}; shifts are stored as {', '.join(most)} or {last}"
            )
        if not (isinstance(shape, list) and len(shape) == 1 and _is_count(shape[0]) and shape[0] > 0):
            raise _ContentError(f"tensor {label} has shape {clip(shape)}; a shift is 1-D and not empty")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(x) for x in offsets)
            and offsets[1] - offsets[0] == shape[0] * sizes[dtype]
        ):
            raise _ContentError(f"tensor {label} has data offsets {clip(offsets)} that disagree with its shape")
        spans.append((offsets[0], offsets[1], label))
    end = 0
    for begin, stop, label in sorted(spans):
        if begin != end:
            raise _ContentError(f"tensor {label} overlaps another tensor or leaves a gap in the data")
        end = stop
    if end != data_len:
        raise _ContentError(f"the tensors span {end} bytes but the data section holds {data_len}")


def _decode_key_table(text: Any) -> dict[str, list[list]]:
    """{component: [[parameter, δ length], ...]} of a version 2 file, checked."""
    try:
        table = json.loads(_inflate(text, "key_table"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise _ContentError(f"key_table is not valid ({clip(str(e))})") from None
    if not (isinstance(table, dict) and table):
        raise _ContentError("key_table is not a map of components")
    for component, layers in table.items():
        if not (component and "." not in component and isinstance(layers, list) and layers):
            raise _ContentError(f"key_table entry {clip(component)} is not a component with a list of layers")
        seen = set()
        for layer in layers:
            if not (isinstance(layer, list) and len(layer) == 2 and isinstance(layer[0], str) and layer[0]):
                raise _ContentError(f"key_table of {clip(component)} has a malformed layer {clip(layer)}")
            if not (_is_count(layer[1]) and layer[1] > 0):
                raise _ContentError(f"key_table gives {clip(layer[0])} the length {clip(layer[1])}")
            if layer[0] in seen:
                raise _ContentError(f"key_table of {clip(component)} names {clip(layer[0])} twice")
            seen.add(layer[0])
    return table


def _check_packed(entries: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The tensors of a version 2 file are exactly those its key table and dtype call for, of matching sizes."""
    table, quantized = metadata["key_table"], metadata.get("dtype") == "int8"
    expected = {f"{c}.delta" for c in table} | ({f"{c}.scale" for c in table} if quantized else set())
    if set(entries) != expected:
        name = sorted(set(entries) ^ expected)[0]
        raise _ContentError(f"tensor {clip(name)} is {'missing' if name in expected else 'not in the key table'}")
    for component, layers in table.items():
        delta = entries[f"{component}.delta"]
        if delta["shape"][0] != sum(length for _, length in layers):
            raise _ContentError(f"{clip(component)}.delta does not hold the values its key_table lists")
        if (delta["dtype"] == "I8") != quantized:
            raise _ContentError(
                f"{clip(component)}.delta is {delta['dtype']}, the metadata says {clip(metadata.get('dtype'))}"
            )
        scale = entries.get(f"{component}.scale")
        if scale is not None and (scale["dtype"] != "F32" or scale["shape"][0] != len(layers)):
            raise _ContentError(f"{clip(component)}.scale is not one float32 per layer")


def _unpack(tensors: dict[str, torch.Tensor], table: dict[str, list[list]]) -> dict[str, torch.Tensor]:
    out = {}
    for component, layers in table.items():
        names, lengths = zip(*layers, strict=True)
        pieces = tensors[f"{component}.delta"].split(list(lengths))
        scales = tensors.get(f"{component}.scale")
        if scales is not None and (scales < 0).any():
            raise _ContentError(f"{clip(component)}.scale has a negative scale")
        for i, (name, piece) in enumerate(zip(names, pieces, strict=True)):
            out[f"{component}.{name}"] = piece.float() * scales[i] if scales is not None else piece.clone()
    return out


# The largest |δ| a shift file may hold. Adam moves each δ by about the learning rate per step, so a run at the
# default 1e-3 reaches ~0.5 in 500 steps, and a merge of files with weights up to 100 stays far below this; a
# value beyond it only turns the layer into noise (and fp16 ends at 65504).
MAX_SHIFT = 1000.0


def check_shift_bound(tensors: dict[str, torch.Tensor]) -> None:
    """Refuses δ beyond ±MAX_SHIFT: called on every file read and before every write."""
    for key, delta in tensors.items():
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        if not peak <= MAX_SHIFT:
            raise _ContentError(
                f"{clip(key)} holds |δ| = {peak:g}, beyond the bound {MAX_SHIFT:g} of any trained shift"
            )


def _check_coverage(keys: Any, fingerprint: dict) -> None:
    # Every component with shifts must be fingerprinted, or a wrong base could go unnoticed.
    for key in keys:
        component = key.partition(".")[0]
        if component not in fingerprint:
            raise _ContentError(f"the fingerprint lacks component {clip(component)} of {clip(key)}")


def _load(data: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # The header passed our checks; anything safetensors still refuses is bad too.
        raise _ContentError(f"safetensors refused it ({clip(str(e))})") from None
    for key, delta in tensors.items():
        if not torch.isfinite(delta).all():
            raise _ContentError(f"{clip(key)} has non-finite values (NaN or inf)")
    return tensors


def _split_key(key: Any) -> tuple[str, str]:
    component, _, param = key.partition(".") if isinstance(key, str) else ("", "", "")
    if not (component and param):
        raise _ContentError(f"key {clip(key)} is not of the form '<component>.<parameter>'")
    return component, param


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_finite_number(x: Any) -> bool:
    # The bound also refuses JSON integers too big to become floats, which would overflow in comparisons.
    return isinstance(x, int | float) and not isinstance(x, bool) and abs(x) < 1e300


def clip(value: Any, limit: int = 80) -> str:
    """A value from a file, shown in a message: one line of bounded length, whatever the file holds."""
    text = value if isinstance(value, str) and value.isprintable() else _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- comparing fingerprints ---


def fingerprint_mismatch(expected: dict, actual: dict, shapes: dict[str, set[str]] | None = None) -> str | None:
    """The first component of `expected` that `actual` does not match, in one line; None if all match. `shapes`
    gives, per component, every architecture hash that stands for `actual`'s (default: its own)."""
    for component, want in expected.items():
        have = actual.get(component)
        if have is None:
            return f"{component}: component missing from the base"
        if want["shapes"] not in (shapes or {}).get(component, {have["shapes"]}):
            return f"{component}: architecture differs (layer shapes)"
        if not _probes_close(want, have):
            return f"{component}: weights differ from the base this file was trained on"
    return None


def _probes_close(want: dict, have: dict) -> bool:
    """Every target's summary (mean |w|, middle value) where both fingerprints have them; the 16-layer probe of a
    file written before per-target summaries existed."""
    if want.get("weights") and have.get("weights"):
        a, b = _summary(want["weights"]), _summary(have["weights"])
        return len(a) == len(b) and all(
            _close(x, y, MEAN_ABS_RTOL, 0.0) if i % 2 == 0 else _close(x, y, PROBE_RTOL, PROBE_ATOL)
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    a, b = want["probe"], have["probe"]
    return len(a) == len(b) and all(_close(x, y, PROBE_RTOL, PROBE_ATOL) for x, y in zip(a, b, strict=True))


def _close(want: float, have: float, rtol: float, atol: float) -> bool:
    return abs(want - have) <= atol + rtol * abs(want)
