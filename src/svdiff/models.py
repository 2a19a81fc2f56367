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


def default_base() -> Path:
    """The embedded tiny Stable Diffusion pipeline folder, used when no base is given."""
    from .world import default_base as world_base

    return world_base()


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


def _model_index(base: str | Path, revision: str | None = None) -> dict:
    path = Path(base)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise SvdiffError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            return json.loads(index.read_text())
        except ValueError as e:
            raise SvdiffError(f"{index} is not valid JSON: {e}") from None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(str(base), revision=revision)
    except Exception as e:  # hub id not found, offline, …: one line for the user
        raise SvdiffError(f"cannot find base model {base!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def resolve_base(base: str | Path | None) -> str | Path:
    return default_base() if base is None else base


def is_embedded_base(base: str | Path | None) -> bool:
    from .world import BASE_DIR

    return base is None or Path(base).resolve() == BASE_DIR.resolve()


def default_guidance(base: str | Path | None) -> float:
    """Classifier-free guidance when none is given: what the embedded base draws best at, else SD's 7.5."""
    from .world import GUIDANCE_SCALE

    return GUIDANCE_SCALE if is_embedded_base(base) else 7.5


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
    index = _model_index(base, revision)
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


# --- shift sets on pipelines (a bare nn.Module works too) ---


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
    from .io import WEIGHTS_NAME

    path = Path(path)
    return (path.parent.name if path.name == WEIGHTS_NAME else path.stem).replace(".", "_") or "default"


def load_shifts(target, path: str | Path, adapter_name: str | None = None, scale: float = 1.0, **options) -> str:
    """Attach a shift file to a pipeline under `adapter_name` (default: the file's folder name, or its stem when
    it has its own name) after checking it was made for this base. Several files stay loaded side by side;
    returns the name used. `options` go to `svdiff.io.load_shifts` (include, exclude, factor_dtype, cache,
    progress)."""
    from .io import load_shifts as load_into
    from .io import read_shift_file

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
    load_into(components, shift_file, name=name, scale=scale, **options)
    return name


def mixed_batch(target, assignment: list[dict[str, float]]):
    """A context in which sample b of each `pipe(...)` call is drawn with the shift sets and scales of
    assignment[b] (e.g. `[{"dog": 1.0}, {"cat": 0.8}]` with two prompts), all in one batch, as PEFT's
    `adapter_names=` does for LoRA. The sets must be loaded (and not fused); use one image per prompt."""
    from .spectral.mixed import per_sample

    return per_sample(list(components_of(target).values()), assignment)


def shift_sets_of(target) -> dict[str, float]:
    """{name: scale} of the shift sets loaded on a pipeline or module."""
    from .spectral import shift_sets

    out: dict[str, float] = {}
    for model in components_of(target).values():
        out.update(shift_sets(model))
    return out


def set_scales(target, scales: dict[str, float]) -> None:
    """Change the scales of loaded shift sets without reloading or refactorizing (scale 0 = the base)."""
    from .spectral import set_scales as set_on

    unknown = set(scales) - set(shift_sets_of(target))
    if unknown:
        raise SvdiffError(f"no shift set named {sorted(unknown)[0]!r} is loaded")
    for model in components_of(target).values():
        set_on(model, scales)


def unload_shifts(target, adapter_name: str | None = None) -> None:
    """Remove one shift set (or all): the base weights come back bit for bit once none is left."""
    from .spectral import remove_shifts

    for model in components_of(target).values():
        remove_shifts(model, adapter_name)


def fuse(target) -> None:
    """Bake the loaded shifts into the weights (sampling then costs what the base costs)."""
    from .spectral import fuse as fuse_one

    for model in components_of(target).values():
        fuse_one(model)


def unfuse(target) -> None:
    from .spectral import unfuse as unfuse_one

    for model in components_of(target).values():
        unfuse_one(model)
