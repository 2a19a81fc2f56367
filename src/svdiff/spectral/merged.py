"""Training spectral shifts merged once per optimizer step, in shape groups: the fast path where per-call overhead
dominates (GPUs).

Per-call layers (`layer.py`) apply each target's update inside an autograd Function of their own: cheap in FLOPs,
but every layer then issues a tail of small kernels and Python, which on a GPU costs more than the arithmetic.
Here, for one component (a UNet, a text encoder, a transformer):

- every δ of the component lives in one flat parameter per learning rate (matrices, 1-D norm scales); each
  target's δ parameter is a view of it (sharing its version counter), so shift files, `get_deltas` and
  checkpoints see per-target δ exactly as before, and the optimizer steps a handful of tensors;
- targets are grouped by weight shape; once per optimizer step (when the flat parameter has changed) every
  group's merged weights are built at once: W′ = W + (U·diag(d))·Vᵀ for matrices in one `baddbmm`, w′ = w + δ
  for norm scales in one add, with d = ReLU(σ + δ) − σ for every target in one pass over the flat parameter;
- each layer runs its stock op on its view of W′. W′ is a leaf, so autograd gives each layer's weight gradient G;
  when a group's gradients are complete (a hook on W′), δ's gradient diag(Uᵀ·G·V), through the ReLU, is added
  to the flat gradient in one batched product and G is freed. The micro-batches of a gradient accumulation add
  up there, since the gradient is linear in G;
- a group may stay on the per-call path instead, where that measures faster (`StepPath.AUTO` times both on the
  device before the first step, as cudnn.benchmark does); its δ gradients accumulate straight into the flat
  gradient's storage.

With δ = 0, d = 0 and W′ = W + 0 is W bit for bit. A merged group's weights (and factors) become views of its
stacked tensors, copied one layer at a time, so merging holds one extra copy of the weights (W′), not two, plus
each group's weight gradients from its first layer's backward to its last; a per-call group stacks nothing.
Since the wiring holds views, it is made once the model has its final device and dtype; casting, moving, fusing or
removing shifts afterwards needs `close()` first.
"""

from __future__ import annotations

import logging
import statistics
import time
import types
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn

from .kinds import Conv, Embedding, Linear, Norm
from .layer import SpectralShift
from .shifts import _shifted_forward, shifted_modules

log = logging.getLogger(__name__)


def _stack_in_place(owners: list, attr: str) -> torch.Tensor:
    """The owners' tensors `attr` (weights, factors) stacked into one k × shape tensor, each owner's tensor becoming
    its view as soon as it is copied, so its own storage is freed before the next is copied: a group's tensors are
    never held twice, as a plain stack would hold them for a moment. A parameter keeps its identity."""
    first = getattr(owners[0], attr)
    stack = torch.empty((len(owners), *first.shape), dtype=first.dtype, device=first.device)
    for i, owner in enumerate(owners):
        tensor = getattr(owner, attr)
        stack[i].copy_(tensor.detach())
        if isinstance(tensor, nn.Parameter):
            tensor.data = stack[i]
        else:
            setattr(owner, attr, stack[i])
    return stack


class StepPath(StrEnum):
    """The path a shape group's layers train on: MERGED once per step, or PER_CALL (each layer's own autograd
    Function); AUTO, only as a choice, times both on the device. The values are what `--step_path` takes and what
    checkpoints store."""

    AUTO = "auto"
    MERGED = "merged"
    PER_CALL = "per-call"


WEIGHT = "svdiff_merged_weight"  # the instance attribute holding a merged layer's view of W′ during a forward
TIMING_REPEATS = 3


