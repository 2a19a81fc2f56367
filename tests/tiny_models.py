"""Small Stable Diffusion components with random weights, for tests of the real-model code paths."""

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
    )


def tiny_text_encoder(vocab_size: int = 50, cls=CLIPTextModel, layers: int = 1, max_positions: int = 8, **config):
    """A CLIP text encoder of width 16 (`cls` CLIPTextModelWithProjection for SDXL's and SD3's second one);
    `config` sets the projection width and the special tokens' ids."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        **config,
    )
    return cls(config)


def tiny_pipeline(tokenizer=None, seed: int = 0, vae_levels: int = 1) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of tiny random components (latents at 1/2**(vae_levels-1) of the image)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8,) * vae_levels,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        latent_channels=4,
        norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(len(tokenizer) if tokenizer is not None else 50),
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(root, prediction_type: str = "epsilon", seed: int = 0):
    """A tiny pipeline saved as a diffusers folder (latents at half the image size, 8-token prompts that cover
    the shapes world's words); returns the folder."""
    from svdiff.world.tokenizer import build_tokenizer

    pipe = tiny_pipeline(build_tokenizer(root / "tokenizer-src", max_length=8), seed=seed, vae_levels=2)
    pipe.scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, steps_offset=1)
    pipe.save_pretrained(root / "base")
    return root / "base"


SUBJECT = Path(__file__).parents[1] / "examples" / "subjects" / "heart_sks"
PROMPT = "a photo of sks heart"


def quick(base, out, **overrides):
    """Arguments of a short, quiet training run on `base` (None: the embedded one) of the example heart."""
    from svdiff.train import TrainConfig

    settings = dict(
        pretrained_model_name_or_path=None if base is None else str(base),
        instance_data_dir=str(SUBJECT),
        instance_prompt=PROMPT,
        output_dir=str(out),
        max_train_steps=6,
        validation_steps=0,
        num_validation_images=2,
        validation_inference_steps=2,
        checkpointing_steps=0,
        report_to="none",
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return (
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=8,
            pooled_projection_dim=6,
            out_channels=4,
            pos_embed_max_size=8,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        )
        .eval()
        .requires_grad_(False)
    )  # frozen, as loaded: matmul folds a strided input only for a frozen weight


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return (
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=8,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=6,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
        .eval()
        .requires_grad_(False)
    )


def cli_args(base, out, *extra, data=SUBJECT) -> list[str]:
    """`svdiff train` arguments of a short, quiet run of the example heart (or `data`) on `base` into `out`."""
    return [
        "train",
        "--pretrained_model_name_or_path",
        str(base),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        PROMPT,
        "--output_dir",
        str(out),
        "--validation_steps",
        "0",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "2",
        "--report_to",
        "none",
        "--no-progress",
        *extra,
    ]


def lora_layers_loaded(pipe, file) -> tuple[set[str], set[str]]:
    """The layers a LoRA file holds and the layers of `pipe` that carry a LoRA adapter after loading it, both as
    `<component>.<module path>`: equal when the pipeline's loader read the whole file."""
    from safetensors.torch import load_file

    held = {key.split(".lora_")[0] for key in load_file(file)}
    carried = {
        f"{name}.{path}"
        for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
        for path, module in getattr(pipe, name).named_modules()
        if getattr(module, "lora_A", None)
    }
    return held, carried
