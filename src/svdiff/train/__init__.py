"""`svdiff train`: DreamBooth-style personalization with spectral shifts (and the LoRA and full fine-tuning
baselines) on Accelerate."""

from .config import TrainConfig, add_train_flags, from_flags, resolve
from .loop import train
from .step import TrainingStep

__all__ = ["TrainConfig", "TrainingStep", "add_train_flags", "from_flags", "resolve", "train"]