@dataclass
class Group:
    """Targets of one weight shape, dtype and kind: merged together."""

    key: tuple
    names: list[str]
    modules: list[nn.Module]
    shifts: list[SpectralShift]
    vector: bool
    start: int  # this group's δ in its flat parameter: [start, stop), target by target
    stop: int
    base: torch.Tensor | None = None  # k × weight shape, the modules' weights its views (merged groups only)
    U: torch.Tensor | None = None  # k × m × r
    Ut: torch.Tensor | None = None  # its transpose, a view
    Vh: torch.Tensor | None = None  # k × r × n
    merged: torch.Tensor | None = None  # W′, a leaf that receives the layers' weight gradients
    path: StepPath = StepPath.MERGED
    timing: dict = field(default_factory=dict)
    # views made once, so a step issues no slicing per group: d (k × 1 × r, in the weights' dtype; δ itself
    # for 1-D weights), the ReLU's mask (k × r) and the group's part of the flat gradient
    d: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    base_m: torch.Tensor | None = None  # base and W′ seen as k × m × n
    merged_m: torch.Tensor | None = None

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A k × weight-shape stack seen as k × m × n."""
        return t.view(len(self.modules), t.shape[1], -1)

    @property
    def weight(self) -> torch.Tensor:
        """The first layer's weight: the group's shape, dtype and device."""
        return self.modules[0].weight

    def flops(self) -> int:
        """Of one merge (or one projection): a batched product of k × m × r by k × r × n."""
        k, weight = len(self.modules), self.weight
        if self.vector:
            return k * weight.numel()
        shift = self.shifts[0]
        return 2 * k * shift.U.shape[0] * shift.U.shape[1] * shift.Vh.shape[1]


def _mergeable(kind) -> bool:
    """Kinds whose merged op is their stock op on a weight laid out as stored (ConvTranspose's matrix is not)."""
    if isinstance(kind, Conv):
        return not kind.transposed
    return isinstance(kind, (Linear, Embedding, Norm))


def _merged_forward(module: nn.Module, x, *args, **kwargs):
    """The layer's stock op on its view of W′ (set by `MergedShifts` before each forward of the component).

    A linear layer gets Wᵀ (a transposed view, the operand `F.linear` itself hands to addmm/mm) and runs that
    product directly: the same kernel on the same memory, while the weight gradient then skips a transpose node
    per layer (one per group remains)."""
    w = module.__dict__[WEIGHT]
    kind = module._modules["spectral_shift"].kind
    if isinstance(kind, Linear):
        if x.dim() == 2:
            return torch.mm(x, w) if module.bias is None else torch.addmm(module.bias, x, w)
        if not x.is_contiguous():
            return nn.functional.linear(x, w.t(), module.bias)
        x2 = x.view(-1, x.shape[-1])
        y = torch.mm(x2, w) if module.bias is None else torch.addmm(module.bias, x2, w)
        return y.view(*x.shape[:-1], y.shape[-1])
    if isinstance(kind, Embedding):
        return nn.functional.embedding(
            x, w, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
    return kind.forward(module, kind.prepare(module, x), w)


class MergedShifts:
    """Wires the shift set `name` of `model` for merged training (see the module docstring).

    `choose`: MERGED (every group that can), PER_CALL (every group per call, δ still flat), or AUTO (timed
    per group before the first training forward). `report`, if given, is called with one line saying what was
    chosen. Call after the model has its final device and dtype; `close()` restores per-call layers (δ stays
    flat)."""

    def __init__(self, model: nn.Module, name: str = "default", choose: StepPath | str = StepPath.AUTO, report=None):
        if choose not in set(StepPath):
            raise ValueError(f"choose must be one of {', '.join(StepPath)}, not {choose!r}")
        choose = StepPath(choose)
        self.model, self.name, self.report = model, name, report
        shifted = shifted_modules(model)
        if not shifted:
            raise ValueError("the model has no spectral shifts")
        keyed: dict[tuple, list[str]] = {}
        for key, (module, shift) in shifted.items():
            if shift.original is not None:
                raise ValueError("the model is fused: unfuse it before merged training")
            if list(shift.scales) != [name] or shift.scales[name] != 1.0:
                raise ValueError(f"merged training needs exactly the shift set {name!r} at scale 1 on {key}")
            w, kind = module.weight, shift.kind
            group = (
                type(kind).__name__,
                tuple(w.shape),
                w.dtype,
                w.device,
                None if kind.is_vector else shift.U.dtype,
                _mergeable(kind),
            )
            keyed.setdefault(group, []).append(key)
        self.groups: list[Group] = []
        lengths = {"matrix": 0, "vector": 0}
        for gkey, names in keyed.items():
            vector = shifted[names[0]][1].kind.is_vector
            which = "vector" if vector else "matrix"
            length = shifted[names[0]][1].length
            start = lengths[which]
            lengths[which] += length * len(names)
            group = Group(
                key=gkey,
                names=names,
                modules=[shifted[n][0] for n in names],
                shifts=[shifted[n][1] for n in names],
                vector=vector,
                start=start,
                stop=lengths[which],
                path=StepPath.MERGED if gkey[-1] and choose is not StepPath.PER_CALL else StepPath.PER_CALL,
            )
            self.groups.append(group)
        device = next(iter(shifted.values()))[0].weight.device
        self.flat = {
            which: nn.Parameter(torch.zeros(n, device=device)) for which, n in lengths.items() if n
        }  # {"matrix": …, "vector": …}: one per learning rate
        sigma = []
        for g in self.groups:
            flat = self.flat["vector" if g.vector else "matrix"]
            with torch.no_grad():
                for i, shift in enumerate(g.shifts):
                    view = flat.detach()[g.start + i * shift.length : g.start + (i + 1) * shift.length]
                    view.copy_(shift.deltas[name])
                    shift.deltas[name] = nn.Parameter(view)  # shares the flat parameter's storage and version
            if not g.vector:
                sigma.append(torch.cat([s.S for s in g.shifts]))
        self.sigma = torch.cat(sigma) if sigma else None  # σ of every matrix target, in flat order
        # Persistent buffers: the flat gradients (handed to the optimizer as .grad), d per weight dtype, the mask
        self._grad = {which: torch.zeros_like(p) for which, p in self.flat.items()}
        dtypes = {g.weight.dtype for g in self.groups if not g.vector}
        self._dbuf = {dt: torch.zeros(lengths["matrix"], dtype=dt, device=device) for dt in dtypes}
        self._mask = torch.zeros(lengths["matrix"], device=device) if dtypes else None
        for g in self.groups:
            k = len(g.modules)
            which = "vector" if g.vector else "matrix"
            g.grad = self._grad[which][g.start : g.stop].view(k, -1)
            if g.vector:
                g.d = self.flat[which].detach()[g.start : g.stop].view(k, *g.weight.shape)
            else:
                g.d = self._dbuf[g.weight.dtype][g.start : g.stop].view(k, 1, -1)
                g.mask = self._mask[g.start : g.stop].view(k, -1)
            for i, shift in enumerate(g.shifts):  # per-call groups accumulate their δ gradients here
                shift.deltas[name].grad = g.grad[i]
        self._merged_at = None  # the flat parameters' versions at the last merge
        self.chosen = choose is not StepPath.AUTO
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        for g in self.groups:
            self._set_path(g, g.path)
        if self.chosen:
            self._report()

    # --- what the trainer sees ---

    def parameters(self) -> dict[str, nn.Parameter]:
        """{"matrix": flat δ of the matrices, "vector": flat δ of the 1-D weights} (those present)."""
        return dict(self.flat)

    def deltas(self) -> dict[str, nn.Parameter]:
        """{weight name: δ parameter}, each a view of a flat parameter."""
        return {n: s.deltas[self.name] for g in self.groups for n, s in zip(g.names, g.shifts, strict=True)}

    def paths(self) -> list[dict]:
        """Per shape group: its shape, how many targets, the path it runs on and, when timed, both timings."""
        return [
            {"kind": g.key[0], "shape": list(g.key[1]), "targets": len(g.modules), "path": g.path.value} | g.timing
            for g in self.groups
        ]

    def summary(self) -> str:
        merged = [g for g in self.groups if g.path is StepPath.MERGED]
        return (
            f"{len(merged)}/{len(self.groups)} shape groups merged once per step, the others per call "
            f"({sum(len(g.modules) for g in merged)}/{sum(len(g.modules) for g in self.groups)} targets)"
        )

    def state_dict(self) -> dict:
        """The path chosen for each group, so a resumed run computes its steps exactly as the first run did
        (`accelerator.register_for_checkpointing` keeps it with the checkpoint)."""
        return {
            "chosen": self.chosen,
            "paths": [g.path.value for g in self.groups],  # plain strings: a checkpoint holds no class of ours
            "timing": [g.timing for g in self.groups],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["paths"]) != len(self.groups):
            raise ValueError(f"{len(state['paths'])} shape groups saved, {len(self.groups)} here")
        if not state["chosen"]:
            return
        for g, path, timing in zip(self.groups, state["paths"], state["timing"], strict=True):
            self._set_path(g, StepPath(path))
            g.timing = timing
        self.chosen = True

    def use(self, path: StepPath | str) -> None:
        """Every group that can be merged on `path` (MERGED or PER_CALL), as if chosen."""
        path = StepPath(path)
        for g in self.groups:
            self._set_path(g, path if g.key[-1] else StepPath.PER_CALL)
        self.chosen = True

    def close(self) -> None:
        """Every layer back on its per-call forward, the hooks removed; δ stays in the flat parameters."""
        self._hook.remove()
        for g in self.groups:
            self._set_path(g, StepPath.PER_CALL)

    # --- the step ---

    def _versions(self) -> tuple:
        return tuple(p._version for p in self.flat.values())

    @torch.no_grad()
    def merge(self) -> None:
        """Build W′ of every merged group from the current δ."""
        self._update_d()
        for g in self.groups:
            if g.path is StepPath.MERGED:
                self._merge_group(g)
        self._merged_at = self._versions()

    def _update_d(self) -> None:
        """d = ReLU(σ + δ) − σ of every matrix target in one pass, and the ReLU's mask for the projection."""
        if not self._dbuf:
            return
        shifted = torch.relu(self.sigma + self.flat["matrix"].detach())
        self._mask.copy_(shifted > 0)
        d = shifted.sub_(self.sigma)
        for buf in self._dbuf.values():
            buf.copy_(d)

    @torch.no_grad()
    def _merge_group(self, g: Group) -> None:
        if g.merged is None:
            g.merged = torch.empty_like(g.base).requires_grad_(True)
            g.merged.register_post_accumulate_grad_hook(lambda w, g=g: self._project(g, w))
            g.merged_m = g.matrix(g.merged.detach())
        if g.vector:
            torch.add(g.base, _cast(g.d, g.base.dtype), out=g.merged)
            return
        u, vh = _cast(g.U, g.base.dtype), _cast(g.Vh, g.base.dtype)
        torch.baddbmm(g.base_m, u * g.d, vh, out=g.merged_m)

    @torch.no_grad()
    def _project(self, g: Group, w: torch.Tensor) -> None:
        """δ's gradient from the group's weight gradients, added to the flat gradient; G is freed."""
        grad = w.grad
        w.grad = None
        if g.vector:
            g.grad.add_(grad)
            return
        gm = g.matrix(grad)
        ut, vh = _cast(g.Ut, gm.dtype), _cast(g.Vh, gm.dtype)
        # diag(Uᵀ·G·V) in the gradient's dtype (tensor cores under bf16/fp16), summed in float32
        gd = (torch.bmm(ut, gm) * vh).sum(2, dtype=torch.float32)
        g.grad.addcmul_(gd, g.mask)

    def _before_forward(self, module, args, kwargs):
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.flat.values())
        if training and not self.chosen:
            self._calibrate(args, kwargs)
        if self._merged_at != self._versions():
            self.merge()
        if training:
            self._hand_grads()
        for g in self.groups:
            if g.path is StepPath.MERGED:
                _install(g)
        return None

    def _hand_grads(self) -> None:
        """The flat parameters' gradients are the persistent buffers the groups add into: zeroed when the optimizer
        has let go of them (set to None), adopted when someone else put a tensor there."""
        for which, flat in self.flat.items():
            buf = self._grad[which]
            if flat.grad is buf:
                continue
            if flat.grad is None:
                buf.zero_()
            else:
                buf.copy_(flat.grad)
            flat.grad = buf

    def _set_path(self, g: Group, path: StepPath) -> None:
        if path is StepPath.MERGED and g.base is None:
            _stack(g)
        g.path = path
        for m in g.modules:
            m.__dict__.pop(WEIGHT, None)
            fn = _merged_forward if path is StepPath.MERGED else _shifted_forward
            m.forward = types.MethodType(fn, m)
            m._modules["spectral_shift"].deltas[self.name].requires_grad_(path is StepPath.PER_CALL)
        if path is not StepPath.MERGED:
            g.merged = None
        self._merged_at = None

    # --- choosing the path of each group, by timing both on the device ---

    def _calibrate(self, args, kwargs) -> None:
        """Records each target's input in one forward of the component (merged everywhere it can be), then times
        every group's layers both ways, forward and backward, and keeps the faster. The gradients gathered so far
        are put back afterwards."""
        self.chosen = True
        saved = {which: buf.clone() for which, buf in self._grad.items()}
        seen: dict[int, tuple] = {}
        try:
            self.merge()
            for g in self.groups:
                if g.path is StepPath.MERGED:
                    _install(g)
            originals = {m: m.__dict__["forward"] for g in self.groups for m in g.modules}
            for m, forward in originals.items():
                m.forward = types.MethodType(_recorder(seen, forward), m)
            try:  # with gradients, so each layer records whether its input needs one
                type(self.model).forward(self.model, *args, **kwargs)
            finally:
                for m, forward in originals.items():
                    m.forward = forward
            for g in self.groups:
                if g.path is StepPath.MERGED and all(id(m) in seen for m in g.modules):
                    self._time_group(g, [seen[id(m)] for m in g.modules])
        finally:
            for which, buf in self._grad.items():
                buf.copy_(saved[which])
        self._report()

    def _report(self) -> None:
        line = f"{type(self.model).__name__}: {self.summary()}"
        log.info(line)
        if self.report is not None:
            self.report(line)

    def _time_group(self, g: Group, inputs: list[tuple]) -> None:
        device = g.weight.device
        rng = torch.Generator(device=device).manual_seed(0)  # the run's own random streams stay untouched

        def make(spec):
            shape, dtype, needs_grad = spec
            if dtype.is_floating_point:
                return torch.randn(shape, dtype=dtype, device=device, generator=rng).requires_grad_(needs_grad)
            return torch.randint(0, g.weight.shape[0], shape, device=device, generator=rng)  # an embedding's ids

        xs = [make(spec) for spec in inputs]

        def run(forward):
            ys = [forward(m, x) for m, x in zip(g.modules, xs, strict=True)]
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])  # one projection for a merged group

        def merged():
            self._merge_group(g)
            _install(g)
            run(_merged_forward)

        merged_s = _timed(merged, device)
        self._set_path(g, StepPath.PER_CALL)
        per_call_s = _timed(lambda: run(_shifted_forward), device)
        g.timing = {"merged_ms": round(merged_s * 1e3, 3), "per_call_ms": round(per_call_s * 1e3, 3)}
        self._set_path(g, StepPath.MERGED if merged_s < per_call_s else StepPath.PER_CALL)


