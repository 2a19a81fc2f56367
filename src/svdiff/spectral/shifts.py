"""Wiring spectral shifts into any `nn.Module`: attach, read and write δ, scale, fuse, remove.

A shifted module keeps its class, its attributes and its `weight`; it gains a child `spectral_shift` (the factors
as non-persistent buffers and the δ sets as parameters) and an instance `forward` that routes through it. Removing
the shifts deletes both, so the module is the original object with the original weight.
"""

from __future__ import annotations

import base64
import hashlib
import types
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdiffError
from .basis import SpectralBasis, decompose
from .cache import SVDCache, content_keys
from .layer import SpectralShift
from .targets import find_targets

ATTR = "spectral_shift"


def _shifted_forward(module: nn.Module, x, *args, **kwargs):
    # the shift's forward itself: it has no hooks, and Module.__call__ would cost more than a small layer's op
    return module._modules[ATTR].forward(module, x, *args, **kwargs)


def shifted_modules(model: nn.Module) -> dict[str, tuple[nn.Module, SpectralShift]]:
    """{parameter name of the shifted weight: (module, its SpectralShift)} in module order."""
    out = {}
    for name, module in model.named_modules():
        shift = getattr(module, ATTR, None)
        if isinstance(shift, SpectralShift):
            out[f"{name}.weight" if name else "weight"] = (module, shift)
    return out


def add_shifts(
    model: nn.Module,
    preset: str = "all",
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    name: str = "default",
    scale: float = 1.0,
    factor_dtype: torch.dtype | None = None,
    cache: SVDCache | bool = True,
    progress: bool = True,
) -> dict[str, nn.Parameter]:
    """Attach a zero-initialised shift set `name` to the targets of `model` chosen by `preset`/`include`/`exclude`.

    Returns δ parameters keyed by the model's own weight names (e.g. "down_blocks.0.resnets.0.conv1.weight").
    Calling it again with another `name` adds a second set on the same factors (no new SVD). `factor_dtype`
    (e.g. torch.bfloat16) sets how U and V are held; `cache` reads and writes factors on disk (True: the default
    cache folder, False: never)."""
    _refused_if_fused(model, "adding shifts")
    targets = find_targets(model, preset, include, exclude)
    fresh = [t for t in targets if not isinstance(getattr(t.module, ATTR, None), SpectralShift)]
    matrices = [t.kind.to_matrix(t.module.weight) for t in fresh if not t.kind.is_vector]
    bases = iter(compute_bases(matrices, cache=cache, progress=progress))
    for t in fresh:
        basis = None if t.kind.is_vector else next(bases)
        shift = SpectralShift(t.kind, basis, t.length, factor_dtype)
        t.module.add_module(ATTR, shift.to(t.module.weight.device))
        t.module.forward = types.MethodType(_shifted_forward, t.module)
    params = {}
    for t in targets:
        shift = getattr(t.module, ATTR)
        if name in shift.deltas:
            raise ValueError(f"shift set {name!r} already exists on {t.name}")
        params[t.name] = shift.add_set(name, t.module.weight.device, scale=scale)
    return params


def _refused_if_fused(model: nn.Module, what: str) -> None:
    if any(shift.original is not None for _, shift in shifted_modules(model).values()):
        raise SvdiffError(f"the model is fused: unfuse it before {what}")


def compute_bases(
    matrices: list[torch.Tensor], cache: SVDCache | bool = True, progress: bool = True
) -> list[SpectralBasis]:
    """Factors of each matrix, from the cache where present, else from the SVD engine (then stored)."""
    store = SVDCache() if cache is True else (cache or None)
    if store is None or not matrices or matrices[0].is_meta:
        keys = [None] * len(matrices)
        found: list[SpectralBasis | None] = [None] * len(matrices)
    else:
        keys = content_keys(matrices)
        found = [store.get(k, m) for k, m in zip(keys, matrices, strict=True)]
    missing = [i for i, b in enumerate(found) if b is None]
    computed = []
    if missing:
        with tqdm(total=len(missing), desc="SVD", unit="layer", disable=not progress) as bar:
            computed = decompose([matrices[i] for i in missing], progress=bar.update)
    for i, basis in zip(missing, computed, strict=True):
        found[i] = basis
        if store is not None and keys[i] is not None:
            store.put(keys[i], basis)  # False (and one warning) when the cache folder is full or read-only
    return found  # type: ignore[return-value]


def remove_shifts(model: nn.Module, name: str | None = None) -> None:
    """Undo `add_shifts`: drop shift set `name` (None: every set). A layer left without sets gets its own forward
    back and loses its factors, so with all sets gone the module is the original object with the original weight."""
    for module, shift in shifted_modules(model).values():
        with _unfused(module, shift):
            for n in [name] if name is not None else list(shift.deltas):
                if n in shift.deltas:
                    del shift.deltas[n]
                    shift.scales.pop(n, None)
        if len(shift.deltas) == 0:  # nothing left to fuse, so the weight is the base weight again
            del module._modules[ATTR]
            module.__dict__.pop("forward", None)


