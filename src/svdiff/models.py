"""Base models: the built-in architectures (SD 1.5, SD 2.1, SDXL, SD3/3.5, Flux.1, buildable with random or meta
weights), local diffusers folders, hub ids, and the embedded tiny pipeline (the default).

Only the components svdiff shifts are handled here (the denoiser and the CLIP text encoders); the VAE is never
shifted, and neither is T5: diffusers' SD3 and Flux DreamBooth scripts train the CLIP encoders only, and T5-XXL's
4.8 B weights would cost more than the shifts are worth.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import diffusers
import torch
import transformers
from torch import nn

from . import world
from .errors import SvdiffError

SHIFTED_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
FROZEN_CLASSES = frozenset({"T5EncoderModel"})

# name -> {component: (config file, class name)}; frozen components are listed for memory estimates
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
    **{
        name: {
            "transformer": (f"{name.replace('-', '_')}_transformer.json", "SD3Transformer2DModel"),
            "text_encoder": ("sd15_text_encoder.json", "CLIPTextModelWithProjection"),
            "text_encoder_2": ("sdxl_text_encoder_2.json", "CLIPTextModelWithProjection"),
            "text_encoder_3": ("t5_xxl_encoder.json", "T5EncoderModel"),
        }
        for name in ("sd3-medium", "sd35-medium", "sd35-large")
    },
    **{
        name: {
            "transformer": (f"{name.replace('-', '_')}_transformer.json", "FluxTransformer2DModel"),
            "text_encoder": ("sd15_text_encoder.json", "CLIPTextModel"),
            "text_encoder_2": ("t5_xxl_encoder.json", "T5EncoderModel"),
        }
        for name in ("flux-dev", "flux-schnell")
    },
}


def is_shifted(module: nn.Module) -> bool:
    """Whether svdiff shifts a pipeline component of this class."""
    return type(module).__name__ not in FROZEN_CLASSES


EMBEDDED = "embedded:"  # `embedded:unet` (the default base), `embedded:flow`


def default_base(name: str = "unet") -> Path:
    """The folder of an embedded tiny pipeline: "unet" (Stable Diffusion, used when no base is given) or "flow"
    (an SD3 transformer)."""
    return world.default_base(name)


def base_name(base: str | Path | None) -> str:
    """How a base is recorded in shift files: the built-in name, the hub id, or the folder's path."""
    if base is None:
        return "svdiff-tiny"
    return str(base)


def _model_class(class_name: str) -> type:
    """A component's class: a diffusers model (UNet, SD3 or Flux transformer) or a transformers one."""
    cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SvdiffError(f"unknown model class {class_name!r}")
    return cls


def _is_diffusers(cls: type) -> bool:
    return issubclass(cls, diffusers.ModelMixin)


def _build(config: dict, class_name: str, device: str | torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cls = _model_class(class_name)
    with torch.device(device):
        if _is_diffusers(cls):
            return cls.from_config(config)
        return cls(cls.config_class(**config))


def build_architecture(
    name: str, device: str | torch.device = "meta", seed: int = 0, *, frozen: bool = False
) -> dict[str, nn.Module]:
    """The shifted components of a built-in architecture, with random weights (or none, on the meta device);
    `frozen=True` adds the components svdiff never shifts (T5), for memory estimates."""
    if name not in ARCHITECTURES:
        raise SvdiffError(f"unknown architecture {name!r}; built-in ones are {', '.join(ARCHITECTURES)}")
    folder = resources.files("svdiff") / "architectures"
    out = {}
    for component, (file, class_name) in ARCHITECTURES[name].items():
        if not frozen and class_name in FROZEN_CLASSES:
            continue
        config = json.loads((folder / file).read_text())
        config.pop("_class_name", None)
        out[component] = _build(config, class_name, device, seed).eval().requires_grad_(False)
    return out


def model_index(base: str | Path, revision: str | None = None) -> dict:
    """A pipeline's model_index.json (its components and their classes), from a folder or the hub."""
    path = Path(base)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise SvdiffError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            return json.loads(index.read_text())
        except ValueError as e:
            raise SvdiffError(f"{index} is not valid JSON: {e}") from None
    try:
        return diffusers.DiffusionPipeline.load_config(str(base), revision=revision)
    except Exception as e:  # hub id not found, offline, …: one line for the user
        raise SvdiffError(f"cannot find base model {base!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def resolve_base(base: str | Path | None) -> str | Path:
    """The folder or hub id of a base: None and `embedded:<name>` name the embedded ones."""
    if base is None:
        return default_base()
    if str(base).startswith(EMBEDDED):
        return default_base(str(base)[len(EMBEDDED) :])
    return base


def embedded_name(base: str | Path | None) -> str | None:
    """Which embedded base `base` names or is the folder of ("unet", "flow"); None for any other base."""
    if base is None:
        return "unet"
    if str(base).startswith(EMBEDDED):
        return str(base)[len(EMBEDDED) :]
    return next((name for name, folder in world.BASE_DIRS.items() if Path(base).resolve() == folder.resolve()), None)


def is_embedded_base(base: str | Path | None) -> bool:
    return embedded_name(base) is not None


def default_guidance(base: str | Path | None) -> float:
    """Classifier-free guidance when none is given: what the embedded base draws best at, else SD's 7.5."""
    return world.GUIDANCE_SCALE if is_embedded_base(base) else 7.5


def default_cut_mix_scale(base: str | Path | None) -> float:
    """The collage scale when none is given: on the embedded base 1, each subject at its photo's size (it fills a
    third of the frame, the size the base draws a pair at, and half-size subjects are a few latent cells); else
    0.5, each photo whole, since a real subject often fills its frame."""
    return 1.0 if is_embedded_base(base) else 0.5


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
    index = model_index(base, revision)
    out = {}
    for component in SHIFTED_COMPONENTS:
        if component not in index or index[component][0] is None:
            continue
        class_name = index[component][1]
        if class_name in FROZEN_CLASSES:
            continue
        kwargs = {"subfolder": component, "revision": revision}
        try:
            cls = _model_class(class_name)
            if meta:
                if _is_diffusers(cls):
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
