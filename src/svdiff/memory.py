"""What training spectral shifts on a base needs in accelerator memory, by component, counted on meta tensors
(nothing is allocated or downloaded): `svdiff targets --base flux-dev --memory`.

- base weights at the chosen dtype, every component a training step keeps resident (denoiser and text encoders,
  T5 included; the VAE is left out: latents can be encoded once, before training); with fp8 (`--base_dtype
  float8_e4m3fn`), the linear layers' weights at one byte a value and a float32 scale per row, the rest in bf16;
- the frozen factors U and V of every shifted matrix at each factor dtype (fp8 with a float32 scale per row of U
  and of Vᵀ), and σ in float32;
- δ's trainable state: δ, its gradient and AdamW's two moments, all float32;
- the denoiser's activations kept for the backward at each resolution, with and without gradient checkpointing,
  measured by running the denoiser on meta tensors with attention counted as a fused kernel keeps it (q, k, v,
  the output and a float32 log-sum-exp per query; never the attention matrix). With checkpointing, the inputs
  every checkpointed block keeps plus the largest block's own activations, recomputed in the backward. These
  are the frozen denoiser's; the shift layers add what their path keeps (x·V of a layer on the activation path).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import SvdiffError
from .models import ARCHITECTURES, base_name, build_architecture, load_components, resolve_base
from .spectral import find_targets

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}  # compute


def weight_bytes(model: nn.Module, dtype: str) -> int:
    """The model's weights at `dtype`; fp8 holds what `spectral.fp8.hold_in_fp8` holds (every nn.Linear's weight,
    a byte a value and a float32 scale per row) and the rest in bf16."""
    values = sum(p.numel() for p in model.parameters())
    if dtype != "fp8":
        return values * BYTES[dtype]
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    held = sum(m.weight.numel() for m in linears)
    return (values - held) * BYTES["bf16"] + held * BYTES["fp8"] + 4 * sum(m.out_features for m in linears)


GiB = 2**30


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on meta tensors: the output's shape, and what a fused
    (flash / memory-efficient) kernel saves for its backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement stops after the forward
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _denoiser_inputs(
    model: nn.Module, resolution: int, batch: int, dtype: torch.dtype, device="meta", vae_factor: int = 8
) -> dict:
    """Inputs of one training step of a denoiser at `resolution` pixels, with the text lengths its family's
    scripts train with (CLIP 77; SD3 77 + 256 T5 tokens; Flux 512 T5 tokens): empty on the meta device, random
    elsewhere."""
    name, cfg = type(model).__name__, model.config

    def t(*shape, grad=False, dt=dtype):
        make = torch.empty if str(device) == "meta" else torch.randn
        return make(*shape, device=device, dtype=dt).requires_grad_(grad)

    side = resolution // vae_factor
    if name == "UNet2DConditionModel":
        inputs = dict(
            sample=t(batch, cfg.in_channels, side, side, grad=True),
            timestep=t(batch, dt=torch.float32),
            encoder_hidden_states=t(batch, 77, cfg.cross_attention_dim),
        )
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the size/crop time ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": t(batch, pooled), "time_ids": t(batch, 6)}
        return inputs
    if name == "SD3Transformer2DModel":
        return dict(
            hidden_states=t(batch, cfg.in_channels, side, side, grad=True),
            encoder_hidden_states=t(batch, 77 + 256, cfg.joint_attention_dim),
            pooled_projections=t(batch, cfg.pooled_projection_dim),
            timestep=t(batch, dt=torch.float32),
        )
    if name == "FluxTransformer2DModel":
        tokens = (side // 2) ** 2  # 2×2 latent patches packed into one token of 4·16 channels
        inputs = dict(
            hidden_states=t(batch, tokens, cfg.in_channels, grad=True),
            encoder_hidden_states=t(batch, 512, cfg.joint_attention_dim),
            pooled_projections=t(batch, cfg.pooled_projection_dim),
            timestep=t(batch, dt=torch.float32),
            img_ids=t(tokens, 3, dt=torch.float32),
            txt_ids=t(512, 3, dt=torch.float32),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = t(batch, dt=torch.float32)
        return inputs
    raise SvdiffError(f"no memory model for a {name} denoiser")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules gradient checkpointing wraps: diffusers checkpoints every transformer block of an SD3/Flux
    transformer, and every down, mid and up block of a UNet."""
    names = ("transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks")
    blocks = [b for n in names for b in getattr(model, n, [])]
    return blocks + ([model.mid_block] if getattr(model, "mid_block", None) is not None else [])


def saved_activations(
    model: nn.Module, resolution: int, batch: int = 1, dtype: str = "bf16", device="meta", vae_factor: int = 8
) -> dict[str, int]:
    """Bytes the denoiser keeps for its backward at `resolution`, from one forward (on meta tensors unless the
    model lives elsewhere; attention then runs as it is, fused on CPUs and GPUs alike): without
    gradient checkpointing (everything saved), and with it (what is saved outside the checkpointed blocks, each
    block's tensor inputs, and the largest block's own activations, alive once more while it is recomputed)."""
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # holds what was counted, so that no id is reused while counting
    inside: list[int] = []  # bytes saved in each block, in call order
    inputs: list[int] = []  # bytes of each block's tensor inputs
    open_blocks: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or id(t) in seen:
            return t
        seen[id(t)] = t.numel() * t.element_size()
        alive.append(t)
        if open_blocks:
            inside[open_blocks[0]] += seen[id(t)]
        return t

    def enter(module, args, kwargs):
        if not open_blocks:
            values = [*args, *kwargs.values()]
            inputs.append(sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)))
            inside.append(0)
        open_blocks.append(len(inside) - 1)

    def leave(module, args, kwargs, out):
        open_blocks.pop()

    hooks = []
    for block in _blocks(model):
        hooks.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(block.register_forward_hook(leave, with_kwargs=True))
    try:
        stand_in = _fused_attention() if str(device) == "meta" else contextlib.nullcontext()
        with stand_in, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**_denoiser_inputs(model, resolution, batch, DTYPES[dtype], device, vae_factor))
    finally:
        for h in hooks:
            h.remove()
    total = sum(seen.values())
    checkpointed = total - sum(inside) + sum(inputs) + max(inside, default=0)
    return {"no_checkpointing": total, "gradient_checkpointing": checkpointed}


