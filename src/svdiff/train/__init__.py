"""`svdiff train`: DreamBooth-style personalization with spectral shifts (and the LoRA and full fine-tuning
baselines) on Accelerate."""

from .args import add_train_flags, train_args
from .loop import train

__all__ = ["add_train_flags", "train", "train_args"]
