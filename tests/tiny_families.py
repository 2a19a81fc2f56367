"""Tiny random-weight pipelines of SDXL, SD3 and Flux.1, built from their diffusers and transformers classes with
small configs (the shapes of diffusers' own pipeline tests, smaller), with tokenizers made locally: the world's
CLIP tokenizer, and for T5 a word-level tokenizer built with the `tokenizers` library. Saved as diffusers folders,
so the code under test loads them as a user's model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from svdiff.world.tokenizer import build_tokenizer, vocabulary_words
from tiny_models import tiny_text_encoder

FAMILIES = ("sdxl", "sd3", "flux")
RESOLUTION = 16  # pixels; every tiny VAE here keeps the image's size in its latents


def clip(tokenizer, cls=CLIPTextModel):
    """A two-layer CLIP text encoder of width 16 for `tokenizer`, projecting to 8."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return tiny_text_encoder(
        len(tokenizer), cls, 2, tokenizer.model_max_length, projection_dim=8, pad_token_id=tokenizer.pad_token_id, **ids
    )


def t5_tokenizer(max_length: int = 12) -> PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer over the world's words: pad 0, </s> 1, <unk> 2, and </s> after each text."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(vocabulary_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def t5(tokenizer, d_model: int = 16) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def vae(latent_channels: int, **factors) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=4,
        **factors,
    )


def sdxl(tokenizer) -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,  # six time ids and text_encoder_2's projection
        cross_attention_dim=32,  # both encoders' hidden states side by side
        norm_num_groups=4,
    )
    return StableDiffusionXLPipeline(
        vae=vae(4),
        text_encoder=clip(tokenizer),
        text_encoder_2=clip(tokenizer, CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )


def sd3(tokenizer) -> StableDiffusion3Pipeline:
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=32,  # CLIP-L and CLIP-G side by side, and T5's width
        caption_projection_dim=8,
        pooled_projection_dim=16,  # both CLIPs' projections
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    t5_tok = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(4, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip(tokenizer, CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        text_encoder_2=clip(tokenizer, CLIPTextModelWithProjection),
        tokenizer_2=tokenizer,
        text_encoder_3=t5(t5_tok, d_model=32),
        tokenizer_3=t5_tok,
    )


def flux(tokenizer) -> FluxPipeline:
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # latents packed 2×2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,  # T5's width
        pooled_projection_dim=16,  # CLIP's width
        guidance_embeds=True,  # as Flux.1-dev
        axes_dims_rope=(2, 2, 4),
    )
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(4, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return pipe


def save_family_pipeline(family: str, root: Path, seed: int = 0) -> Path:
    """A tiny pipeline of `family` saved as a diffusers folder under `root`; returns the folder."""
    tokenizer = build_tokenizer(root / f"{family}-tokenizer", max_length=16)  # a collage's two-subject prompt fits
    torch.manual_seed(seed)
    pipe = {"sdxl": sdxl, "sd3": sd3, "flux": flux}[family](tokenizer)
    folder = root / family
    pipe.save_pretrained(folder)
    return folder