def _stack(g: Group) -> None:
    """Stacks a group's weights (and factors) for merging; its layers then hold views of the stacks. Done when a
    group first goes on the merged path: a per-call group keeps its layers' own tensors and costs no copy."""
    g.base = _stack_in_place(g.modules, "weight")
    if not g.vector:
        g.base_m = g.matrix(g.base)
        g.U, g.Vh = _stack_in_place(g.shifts, "U"), _stack_in_place(g.shifts, "Vh")
        g.Ut = g.U.transpose(1, 2)


def _install(g: Group) -> None:
    """Each layer of a merged group gets its view of W′ for this forward (one unbind: its backward stacks the
    layers' weight gradients once, where indexing would add a group-sized tensor per layer)."""
    views = (g.merged.transpose(1, 2) if g.key[0] == "Linear" else g.merged).unbind(0)
    for m, w in zip(g.modules, views, strict=True):
        m.__dict__[WEIGHT] = w


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _recorder(seen: dict, forward):
    def record(module, x, *args, **kwargs):
        seen[id(module)] = (tuple(x.shape), x.dtype, x.requires_grad)
        return forward(x, *args, **kwargs)

    return record


def _timed(fn, device: torch.device) -> float:
    """The median of a few runs after one warm-up, synchronized on a GPU."""
    times = []
    for i in range(TIMING_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - began)
    return statistics.median(times)
