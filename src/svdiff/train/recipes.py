"""Named training recipes: the settings the demo, editing, the benchmarks and the documentation pictures share.

train(subject("examples/subjects/heart_sks", "a photo of sks heart", "a photo of a heart",
              class_data_dir="runs/class-heart", output_dir="runs/heart", max_train_steps=400))
"""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_LR, TrainConfig

# A run that writes only its result: no checkpoints, no validation grids along the way, no tracker.
QUIET = dict(checkpointing_steps=0, validation_steps=0, num_validation_images=1, report_to="none")
# Prior preservation as the demo runs it: 50 class images, generated 25 at a time.
PRIOR = dict(with_prior_preservation=True, num_class_images=50, sample_batch_size=25)


def quiet(**settings) -> TrainConfig:
    """A run that writes only its shift file, summary, samples and card."""
    return TrainConfig(**(QUIET | settings))


def subject(
    instance_data_dir: str | Path, instance_prompt: str, class_prompt: str, class_data_dir: str | Path, **settings
) -> TrainConfig:
    """Personalize one subject with prior preservation on its class (the paper's DreamBooth setting), quietly;
    `settings` replace any of it."""
    data = dict(
        instance_data_dir=str(instance_data_dir),
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        class_data_dir=str(class_data_dir),
    )
    return quiet(**(PRIOR | data | settings))


def single_image(folder: str | Path, caption: str, **settings) -> TrainConfig:
    """§4.1's single-image editing: one (image, caption) pair, no identifier and no prior term, the paper's rates
    on every base (those the editing benchmark measures); center crops and no flips keep the image as it is."""
    data = dict(instance_data_dir=str(folder), instance_prompt=caption, center_crop=True)
    rate = DEFAULT_LR[settings.get("method", TrainConfig.method)]
    return quiet(**(data | dict(learning_rate=rate) | settings))
