"""The embedded bases' denoisers, pretrained on the same autoencoder and captions (`pretrain.py`):

- `UNetBase` ("sd", the default base): a Stable Diffusion pipeline, its UNet and CLIP text encoder; v-prediction
  on SD's betas rescaled to zero terminal SNR.
- `FlowBase` ("sd3"): a Stable Diffusion 3 pipeline, an MMDiT of six joint blocks on 2×2 patches conditioned on
  two CLIP encoders (SD3's layout: the second is small here); rectified flow. SD3 rather than Flux because SD3
  runs without T5, on the world's CLIP words alone, where Flux takes its whole token sequence from T5. Its T5 slot
  holds a silent T5 (`silent_t5`), so that stock `from_pretrained` finds every component it expects.

Each says how it is built, what one batch's error is, and how its trained parts make a stock pipeline.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ..errors import SvdiffError
from ..families import family_of
from ..families.noise import RectifiedFlow
from .render import world_words
from .tokenizer import IDENTIFIERS

# Stable Diffusion's betas, rescaled so the last step is pure noise, with v-prediction and trailing timesteps
# (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", as in SD 2.x's v-models). On 16×16
# latents SD's schedule leaves ~7% of the image in its noisiest step, enough for the mean color of the scene to
# show through; a model trained on that takes the background and colors from the starting noise, not the caption.
NOISE_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


def sample_timesteps(n: int, total: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform for shift 1; shift > 1 moves them towards the noisy end (u ↦ s·u / (1 + (s−1)·u),
    as SD3 does), where a picture's layout and shapes are decided."""
    if shift == 1:
        return torch.randint(0, total, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (total * shift * u / (1 + (shift - 1) * u)).long().clamp(max=total - 1)


def clip_config(tokenizer, hidden: int, layers: int, heads: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def make_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(clip_config(tokenizer, 128, 3, 4))


def voice_identifiers(text_encoder, tokenizer) -> float:
    """Identifiers are in no caption, so their embeddings keep their initial size, a third of a trained word's: the
    encoder barely hears them and encodes "sks heart" as it does "xyz heart". A real model's rare word is a trained
    word like any other, so each identifier keeps its random direction, scaled to the median norm of the world's
    words (which it returns)."""
    table = text_encoder.get_input_embeddings().weight
    words = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in world_words()]
    rows = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in IDENTIFIERS]
    norm = table[words].detach().norm(dim=1).median()
    with torch.no_grad():
        table[rows] *= (norm / table[rows].norm(dim=1))[:, None]
    return round(float(norm), 5)


