"""The embedded tiny world: a renderer of shapes scenes, subjects to personalize, a judge that reads images back
into words, and a small Stable Diffusion pipeline pretrained on the world, shipped in the package."""

from pathlib import Path

from ..errors import SvdiffError

BASE_DIR = Path(__file__).parent / "base"
# The classifier-free guidance the embedded base draws its prompts best at (`python benchmarks/world_quality.py
# --guidance_scale G` measures it at another).
GUIDANCE_SCALE = 3.0
# the judge's weights (the module `judge.py` beside it is its code)
JUDGE_DIR = Path(__file__).parent / "judge_model"


def default_base() -> Path:
    """The folder of the embedded pipeline; `DiffusionPipeline.from_pretrained` loads it offline."""
    if not (BASE_DIR / "model_index.json").is_file():
        raise SvdiffError(f"the embedded base pipeline is missing from {BASE_DIR}; reinstall svdiff")
    return BASE_DIR


def default_judge() -> Path:
    """The folder of the shapes-world judge's weights."""
    if not (JUDGE_DIR / "judge.safetensors").is_file():
        raise SvdiffError(f"the shapes-world judge is missing from {JUDGE_DIR}; reinstall svdiff")
    return JUDGE_DIR