def shift_sets(model: nn.Module) -> dict[str, float]:
    """{name: scale} of the shift sets attached to `model`."""
    out: dict[str, float] = {}
    for _, shift in shifted_modules(model).values():
        out.update(shift.scales)
    return out


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Set the scale of named shift sets (no refactorization); a fused model is re-fused with the new scales."""
    for module, shift in shifted_modules(model).values():
        with _unfused(module, shift):
            for name, s in scales.items():
                if name in shift.scales:
                    shift.scales[name] = float(s)


@torch.no_grad()
def fuse(model: nn.Module) -> None:
    """Bake the current shifts into the weights, so sampling costs exactly what the base does (fused layers run
    their own forward; their δ no longer gets gradients). The base weights are kept on the CPU so `unfuse`
    restores them bit for bit."""
    for module, shift in shifted_modules(model).values():
        _unfuse_one(module, shift)
        _fuse_one(module, shift)


@torch.no_grad()
def unfuse(model: nn.Module) -> None:
    for module, shift in shifted_modules(model).values():
        _unfuse_one(module, shift)


@contextmanager
def _unfused(module: nn.Module, shift: SpectralShift):
    """The layer unfused while its shifts are edited, and fused again afterwards if it was."""
    fused = shift.original is not None
    _unfuse_one(module, shift)
    yield
    if fused:
        _fuse_one(module, shift)


@torch.no_grad()
def _fuse_one(module: nn.Module, shift: SpectralShift) -> None:
    d = shift.diagonal_change()
    if d is None:
        return
    w = module.weight
    shift.original = w.detach().to("cpu", copy=True)
    w.copy_(w + shift.delta_weight(d, w))
    module.__dict__.pop("forward", None)  # the layer's own forward on the fused weight: no overhead at all


@torch.no_grad()
def _unfuse_one(module: nn.Module, shift: SpectralShift) -> None:
    if shift.original is not None:
        module.weight.copy_(shift.original)
        shift.original = None
        module.forward = types.MethodType(_shifted_forward, module)


def get_deltas(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{weight name: δ} of shift set `name`."""
    return {k: s.deltas[name].detach() for k, (_, s) in shifted_modules(model).items() if name in s.deltas}


@torch.no_grad()
def set_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy δ values into an existing shift set (creating the set where a shifted layer lacks it)."""
    _refused_if_fused(model, "changing its shifts")
    shifted = shifted_modules(model)
    for key, value in deltas.items():
        module, shift = shifted[key]
        if name not in shift.deltas:
            shift.add_set(name, module.weight.device)
        shift.deltas[name].copy_(value.to(shift.deltas[name].device, torch.float32))


def shape_hash(model: nn.Module, name: Callable[[str], str] | None = None) -> str:
    """A hash of every target's name (as `name` spells it) and shape: the architecture, not the weights."""
    spell = name or (lambda n: n)
    text = "".join(f"{spell(t.name)}:{tuple(t.module.weight.shape)};" for t in find_targets(model))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, probes: int = 16, name: Callable[[str], str] | None = None) -> dict:
    """An identity card of a base model, compared with a tolerance so its fp16/bf16 copies match:

    - `shapes`: `shape_hash` of every target's name, spelled by `name` (the caller's stable names), and shape;
    - `weights`: two numbers per target, in `find_targets` order — the mean |w| (all of the weight) and its middle
      value — so a base with any one layer replaced is another base; stored as base64 of little-endian float16
      pairs (2.6 kB for SD 1.5's 490 targets: far finer than the comparison's tolerance, and small in a header);
    - `probe`: four values of each of `probes` layers spread across the model, what files written before
      `weights` existed compare; still written so that their readers accept new files.
    """
    targets = find_targets(model)
    weights = [_base_weight(t.module).detach() for t in targets]
    probe: list[float] = []
    summary: list[float] = []
    if weights and not weights[0].is_meta:
        matrices = [w.reshape(-1) for w in weights if w.ndim >= 2]
        for flat in matrices[:: max(1, len(matrices) // probes)][:probes]:
            n = flat.numel()
            probe += [float(flat[i]) for i in (0, n // 3, 2 * n // 3, n - 1)]
        for w in weights:
            flat = w.reshape(-1)
            # float32 accumulation (torch sums in blocks): 8× faster than float64, errors far below the tolerance
            mean_abs = float(torch.linalg.vector_norm(flat, 1, dtype=torch.float32)) / max(1, flat.numel())
            summary += [mean_abs, float(flat[flat.numel() // 2])]
    return {"shapes": shape_hash(model, name), "probe": probe, "weights": encode_summary(summary)}


def encode_summary(values: list[float]) -> str:
    """Numbers as base64 of little-endian float16 (clamped to its range; NaN written as 0)."""
    half = torch.tensor(values, dtype=torch.float64).nan_to_num(0.0).clamp(-65504, 65504).to(torch.float16)
    return base64.b64encode(half.numpy().astype("<f2").tobytes()).decode()


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The module's base weight, also while shifts are fused into it."""
    shift = getattr(module, ATTR, None)
    fused = isinstance(shift, SpectralShift) and shift.original is not None
    return shift.original if fused else module.weight
