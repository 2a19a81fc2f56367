"""Shift files on models: load a file onto a pipeline (or any module) after checking it fits the base, save a
model's shift sets, merge files, and change, fuse or remove the shift sets a pipeline holds.

`load_shifts(pipe, path)` is the one way in for users; `attach(components, shift_file)` does the work on a
{component name: module} map, for code that builds its components itself (export, tests).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import SvdiffError
from .format import (
    WEIGHTS_NAME,
    ShiftFile,
    ShiftFileError,
    clip,
    fingerprint_mismatch,
    read_shift_file,
    save_shift_file,
)
from .models import SHIFTED_COMPONENTS, base_name, is_shifted, load_components
from .names import bare_name, checkpoint_name, live_name
from .spectral import (
    add_shifts,
    find_targets,
    fingerprint,
    get_deltas,
    remove_shifts,
    set_deltas,
    shift_sets,
)
from .spectral import fuse as fuse_model
from .spectral import set_scales as set_model_scales
from .spectral import unfuse as unfuse_model
from .spectral.batches import per_sample
from .spectral.shifts import encode_summary, shape_hash

# --- pipelines (a bare nn.Module works too) ---


def components_of(target) -> dict[str, nn.Module]:
    """The components of a diffusers pipeline that carry shifts ({"unet": …, "text_encoder": …}); a bare module
    is its own single component."""
    if isinstance(target, nn.Module):
        return {"model": target}
    parts = getattr(target, "components", None)
    if not isinstance(parts, dict):
        raise SvdiffError(f"expected a diffusers pipeline or a torch module, got {type(target).__name__}")
    return {k: v for k in SHIFTED_COMPONENTS if isinstance(v := parts.get(k), nn.Module) and is_shifted(v)}


def adapter_name_of(path: str | Path) -> str:
    """The name a shift file is loaded under by default: its folder's name for a file with the default name
    (`dog/svdiff_weights.safetensors` → "dog"), else its stem; dots become underscores (ParameterDict keys)."""
    path = Path(path)
    return (path.parent.name if path.name == WEIGHTS_NAME else path.stem).replace(".", "_") or "default"


def load_shifts(target, path: str | Path, adapter_name: str | None = None, scale: float = 1.0, **options) -> str:
    """Attach a shift file to a pipeline under `adapter_name` (default: the file's folder name, or its stem when
    it has its own name) after checking it was made for this base. Several files stay loaded side by side;
    returns the name used. `options` go to `attach` (include, exclude, factor_dtype, cache, progress)."""
    path = Path(path)
    name = adapter_name or adapter_name_of(path)
    if "." in name:  # torch's ParameterDict keys cannot hold one
        raise SvdiffError(f"adapter name {name!r} cannot contain '.'")
    if name in shift_sets_of(target):
        raise SvdiffError(f"a shift set named {name!r} is already loaded; pass another adapter_name")
    shift_file = read_shift_file(path)
    components = components_of(target)
    if isinstance(target, nn.Module):  # a bare module takes the file's one component, whatever its name
        in_file = list(shift_file.components())
        if len(in_file) != 1:
            raise SvdiffError(f"{path} has shifts for {', '.join(in_file)}: load it onto the pipeline")
        components = {in_file[0]: target}
    attach(components, shift_file, name=name, scale=scale, **options)
    return name


def mixed_batch(target, assignment: list[dict[str, float]]):
    """A context in which sample b of each `pipe(...)` call is drawn with the shift sets and scales of
    assignment[b] (e.g. `[{"dog": 1.0}, {"cat": 0.8}]` with two prompts), all in one batch, as PEFT's
    `adapter_names=` does for LoRA. The sets must be loaded (and not fused); use one image per prompt."""
    return per_sample(list(components_of(target).values()), assignment)


def shift_sets_of(target) -> dict[str, float]:
    """{name: scale} of the shift sets loaded on a pipeline or module."""
    out: dict[str, float] = {}
    for model in components_of(target).values():
        out.update(shift_sets(model))
    return out


def set_scales(target, scales: dict[str, float]) -> None:
    """Change the scales of loaded shift sets without reloading or refactorizing (scale 0 = the base)."""
    unknown = set(scales) - set(shift_sets_of(target))
    if unknown:
        raise SvdiffError(f"no shift set named {sorted(unknown)[0]!r} is loaded")
    for model in components_of(target).values():
        set_model_scales(model, scales)


def unload_shifts(target, adapter_name: str | None = None) -> None:
    """Remove one shift set (or all): the base weights come back bit for bit once none is left."""
    for model in components_of(target).values():
        remove_shifts(model, adapter_name)


def fuse(target) -> None:
    """Bake the loaded shifts into the weights (sampling then costs what the base costs)."""
    for model in components_of(target).values():
        fuse_model(model)


def unfuse(target) -> None:
    for model in components_of(target).values():
        unfuse_model(model)


# --- components ---


def attach(
    components: dict[str, nn.Module],
    path: str | os.PathLike | ShiftFile,
    *,
    name: str = "default",
    scale: float = 1.0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    factor_dtype: torch.dtype | None = None,
    cache: bool = True,
    progress: bool = True,
) -> ShiftFile:
    """Attach the shifts of a file to the components it was made for ({"unet": unet, …}), as shift set `name` at
    `scale`, after checking that they are the base it was trained on. `include`/`exclude` regexes (searched in
    the file's keys, e.g. "unet.down_blocks.2") take only part of the file. `path` may be a file already read."""
    shift_file = path if isinstance(path, ShiftFile) else read_shift_file(path)
    targets = {c: {t.name: t.length for t in find_targets(m)} for c, m in components.items()}
    shift_file = with_live_names(shift_file, components, targets)
    prints = {c: base_fingerprint(m) for c, m in components.items()}
    check_against(shift_file, targets, prints, {c: accepted_shapes(m) for c, m in components.items()})
    for component, deltas in shift_file.components().items():
        deltas = {k: v for k, v in deltas.items() if _selected(f"{component}.{k}", include, exclude)}
        if not deltas:
            continue
        model = components[component]
        only = ["^(?:" + "|".join(re.escape(k) for k in deltas) + ")$"]
        add_shifts(
            model,
            include=only,
            name=name,
            scale=scale,
            factor_dtype=factor_dtype,
            cache=cache,
            progress=progress,
        )
        set_deltas(model, deltas, name)
    return shift_file


def save_shifts(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    *,
    base_model: str,
    preset: str,
    name: str = "default",
    dtype: str = "fp16",
    extra: dict | None = None,
) -> Path:
    """Write shift set `name` of each component (e.g. {"unet": unet, "text_encoder": te}) to one shift file."""
    tensors, prints = {}, {}
    for component, model in components.items():
        deltas = get_deltas(model, name)
        if deltas:  # under the published checkpoints' names, whatever version of the model's library is installed
            tensors.update({f"{component}.{checkpoint_name(model, k)}": v for k, v in deltas.items()})
            prints[component] = base_fingerprint(model)
    if not tensors:
        raise ShiftFileError(f"cannot write {path}: the model has no shift set {name!r}")
    return save_shift_file(
        path, tensors, base_model=base_model, fingerprint=prints, preset=preset, dtype=dtype, extra=extra
    )


def with_live_names(shift_file: ShiftFile, components: dict[str, nn.Module], targets: dict) -> ShiftFile:
    """`shift_file` with each key renamed to the parameter of `components` it stands for (see `svdiff.names`)."""
    tensors = {}
    for key, delta in shift_file.tensors.items():
        component, _, param = key.partition(".")
        model = components.get(component)
        live = live_name(model, param, targets[component]) if model is not None else param
        tensors[f"{component}.{live}"] = delta
    return ShiftFile(tensors, shift_file.metadata, shift_file.path)


def _selected(key: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    try:
        keep = not include or any(re.search(p, key) for p in include)
        return keep and not any(re.search(p, key) for p in exclude or [])
    except re.error as e:
        raise SvdiffError(f"bad include/exclude pattern {e.pattern!r}: {e}") from None


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint files record: its architecture hash over the published checkpoints' names, so that it is
    the same whatever version of the model's library is installed."""
    return fingerprint(model, name=lambda n: checkpoint_name(model, n))


def accepted_shapes(model: nn.Module) -> set[str]:
    """The architecture hashes a file made for `model` may carry: over its published names, and over the names
    without their nested level (how files written under a flattening library version spelled them)."""
    return {shape_hash(model, lambda n: checkpoint_name(model, n)), shape_hash(model, lambda n: bare_name(model, n))}


def check_against(
    shift_file: ShiftFile,
    targets: dict[str, dict[str, int]],
    fingerprint: dict,
    shapes: dict[str, set[str]] | None = None,
) -> None:
    """Refuse a file that does not fit the model: another base, a layer it lacks, or a δ of the wrong length.

    `targets` maps component -> parameter -> δ length for the model; a file may cover any subset of it; `shapes`
    as in `fingerprint_mismatch`.
    """
    where = f"cannot load {shift_file.path or 'shift file'}"
    components = shift_file.components()
    # Only components the file shifts must match: a UNet-only file fits a pipeline with any text encoder.
    expected = {name: fp for name, fp in shift_file.metadata["fingerprint"].items() if name in components}
    mismatch = fingerprint_mismatch(expected, fingerprint, shapes)
    if mismatch:
        base = clip(repr(shift_file.metadata.get("base_model")))
        raise ShiftFileError(f"{where}: it was trained on {base}, not on this model ({mismatch})")
    for key, delta in shift_file.tensors.items():
        component, _, param = key.partition(".")
        length = targets.get(component, {}).get(param)
        if length is None:
            raise ShiftFileError(f"{where}: unknown layer {key}")
        if delta.numel() != length:
            raise ShiftFileError(f"{where}: {key} has {delta.numel()} values, the model expects {length}")


# --- files ---


def merge_shift_files(paths: list[str | os.PathLike], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """δ = Σᵢ wᵢ·δᵢ over the union of the files' layers (a layer a file lacks counts as 0), for files made for
    one base. Loading the result at scale 1 equals loading the files at scales wᵢ (Eq. 4; Eq. 5 with α, 1 − α).
    Returns the tensors and the keyword arguments for `save_shift_file`."""
    if len(paths) != len(weights):
        raise SvdiffError(f"{len(paths)} files but {len(weights)} weights")
    files = [read_shift_file(p) for p in paths]
    first = files[0]
    for other in files[1:]:
        shared = {c: fp for c, fp in other.metadata["fingerprint"].items() if c in first.metadata["fingerprint"]}
        mismatch = fingerprint_mismatch(shared, first.metadata["fingerprint"])
        if mismatch:
            raise SvdiffError(f"cannot merge {other.path} with {first.path}: they are for different bases ({mismatch})")
    merged: dict[str, torch.Tensor] = {}
    for f, w in zip(files, weights, strict=True):
        for key, delta in f.tensors.items():
            term = delta.float() * w
            if key in merged and merged[key].shape != term.shape:
                raise SvdiffError(f"cannot merge: {key} has different lengths in the files")
            merged[key] = merged[key] + term if key in merged else term
    fingerprint: dict = {}
    for f in files:
        fingerprint.update(f.metadata["fingerprint"])
    presets = {f.metadata["preset"] for f in files}
    kwargs = {
        "base_model": first.metadata["base_model"],
        "fingerprint": {c: fp for c, fp in fingerprint.items() if any(k.startswith(c + ".") for k in merged)},
        "preset": presets.pop() if len(presets) == 1 else "merged",
        "extra": {"merged_from": [{"file": str(f.path), "weight": w} for f, w in zip(files, weights, strict=True)]},
    }
    return merged, kwargs


def count_targets(base, preset: str, include=None, exclude=None) -> dict:
    """How many shifts a preset trains on a base (a built-in architecture is built on the meta device, never
    downloaded), per component and in all, and the real size of its shift file in fp16, fp32 and int8."""
    components = load_components(base, meta=True)
    report = {"base": base_name(base), "preset": preset, "components": {}}
    tensors = {}
    for component, model in components.items():
        targets = find_targets(model, preset, include, exclude)
        report["components"][component] = {"tensors": len(targets), "values": sum(t.length for t in targets)}
        tensors.update({f"{component}.{t.name}": torch.zeros(t.length) for t in targets})
    report["values"] = sum(c["values"] for c in report["components"].values())
    with tempfile.TemporaryDirectory() as tmp:  # real file sizes: write the (zero) shifts with real metadata
        for dtype in ("fp16", "fp32", "int8"):
            size = 0
            if tensors:
                prints = {  # as long as a real fingerprint: two numbers per target of the component
                    c: {
                        "shapes": "0" * 16,
                        "probe": [-0.012346] * 64,
                        "weights": encode_summary([0.0] * 2 * len(find_targets(m))),
                    }
                    for c, m in components.items()
                }
                path = save_shift_file(
                    f"{tmp}/{dtype}.safetensors",
                    tensors,
                    base_model=report["base"],
                    fingerprint=prints,
                    preset=preset,
                    dtype=dtype,
                )
                size = path.stat().st_size
            report[f"file_bytes_{dtype}"] = size
    return report