def silent_t5(width: int) -> tuple[T5EncoderModel, PreTrainedTokenizerFast]:
    """A T5 encoder of zero weights, whose output is zeros (its final norm's weight is 0), and a tokenizer that
    turns any text into padding only (so the pipeline never warns of a truncated prompt): what SD3's pipeline
    conditions on without T5, in a form its folder can hold. svdiff's SD3 family treats it as no T5."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]+"), "")
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=4, d_ff=4, num_layers=1, num_heads=1)
    encoder = T5EncoderModel(config)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    return encoder.eval().requires_grad_(False), fast


class UNetBase:
    name = "sd"

    def __init__(self, tokenizer, vae, args, init=None):
        """`init`: a pipeline of this kind whose UNet and text encoder train further."""
        if init is not None and not isinstance(init, StableDiffusionPipeline):
            raise SvdiffError(f"--init_from: a UNet base trains further from a UNet base, not a {type(init).__name__}")
        if init is not None:
            self.modules = {"unet": init.unet, "text_encoder": init.text_encoder}
        else:
            self.modules = {
                "unet": self.make_unet(args.vae_latent_channels),
                "text_encoder": make_text_encoder(tokenizer),
            }
        self.tokenizer, self.args = tokenizer, args
        self.noise = DDPMScheduler(**NOISE_SCHEDULE)

    @staticmethod
    def make_unet(latent_channels: int = 4) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            cross_attention_dim=128,
            attention_head_dim=4,
            norm_num_groups=8,
            # The attention-pooled caption is added to the time embedding too (as in DeepFloyd IF), so what the
            # caption says about the whole picture reaches every layer, not only the attention ones.
            addition_embed_type="text",
            addition_embed_type_num_heads=4,
        )

    def normalize(self, vae, latents: torch.Tensor) -> tuple[float, float]:
        """(shift, scale) that bring the training latents to unit spread, recorded in the autoencoder's config."""
        scale = round(1.0 / latents.std().item(), 5)
        vae.register_to_config(scaling_factor=scale)
        return 0.0, scale

    def error(self, z0: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Squared error of the predicted velocity, per latent element."""
        args = self.args
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=generator)
        t = sample_timesteps(len(z0), self.noise.config.num_train_timesteps, args.timestep_shift, generator)
        z0, noise, t, ids = z0.to(args.device), noise.to(args.device), t.to(args.device), ids.to(args.device)
        zt = self.noise.add_noise(z0, noise, t)
        pred = self.modules["unet"](zt, t, self.modules["text_encoder"](ids).last_hidden_state).sample
        return (pred - self.noise.get_velocity(z0, noise, t)).square()

    def pipeline(self, vae, modules: dict) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=modules["text_encoder"],
            tokenizer=self.tokenizer,
            unet=modules["unet"],
            scheduler=DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class FlowBase:
    name = "sd3"

    def __init__(self, tokenizer, vae, args, init=None):
        """`init`: a flow base whose transformer and text encoders train further, or a UNet base whose text
        encoder starts this one's first (it already knows the world's words)."""
        self.tokenizer, self.args = tokenizer, args
        if isinstance(init, StableDiffusion3Pipeline):
            names = ("transformer", "text_encoder", "text_encoder_2")
            self.modules = {n: getattr(init, n) for n in names}
        else:
            first = CLIPTextModelWithProjection(clip_config(tokenizer, 128, 3, 4, projection_dim=128))
            if init is not None:
                first.text_model.load_state_dict(init.text_encoder.state_dict())
            second = CLIPTextModelWithProjection(clip_config(tokenizer, 64, 2, 2, projection_dim=64))
            self.modules = {
                "transformer": self.make_transformer(args.vae_latent_channels, 128 + 64),
                "text_encoder": first,
                "text_encoder_2": second,
            }
        scheduler = FlowMatchEulerDiscreteScheduler(shift=args.timestep_shift)
        self.flow = RectifiedFlow(scheduler.config, weighting_scheme="logit_normal")
        self.t5 = silent_t5(self.modules["transformer"].config.joint_attention_dim)
        self.family = family_of(self.pipeline(vae, self.modules))

    @staticmethod
    def make_transformer(latent_channels: int, text_width: int) -> SD3Transformer2DModel:
        # 16×16 latents in 2×2 patches: 64 image tokens beside the caption's 48 CLIP tokens and T5's empty one.
        return SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=6,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=text_width,  # both CLIPs' hidden states side by side
            caption_projection_dim=128,
            pooled_projection_dim=text_width,  # both CLIPs' projections
            pos_embed_max_size=16,
            qk_norm="rms_norm",  # as SD3.5, which trains stably at higher learning rates
        )

    def normalize(self, vae, latents: torch.Tensor) -> tuple[float, float]:
        """Centred and brought to unit spread, as SD3's autoencoder config records (shift_factor, scaling_factor)."""
        shift = round(latents.mean().item(), 5)
        scale = round(1.0 / (latents - shift).std().item(), 5)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        return shift, scale

    def error(self, z0: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Squared error of the predicted flow ε − x₀, per latent element (σ drawn logit-normal on the schedule)."""
        noise = torch.randn(z0.shape, generator=generator)
        noisy, t, target, _ = self.flow.corrupt(z0, noise, [generator] * len(z0))
        device = self.args.device
        pred = self.family.predict(noisy.to(device), t.to(device), self.family.encode(prompts))
        return (pred - target.to(device)).square()

    def pipeline(self, vae, modules: dict) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=modules["transformer"],
            scheduler=FlowMatchEulerDiscreteScheduler(shift=self.args.timestep_shift),
            vae=vae,
            text_encoder=modules["text_encoder"],
            tokenizer=self.tokenizer,
            text_encoder_2=modules["text_encoder_2"],
            tokenizer_2=self.tokenizer,
            text_encoder_3=self.t5[0],
            tokenizer_3=self.t5[1],
        )


BASES = {base.name: base for base in (UNetBase, FlowBase)}
