"""What a run trains, per method: spectral shifts (svdiff), or the paper's baselines, LoRA (PEFT) and full
fine-tuning. Each gives its trainable parameters by name (what checkpoints hold), the optimizer's parameter groups,
and how the result is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import save_shifts
from ..errors import SvdiffError
from ..format import WEIGHTS_NAME
from ..models import base_name
from ..spectral import add_shifts, shifted_modules
from ..spectral.merged import MergedShifts

DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,  # factors and a held base: one byte a value, a scale per row
}


@dataclass
class Trainable:
    method: str
    components: dict[str, nn.Module]  # the trained components: {"unet": …, "text_encoder": …}
    params: dict[str, nn.Parameter]  # "<component>.<name>": what a checkpoint holds
    groups: list[dict]  # optimizer parameter groups

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().float().contiguous() for k, p in self.params.items()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(tensors[k])

    def merge_steps(self, choose: str, report=None) -> list:
        """svdiff: each component wired for merged steps (`spectral.merged.MergedShifts`, `choose` as there; "auto"
        times the shape groups on a GPU and keeps per-call layers on a CPU) and its δ held in flat parameters:
        checkpoints keep naming each target's δ (now views of them), the optimizer steps the flat parameters at
        the same two rates. Returns the wirings (they have a state_dict)."""
        on_cpu = next(iter(self.params.values())).device.type == "cpu"
        if choose == "auto" and on_cpu:  # a CPU pays for the weight gradients merging needs: per call measures faster
            choose = "per-call"  # (benchmarks/train_methods.py), and a run then computes the same bits every time
        merged = {  # a preset may leave a component without shifts (unet-ca: the text encoder)
            n: MergedShifts(m, choose=choose, report=report) for n, m in self.components.items() if shifted_modules(m)
        }
        rates = {"matrix": self.groups[0]["lr"], "vector": self.groups[-1]["lr"]}
        views = {f"{c}.{k}": p for c, m in merged.items() for k, p in m.deltas().items()}
        self.params = {k: views[k] for k in self.params}
        flats = [m.parameters() for m in merged.values()]
        self.groups = [
            {"params": [f[which] for f in flats if which in f], "lr": rate}
            for which, rate in rates.items()
            if any(which in f for f in flats)
        ]
        return list(merged.values())


def prepare(config, components: dict[str, nn.Module], lora_targets: dict[str, list[str]]) -> Trainable:
    """Attaches what `config.method` trains to `components` ({"unet": …, "text_encoder": …}: a family's
    `components`); LoRA adapts the layers `lora_targets` names per component (a family's `lora_targets`)."""
    if config.method == "svdiff":
        return _svdiff(config, components)
    if config.method == "lora":
        return _lora(config, components, lora_targets)
    return _full(config, components)


def _svdiff(args, components) -> Trainable:
    params, matrices, vectors = {}, [], []
    for name, model in components.items():
        deltas = add_shifts(
            model,
            args.preset,
            include=args.include,
            exclude=args.exclude,
            factor_dtype=DTYPE[args.factor_dtype] if args.factor_dtype else None,
            progress=args.progress,
        )
        shifted = shifted_modules(model)
        for key, delta in deltas.items():
            params[f"{name}.{key}"] = delta
            (vectors if shifted[key][1].kind.is_vector else matrices).append(delta)
    if not params:
        raise SvdiffError(f"preset {args.preset!r} with these include/exclude patterns selects no weights")
    # The paper's two rates: 2-D and 4-D kernels at --learning_rate, 1-D (norm) weights far lower.
    groups = [{"params": matrices, "lr": args.learning_rate}]
    if vectors:
        groups.append({"params": vectors, "lr": args.learning_rate_1d})
    return Trainable("svdiff", components, params, groups)


def _lora(args, components, targets: dict[str, list[str]]) -> Trainable:
    # peft and diffusers' pipelines take seconds to import, which every `svdiff` command would pay: only the
    # LoRA baseline loads them.
    from peft import LoraConfig, inject_adapter_in_model

    params = {}
    for name, model in components.items():
        config = LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets[name]
        )
        inject_adapter_in_model(config, model)  # PEFT itself: the same for the UNet and the CLIP text encoder
        for key, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
                params[f"{name}.{key}"] = p
    return Trainable("lora", components, params, [{"params": list(params.values()), "lr": args.learning_rate}])


def _full(args, components) -> Trainable:
    params = {}
    for name, model in components.items():
        model.requires_grad_(True)
        params.update({f"{name}.{k}": p for k, p in model.named_parameters()})
    return Trainable("full", components, params, [{"params": list(params.values()), "lr": args.learning_rate}])


def save_result(trainable: Trainable, output_dir: Path, args, extra: dict, pipeline_class: type) -> Path:
    """Writes what was trained (LoRA in `pipeline_class`'s diffusers layout); returns the main file."""
    if trainable.method == "svdiff":
        return save_shifts(
            output_dir / WEIGHTS_NAME,
            trainable.components,
            base_model=base_name(args.pretrained_model_name_or_path),
            preset=args.preset,
            dtype=args.save_dtype,
            extra=extra,
        )
    if trainable.method == "lora":
        from peft.utils import get_peft_model_state_dict

        # PEFT's own key layout (`….lora_A.weight`), which every family's `load_lora_weights` reads whole; the
        # older diffusers layout (`….lora.down.weight`) is not read back by SD3's loader for its attention.
        layers = {
            f"{name}_lora_layers": get_peft_model_state_dict(model) for name, model in trainable.components.items()
        }
        pipeline_class.save_lora_weights(output_dir, **layers, safe_serialization=True)
        return output_dir / "pytorch_lora_weights.safetensors"
    for name, model in trainable.components.items():
        model.save_pretrained(output_dir / name, safe_serialization=True)
    return output_dir / next(iter(trainable.components)) / "diffusion_pytorch_model.safetensors"
