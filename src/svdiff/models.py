"""Base models: the built-in architectures (SD 1.5, SD 2.1, SDXL, buildable with random or meta weights), local
diffusers folders, hub ids, and the embedded tiny pipeline (the default).

Only the components svdiff shifts are handled here (UNet and text encoders); the VAE is never shifted.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import transformers
from diffusers import UNet2DConditionModel
from torch import nn

from .errors import SvdiffError

SHIFTED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# name -> {component: (config file, class name)}
ARCHITECTURES: dict[str, dict[str, tuple[str, str]]] = {
    "sd15": {
        "unet": ("sd15_unet.json", "UNet2DConditionModel"),
        "text_encoder": ("sd15_text_encoder.json", "CLIPTextModel"),
    },
    "sd21": {
        "unet": ("sd21_unet.json", "UNet2DConditionModel"),
        "text_encoder": ("sd21_text_encoder.json", "CLIPTextModel"),
    },
    "sdxl": {
        "unet": ("sdxl_unet.json", "UNet2DConditionModel"),
        "text_encoder": ("sd15_text_encoder.json", "CLIPTextModel"),
        "text_encoder_2": ("sdxl_text_encoder_2.json", "CLIPTextModelWithProjection"),
    },
}


def default_base() -> Path:
    """The embedded tiny Stable Diffusion pipeline folder, used when no base is given."""
    from .world import default_base as world_base

    return world_base()


def base_name(base: str | Path | None) -> str:
    """How a base is recorded in shift files: the built-in name, the hub id, or the folder's path."""
    if base is None:
        return "svdiff-tiny"
    return str(base)


def _build(config: dict, class_name: str, device: str | torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        if class_name == "UNet2DConditionModel":
            return UNet2DConditionModel.from_config(config)
        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))


def build_architecture(name: str, device: str | torch.device = "meta", seed: int = 0) -> dict[str, nn.Module]:
    """The shifted components of a built-in architecture, with random weights (or none, on the meta device)."""
    if name not in ARCHITECTURES:
        raise SvdiffError(f"unknown architecture {name!r}; built-in ones are {', '.join(ARCHITECTURES)}")
    folder = resources.files("svdiff") / "architectures"
    out = {}
    for component, (file, class_name) in ARCHITECTURES[name].items():
        config = json.loads((folder / file).read_text())
        out[component] = _build(config, class_name, device, seed).eval().requires_grad_(False)
    return out


def _model_index(base: str | Path, revision: str | None = None) -> dict:
    path = Path(base)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise SvdiffError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(str(base), revision=revision)
    except Exception as e:  # hub id not found, offline, …: one line for the user
        raise SvdiffError(f"cannot find base model {base!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def resolve_base(base: str | Path | None) -> str | Path:
    return default_base() if base is None else base


def load_components(
    base: str | Path | None = None,
    *,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    variant: str | None = None,
) -> dict[str, nn.Module]:
    """The shifted components (UNet, text encoder(s)) of a base: a built-in architecture name, a local
    diffusers folder or a hub id (None: the embedded default). `meta=True` builds them from their configs
    without weights, for counting."""
    base = resolve_base(base)
    if str(base) in ARCHITECTURES:
        return build_architecture(str(base), device="meta" if meta else device)
    index = _model_index(base, revision)
    out = {}
    for component in SHIFTED_COMPONENTS:
        if component not in index or index[component][0] is None:
            continue
        class_name = index[component][1]
        cls = UNet2DConditionModel if class_name == "UNet2DConditionModel" else getattr(transformers, class_name)
        kwargs = {"subfolder": component, "revision": revision}
        try:
            if meta:
                if cls is UNet2DConditionModel:
                    config = cls.load_config(str(base), **kwargs)
                else:
                    config = cls.config_class.from_pretrained(str(base), **kwargs).to_dict()
                out[component] = _build(config, class_name, "meta", 0)
            else:
                model = cls.from_pretrained(str(base), variant=variant, torch_dtype=dtype, **kwargs)
                out[component] = model.to(device).eval().requires_grad_(False)
        except SvdiffError:
            raise
        except Exception as e:
            raise SvdiffError(
                f"cannot load {component} of {base}: {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
    if not out:
        raise SvdiffError(f"{base} has none of the components svdiff shifts ({', '.join(SHIFTED_COMPONENTS)})")
    return out