def _matrix_sizes(model: nn.Module, preset: str, include=None, exclude=None) -> list[tuple[int, int, int]]:
    """(rows, columns, rank) of every shifted matrix; 1-D targets as (length, 0, 0)."""
    sizes = []
    for t in find_targets(model, preset, include, exclude):
        if t.kind.is_vector:
            sizes.append((t.length, 0, 0))
        else:
            m, n = t.kind.to_matrix(t.module.weight).shape
            sizes.append((m, n, t.length))
    return sizes


def factor_bytes(sizes: list[tuple[int, int, int]], factor_dtype: str) -> int:
    """U (m × r) and Vᵀ (r × n) at `factor_dtype` (fp8: plus a float32 scale per row of each), σ in float32."""
    total = 0
    for m, n, r in sizes:
        if r == 0:
            continue
        total += (m * r + r * n) * BYTES[factor_dtype] + 4 * r
        if factor_dtype == "fp8":
            total += 4 * (m + r)
    return total


def training_memory(
    base: str | None,
    preset: str = "all",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str = "bf16",
    resolutions: tuple[int, ...] = (512, 1024),
    factor_dtypes: tuple[str, ...] = ("fp32", "bf16", "fp8"),
    batch: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The memory report for `svdiff targets --memory`, in bytes (see the module docstring for what it counts)."""
    if dtype not in DTYPES:
        raise SvdiffError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    for res in resolutions:
        if not 64 <= res <= 4096 or res % 16:
            raise SvdiffError(f"--resolution must be a multiple of 16 from 64 to 4096, not {res}")
    if not 1 <= batch <= 256:
        raise SvdiffError(f"--batch must be from 1 to 256, not {batch}")

    if base in ARCHITECTURES:
        components, vae_factor = build_architecture(base, frozen=True), 8
    else:
        components, vae_factor = load_components(base, meta=True), _vae_factor(resolve_base(base))
    denoiser_name = "transformer" if "transformer" in components else "unet"
    report: dict = {"base": base_name(base), "preset": preset, "weights_dtype": dtype, "batch": batch, "components": {}}
    shifted_values = 0
    for name, model in components.items():
        row = {"parameters": sum(p.numel() for p in model.parameters())}
        row["weights"] = weight_bytes(model, dtype)
        if type(model).__name__ != "T5EncoderModel":
            sizes = _matrix_sizes(model, preset, include, exclude)
            row["shifts"] = sum(r if r else m for m, n, r in sizes)
            row["factors"] = {f: factor_bytes(sizes, f) for f in factor_dtypes}
            shifted_values += row["shifts"]
        report["components"][name] = row
    report["trainable"] = 16 * shifted_values  # δ, its gradient, AdamW's two moments: float32 each
    denoiser = components[denoiser_name].to(DTYPES[dtype]).train()
    report["activations"] = {}
    for res in resolutions:
        if progress:
            progress(f"activations at {res} px")
        report["activations"][res] = saved_activations(denoiser, res, batch, dtype, vae_factor=vae_factor)
    return report


def _vae_factor(base) -> int:
    """Pixels per latent cell of a pipeline folder's VAE (8 when the folder has none, as for a hub id)."""
    config = Path(base) / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def format_memory(report: dict) -> str:
    """The report as a few lines of GiB a person reads at a glance."""

    def gib(n: int) -> str:
        return f"{n / GiB:.2f}"

    comps = report["components"]
    factor_dtypes = next(iter(r["factors"] for r in comps.values() if "factors" in r))
    lines = [f"{report['base']}: memory to train preset {report['preset']}, batch {report['batch']} (GiB)"]
    lines.append(f"  {'component':16s} {'parameters':>12s} {'weights ' + report['weights_dtype']:>12s}   factors U, V")
    for name, row in comps.items():
        factors = "   ".join(f"{f} {gib(b)}" for f, b in row.get("factors", {}).items()) or "frozen, not shifted"
        lines.append(f"  {name:16s} {row['parameters'] / 1e9:>11.2f}B {gib(row['weights']):>12s}   {factors}")
    lines.append(f"  δ, its gradient and AdamW's moments (fp32): {gib(report['trainable'])}")
    frozen = sum(r["weights"] for r in comps.values() if "factors" not in r)
    for res, acts in report["activations"].items():
        lines.append(
            f"  activations at {res} px: {gib(acts['no_checkpointing'])}, "
            f"{gib(acts['gradient_checkpointing'])} with gradient checkpointing"
        )
    weights = sum(r["weights"] for r in comps.values())
    for f in factor_dtypes:
        factors = sum(r["factors"][f] for r in comps.values() if "factors" in r)
        totals = ", ".join(
            f"{res} px {gib(weights + factors + report['trainable'] + acts['gradient_checkpointing'])}"
            for res, acts in report["activations"].items()
        )
        lines.append(f"  total with {f} factors and gradient checkpointing: {totals}")
    if frozen:
        lines.append(f"  (frozen text encoders: {gib(frozen)} of it, freed once the prompts are encoded)")
    return "\n".join(lines)
