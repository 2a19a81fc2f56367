"""Shift files of svdiff-pytorch (mkshing/svdiff-pytorch, the widely used earlier implementation), read into
svdiff's format.

Its trainer writes `spectral_shifts.safetensors` (UNet) and `spectral_shifts_te.safetensors` (text encoder):
float32 tensors keyed `<module path>.delta`, no metadata, text encoder paths with `text_model.` (transformers 4).
Its layers (svdiff_pytorch/layers.py) reshape a conv kernel c_out × (c_in·kh·kw), take `torch.linalg.svd`
(singular values descending, as svdiff's engine orders them) and run with U·diag(ReLU(σ + δ))·Vᵀ, so a matrix δ
is svdiff's δ as it is. A norm weight w is treated as the 1 × N matrix whose one singular value is ‖w‖, so it has
a single δ that rescales the whole vector: w' = w·ReLU(‖w‖ + δ)/‖w‖, which is exactly svdiff's full-length
additive shift w·(ReLU(‖w‖ + δ)/‖w‖ − 1) (at scale 1: their scale multiplies δ inside the ReLU).

The files name no base, so the base is the one given (default: the embedded one); every key must be a layer of it
with a δ of the length its reshape gives, or the import stops and says which convention does not fit.
"""

from __future__ import annotations

import math
from pathlib import Path

import safetensors
import torch
from torch import nn

from .adapters import base_fingerprint
from .errors import SvdiffError
from .format import save_shift_file
from .models import base_name, load_components
from .names import checkpoint_name, live_name
from .spectral import find_targets
from .spectral.kinds import Conv

FILES = {"spectral_shifts.safetensors": "unet", "spectral_shifts_te.safetensors": "text_encoder"}


def _files(paths: list[str | Path]) -> dict[str, Path]:
    """{component: file} from files or folders holding svdiff-pytorch's file names."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        candidates = [path / name for name in FILES if (path / name).is_file()] if path.is_dir() else [path]
        if path.is_dir() and not candidates:
            raise SvdiffError(f"{path} holds neither {' nor '.join(FILES)}")
        for file in candidates:
            if not file.is_file():
                raise SvdiffError(f"{file}: no such file")
            component = FILES.get(file.name, "text_encoder" if file.stem.endswith("_te") else "unet")
            if component in found:
                raise SvdiffError(f"two files for the {component}: {found[component]} and {file}")
            found[component] = file
    return found


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(file), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # not safetensors at all: one line
        raise SvdiffError(f"cannot read {file}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    for key, value in tensors.items():
        if not key.endswith(".delta") or value.dim() != 1 or not value.is_floating_point():
            raise SvdiffError(f"{file} is not an svdiff-pytorch shift file: {key} is not a 1-D <module>.delta")
        if not torch.isfinite(value).all():
            raise SvdiffError(f"{file}: {key} has non-finite values")
    return tensors


def _mismatch(key: str, got: int, module: nn.Module, kind, want: int) -> str:
    shape = tuple(module.weight.shape)
    if kind.is_vector:
        why = (
            "a full-length norm shift, not svdiff-pytorch's one scalar per norm"
            if got == shape[0]
            else "svdiff-pytorch gives a norm one scalar"
        )
    elif isinstance(kind, Conv) and got == min(shape[0] * math.prod(shape[2:]), shape[1]):
        why = "it fits a (c_out·k·k) × c_in reshape (svdiff-kohya's), not the c_out × c_in·k·k one"
    else:
        why = "another architecture's layer"
    return f"{key} has {got} values but the base's {shape} weight takes {want}: {why}"


@torch.no_grad()
def convert(tensors: dict[str, torch.Tensor], component: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """svdiff δ (`<component>.<published parameter name>`) of one svdiff-pytorch file, for `model`."""
    targets = {t.name: t for t in find_targets(model)}
    out = {}
    for key, delta in tensors.items():
        name = live_name(model, key.removesuffix(".delta") + ".weight", targets)
        target = targets.get(name)
        if target is None:
            raise SvdiffError(f"the base's {component} has no layer {key.removesuffix('.delta')}: another base?")
        want = 1 if target.kind.is_vector else target.length
        if delta.numel() != want:
            raise SvdiffError(_mismatch(key, delta.numel(), target.module, target.kind, want))
        delta = delta.double()
        if target.kind.is_vector:
            w = target.module.weight.double()
            norm = w.norm()
            delta = w * (torch.relu(norm + delta) / norm - 1) if norm > 0 else torch.zeros_like(w)
        out[f"{component}.{checkpoint_name(model, name)}"] = delta.float()
    return out


def import_svdiff_pytorch(
    paths: list[str | Path], output: str | Path, *, base: str | Path | None = None, dtype: str = "fp32"
) -> dict:
    """Write svdiff-pytorch's file(s) (or their folder) as one svdiff shift file for `base`; returns a report."""
    files = _files(paths)
    components = load_components(base)
    tensors, counts = {}, {}
    for component, file in files.items():
        if component not in components:
            raise SvdiffError(f"the base has no {component} for {file}")
        converted = convert(_read(file), component, components[component])
        if not converted:
            raise SvdiffError(f"{file} holds no shifts")
        tensors |= converted
        counts[component] = len(converted)
    written = save_shift_file(
        output,
        tensors,
        base_model=base_name(base),
        fingerprint={c: base_fingerprint(components[c]) for c in files},
        preset="all",
        dtype=dtype,
        extra={"imported_from": {c: str(f) for c, f in files.items()}, "imported_format": "svdiff-pytorch"},
    )
    return {"output": str(written), "layers": counts, "bytes": written.stat().st_size}
