"""The embedded tiny world: a renderer of shapes scenes, subjects to personalize, a judge that reads images back
into words, and two small pipelines pretrained on the world, shipped in the package: a Stable Diffusion UNet base
(the default) and a flow-matching transformer, an SD3 pipeline (`embedded:flow`)."""

from pathlib import Path

from ..errors import SvdiffError

# The embedded bases by name: `embedded:<name>` wherever a base is asked for, `default_base(name)` in Python.
BASE_DIRS = {"unet": Path(__file__).parent / "base", "flow": Path(__file__).parent / "flow_base"}
BASE_DIR = BASE_DIRS["unet"]
# The classifier-free guidance both embedded bases draw their prompts best at (`python benchmarks/world_quality.py
# --guidance_scale G` measures a base at another; at 5 the flow base draws fewer shapes right, docs/world.md).
GUIDANCE_SCALE = 3.0
# the judge's weights (the module `judge.py` beside it is its code)
JUDGE_DIR = Path(__file__).parent / "judge_model"


def default_base(name: str = "unet") -> Path:
    """The folder of the embedded pipeline `name` ("unet" or "flow"); `DiffusionPipeline.from_pretrained` loads it
    offline."""
    if name not in BASE_DIRS:
        raise SvdiffError(f"unknown embedded base {name!r}; choose from {', '.join(BASE_DIRS)}")
    folder = BASE_DIRS[name]
    if not (folder / "model_index.json").is_file():
        raise SvdiffError(
            f"the embedded {name} base is not in this installation ({folder} has no model_index.json); "
            f"`python -m svdiff.world.pretrain --family {'sd3' if name == 'flow' else 'sd'} --out DIR` makes one"
        )
    return folder


def default_judge() -> Path:
    """The folder of the shapes-world judge's weights."""
    if not (JUDGE_DIR / "judge.safetensors").is_file():
        raise SvdiffError(f"the shapes-world judge is missing from {JUDGE_DIR}; reinstall svdiff")
    return JUDGE_DIR
