"""Pretrains an embedded base: a tiny diffusers pipeline that draws the shapes world from its captions.

    python -m svdiff.world.pretrain --out src/svdiff/world/base --work_dir runs/pretrain
    python -m svdiff.world.pretrain --family sd3 --init_from src/svdiff/world/base --out src/svdiff/world/flow_base

Two phases, as Stable Diffusion was built: an AutoencoderKL (64×64 RGB ↔ 16×16×4 latents), trained on random
windows of rendered scenes; then the denoiser and its text encoders together on the latents of a fixed set of
scenes (10% empty captions for classifier-free guidance). `--family` picks the denoiser (`denoisers.py`): a UNet
("sd", the default base) or a flow-matching transformer ("sd3", the flow base), which takes the autoencoder and
the text encoder of the base given by `--init_from`. Every random choice is a function of (seed, step), so the run
is deterministic and resumes from its last checkpoint in `--work_dir` with the same command.
"""

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import SvdiffError
from ..families import call_arguments
from ..files import atomic_path
from ..flags import flag
from ..pictures import grid
from .denoisers import BASES, voice_identifiers
from .render import (
    BACKGROUNDS,
    SHAPES,
    SIZE,
    SS,
    Scene,
    caption,
    held_out_identity,
    random_scene,
    render,
    shape_mask,
)
from .subjects import random_subject, views
from .tokenizer import build_tokenizer

# Sampled at every checkpoint into work_dir/preview_<step>.png: four held-out triples, two pairs, no prompt.
PREVIEW_PROMPTS = (
    "a photo of a pink striped star",
    "a photo of a blue dotted heart on the left",
    "a photo of a yellow dotted square at the top on a dark background",
    "a photo of a green checkered ring",
    "a photo of a pink ring on the left and a cyan cross on the right",
    "a photo of a purple triangle at the top and an orange diamond at the bottom",
    "",
)


def make_vae(channels: tuple[int, ...] = (16, 32, 64), layers: int = 1, latent_channels: int = 4) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent_channels,
        # Few, wide groups: a group of one or two channels normalizes away the absolute colour of a flat region.
        norm_num_groups=4,
        sample_size=64,
    )
    # Start the posterior narrow (σ ≈ 0.02): with σ ≈ 1 at init, the sampled latents are mostly noise and the
    # decoder learns little until the encoder has shrunk them, which costs most of a short schedule.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(-8.0)
    return vae


def to_tensor(images) -> torch.Tensor:
    """PIL images → a float batch in [-1, 1], as Stable Diffusion's VAE expects."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, modules: dict, optimizer: torch.optim.Optimizer, step: int, seconds: float) -> None:
    """Model and Adam state in safetensors (no pickle), plus the step and the seconds of work that reached it (over
    every resumed run), written atomically."""
    tensors = {f"{name}.{k}": v.contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{j}.{k}"] = torch.as_tensor(v).reshape(-1).contiguous()
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={"step": str(step), "seconds": f"{seconds:.1f}"})


def load_checkpoint(path: Path, modules: dict, optimizer: torch.optim.Optimizer) -> tuple[int, float | None]:
    """The step a checkpoint reached and its seconds of work (None for a checkpoint that predates keeping them)."""
    tensors = load_file(str(path))
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.{j}.")}
            if state:
                state["step"] = state["step"].reshape(())
                state["exp_avg"] = state["exp_avg"].view_as(p)
                state["exp_avg_sq"] = state["exp_avg_sq"].view_as(p)
                optimizer.state[p] = state
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return int(meta["step"]), float(meta["seconds"]) if "seconds" in meta else None


class Clock:
    """Seconds of work on one phase: those of the checkpoint it resumed from plus this run's."""

    def __init__(self, earlier: float | None):
        self.earlier, self.began = earlier, time.time()

    def seconds(self) -> float:
        return (self.earlier or 0.0) + time.time() - self.began

    def total(self) -> float | None:
        return None if self.earlier is None else self.seconds()


def object_mask(x: torch.Tensor, backgrounds: list[str]) -> torch.Tensor:
    """1 where a pixel is not its scene's background color, else 0."""
    bg = to_tensor([Image.new("RGB", (1, 1), BACKGROUNDS[b]) for b in backgrounds]).to(x.device)
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()


def object_weights(x: torch.Tensor, backgrounds: list[str]) -> torch.Tensor:
    """Per-pixel loss weights, 10 on objects and 1 on background: objects cover a small part of the frame but
    carry everything a caption says, so the autoencoder should spend its effort there."""
    return 1.0 + 9.0 * object_mask(x, backgrounds)


def random_crops(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """One random `size`×`size` window of each image. The autoencoder is convolutional, so it learns as well
    from windows as large as the largest object, at a fraction of the cost of whole scenes."""
    if size >= x.shape[-1]:
        return x
    corners = [(rng.randrange(x.shape[-2] - size + 1), rng.randrange(x.shape[-1] - size + 1)) for _ in x]
    return torch.stack([im[:, i : i + size, j : j + size] for im, (i, j) in zip(x, corners, strict=True)])


def scribble(image: Image.Image, rng: random.Random, n: int) -> Image.Image:
    """`n` lines, dots and small shapes of any color over an image, anti-aliased as the renderer draws: structure
    outside the world's vocabulary, so the autoencoder learns to encode pictures, not just the world's words."""
    side = SIZE * SS
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(n):
        color = (*(rng.randrange(256) for _ in range(3)), 255)
        x, y = rng.uniform(0, side), rng.uniform(0, side)
        kind = rng.randrange(3)
        if kind == 0:
            length, angle = rng.uniform(4, 24) * SS, rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=color, width=int(rng.uniform(1, 3) * SS))
        elif kind == 1:
            r = rng.uniform(0.7, 3) * SS
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            px = int(rng.uniform(4, 14) * SS)
            layer.paste(color, (int(x - px / 2), int(y - px / 2)), shape_mask(rng.choice(SHAPES), px))
    layer = layer.resize((SIZE, SIZE), Image.BOX)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def autoencoder_scene(rng: random.Random) -> Scene:
    """What the autoencoder learns from: scenes whose objects carry marks more often than the denoiser's do, and
    views of marked subjects as personalization shows them (larger, turned further). Held-out identities never
    appear, so the subjects a benchmark measures are new to it."""
    if rng.random() < 0.25:
        while True:
            subject = random_subject(rng)
            if not held_out_identity(subject):
                return views(subject, 1, rng)[0]
    return random_scene(rng, allow_held_out=False, marks=0.6)


def autoencoder_batch(rng: random.Random, n: int) -> tuple[list[Image.Image], list[str]]:
    """`n` images and their backgrounds; half of them scribbled over."""
    images, backgrounds = [], []
    for _ in range(n):
        scene = autoencoder_scene(rng)
        image = render(scene)[0]
        if rng.random() < 0.5:
            image = scribble(image, rng, rng.randint(1, 8))
        images.append(image)
        backgrounds.append(scene.background)
    return images, backgrounds


def train_vae(vae, args, work: Path) -> float | None:
    """Object-weighted reconstruction (L1 + MSE) with a tiny KL term, on windows of freshly drawn images.
    Returns the phase's seconds of work (None when it resumed from a checkpoint that predates keeping them)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = work / "vae.safetensors"
    start, earlier = load_checkpoint(ckpt, {"vae": vae}, opt) if ckpt.exists() else (0, 0.0)
    clock = Clock(earlier)
    vae.train()
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps)
    for step in bar:
        rng = random.Random(f"{args.seed}-vae-{step}")
        images, backgrounds = autoencoder_batch(rng, args.vae_batch_size)
        x = to_tensor(images).to(args.device)
        w = object_weights(x, backgrounds)
        x, w = random_crops(torch.cat([x, w], dim=1), args.vae_crop, rng).split([3, 1], dim=1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        posterior = vae.encode(x).latent_dist
        torch.manual_seed(args.seed * 1_000_003 + step)
        recon = vae.decode(posterior.sample()).sample
        err = recon - x
        loss = (w * (err.abs() + err.square())).mean() / w.mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1, clock.seconds())
    vae.eval()
    return clock.total()


@torch.no_grad()
def encode_scenes(vae, scenes, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means of every training scene (the denoiser trains on these instead of re-encoding each step), and
    which latent cells hold part of an object."""
    chunks, masks = [], []
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for i in tqdm(range(0, len(scenes), batch_size), desc="encode"):
        batch = scenes[i : i + batch_size]
        x = to_tensor([render(s)[0] for s in batch]).to(device)
        chunks.append(vae.encode(x).latent_dist.mean.cpu())
        masks.append(F.max_pool2d(object_mask(x, [s.background for s in batch]), factor).bool().cpu())
    return torch.cat(chunks), torch.cat(masks)


def training_scenes(seed: int, n: int, marks: float) -> list:
    """The denoiser's data set: a share `marks` of its body shapes carry marks. Held-out (shape, color, pattern)
    triples and held-out identities are left out (see `render.held_out`, `render.held_out_identity`)."""
    rng = random.Random(f"{seed}-scenes")
    return [random_scene(rng, allow_held_out=False, marks=marks) for _ in range(n)]


class EMA:
    """Exponential moving average of weights; the shipped pipeline holds the averaged weights."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


@torch.no_grad()
def preview(base, vae, shadows: dict, path: Path) -> None:
    """Samples the preview prompts with the averaged weights, without disturbing the weights being trained."""
    averaged = {}
    for name, module in base.modules.items():
        averaged[name] = copy.deepcopy(module).eval()
        averaged[name].load_state_dict(shadows[name])
    pipe = base.pipeline(vae, averaged)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in PREVIEW_PROMPTS:
        gen = torch.Generator(base.args.device).manual_seed(0)
        images += pipe(
            [prompt] * 6,
            num_inference_steps=25,
            guidance_scale=4.0,
            generator=gen,
            height=64,
            width=64,
            **call_arguments(pipe),
        ).images
    grid(images, cols=6, labels=[p or "(empty prompt)" for p in PREVIEW_PROMPTS]).save(path)


def train_denoiser(base, latents, masks, scenes, vae, args, work: Path):
    """Trains the base's denoiser and text encoders together on the scenes' latents (already normalized), then
    leaves their averaged weights in them. Returns the phase's seconds of work (None as `train_vae`)."""
    modules = base.modules
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    emas = {name: EMA(m, args.ema_decay) for name, m in modules.items()}
    ckpt = work / "denoiser.safetensors"
    start, earlier = 0, 0.0
    if ckpt.exists():
        start, earlier = load_checkpoint(ckpt, modules, opt)
        shadows = load_file(str(work / "ema.safetensors"))
        for name, ema in emas.items():
            ema.shadow = {k[len(name) + 1 :]: v for k, v in shadows.items() if k.startswith(name + ".")}
    clock = Clock(earlier)
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, args.steps), desc="denoiser", initial=start, total=args.steps)
    for step in bar:
        rng = random.Random(f"{args.seed}-denoise-{step}")
        idx = [rng.randrange(len(scenes)) for _ in range(args.batch_size)]
        prompts = [
            ""
            if rng.random() < args.caption_dropout
            else caption(scenes[i], rng, args.attribute_dropout, args.right_first, args.mark_naming)
            for i in idx
        ]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        err = base.error(latents[idx], prompts, gen)
        if args.object_weight == 1:
            loss = err.mean()
        else:  # as in the autoencoder: the objects carry what the caption says, the background little
            w = 1 + (args.object_weight - 1) * masks[idx].float().to(args.device)
            loss = (w * err).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for name, ema in emas.items():
            ema.update(modules[name], step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt, modules, opt, step + 1, clock.seconds())
            shadows = {f"{name}.{k}": v.contiguous() for name, ema in emas.items() for k, v in ema.shadow.items()}
            save_file(shadows, str(work / "ema.safetensors"))
            if (step + 1) % args.preview_every == 0 or step + 1 == args.steps:
                averaged = {name: ema.shadow for name, ema in emas.items()}
                preview(base, vae, averaged, work / f"preview_{step + 1:06d}.png")
                for m in modules.values():
                    m.train()
    for name, m in modules.items():
        m.load_state_dict(emas[name].shadow)
        m.eval()
    return clock.total()


def assemble(base, vae, tokenizer_dir: Path, out: Path):
    """A stock diffusers folder; each tokenizer keeps CLIP's vocab.json/merges.txt beside tokenizer.json. A
    component taken from `--init_from` would record that folder as its `_name_or_path`: the folder stands alone,
    so no config names another."""
    pipe = base.pipeline(vae.cpu(), {name: m.cpu() for name, m in base.modules.items()})
    pipe.save_pretrained(out, safe_serialization=True)
    for path in sorted(out.glob("*/config.json")):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # transformers 5 names its fast tokenizer class TokenizersBackend; PreTrainedTokenizerFast is the same class
    # there and the name transformers 4 (and the tools built on it) load
    for path in [out / "model_index.json", *out.glob("*/tokenizer_config.json")]:
        path.write_text(path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    store_half(out)
    for folder in ("tokenizer", "tokenizer_2"):
        if (out / folder).is_dir():
            for name in ("vocab.json", "merges.txt"):
                (out / folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return pipe


def store_half(folder: Path) -> None:
    """Rewrites every weight file of a pipeline folder in fp16, which halves the package. The configs still say
    float32, so `from_pretrained` loads the weights back into float32 modules (a CPU computes in float32; a
    transformers model whose config said float16 would stay in half)."""
    for path in sorted(folder.glob("*/*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(half, str(path), metadata=metadata)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag(p, "out", type=Path, required=True, help="where to write the pipeline folder")
    flag(p, "work_dir", type=Path, default=Path("runs/pretrain"), help="checkpoints, to resume from")
    flag(p, "family", choices=sorted(BASES), default="sd", help="the denoiser: a UNet (sd) or an MMDiT (sd3)")
    flag(p, "seed", type=int, default=0)
    flag(p, "device", default="cpu")
    flag(p, "threads", type=int, default=2)
    flag(p, "vae_steps", type=int, default=12000)
    flag(p, "vae_batch_size", type=int, default=32)
    flag(p, "vae_crop", type=int, default=32, help="side of the random windows the autoencoder sees")
    flag(p, "vae_lr", type=float, default=3e-3)
    flag(p, "vae_channels", type=int, nargs="+", default=[16, 32, 64], help="the autoencoder's block widths")
    flag(p, "vae_layers", type=int, default=1, help="the autoencoder's layers per block")
    flag(p, "vae_latent_channels", type=int, default=4, help="channels of the latents (the UNet's in and out)")
    flag(p, "num_scenes", type=int, default=20000)
    flag(p, "steps", type=int, default=12000)
    flag(p, "batch_size", type=int, default=32)
    flag(p, "lr", type=float, default=1e-3)
    flag(p, "ema_decay", type=float, default=0.999)
    flag(p, "caption_dropout", type=float, default=0.1)
    flag(p, "timestep_shift", type=float, default=3.0, help="> 1 trains more often at high noise")
    for name, chance in (
        ("attribute_dropout", "a caption leaves out an object's color, and its pattern"),
        ("right_first", "a two-object caption names the right (bottom) object first"),
    ):
        flag(p, name, type=float, default=0.0, help=f"chance that {chance}")
    flag(p, "marks", type=float, default=0.4, help="share of the denoiser's body shapes that carry marks")
    flag(p, "mark_naming", type=float, default=0.75, help="chance that a caption names an object's marks")
    flag(p, "object_weight", type=float, default=2.5, help="loss weight of latent cells holding an object")
    flag(
        p,
        "init_from",
        type=Path,
        default=None,
        help="a base to start from: its autoencoder is kept; a base of --family trains further, a UNet base gives an "
        "sd3 base its text encoder",
    )
    flag(p, "checkpoint_every", type=int, default=250)
    flag(p, "preview_every", type=int, default=2500, help="a multiple of --checkpoint_every")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()

    tokenizer_dir = args.work_dir / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    if args.init_from is None:
        vae = make_vae(tuple(args.vae_channels), args.vae_layers, args.vae_latent_channels)
        base = BASES[args.family](tokenizer, vae, args)
        vae.to(args.device)
        vae_seconds = train_vae(vae, args, args.work_dir)
    else:  # another base's autoencoder (and text encoder or denoiser, as the family takes them): no autoencoder phase
        init = DiffusionPipeline.from_pretrained(args.init_from)
        if (init.tokenizer.get_vocab(), init.tokenizer.model_max_length) != (
            tokenizer.get_vocab(),
            tokenizer.model_max_length,
        ):
            raise SvdiffError(f"--init_from {args.init_from}: its tokenizer is not this world's; pretrain from scratch")
        vae, vae_seconds = init.vae, 0.0
        base = BASES[args.family](tokenizer, vae, args, init)
        vae.to(args.device)

    encoding = time.time()
    scenes = training_scenes(args.seed, args.num_scenes, args.marks)
    latents, masks = encode_scenes(vae, scenes, 256, args.device)
    args.shift_factor, args.scaling_factor = base.normalize(vae, latents)
    latents = (latents - args.shift_factor) * args.scaling_factor
    for module in base.modules.values():
        module.to(args.device)
    encode_seconds = time.time() - encoding
    denoiser_seconds = train_denoiser(base, latents, masks, scenes, vae, args, args.work_dir)
    norms = [voice_identifiers(m, tokenizer) for name, m in base.modules.items() if name.startswith("text_encoder")]
    args.identifier_norm = norms[0]
    assemble(base, vae, tokenizer_dir, args.out)
    minutes = (time.time() - began) / 60
    phases = {"autoencoder": vae_seconds, "encoding": encode_seconds, "denoiser": denoiser_seconds}
    known = None not in phases.values()
    record = {
        # Work over every resumed run (None where a checkpoint predates keeping it); this run's wall time beside it.
        "minutes": round(sum(phases.values()) / 60, 1) if known else None,
        "phase_minutes": {k: None if v is None else round(v / 60, 1) for k, v in phases.items()},
        "minutes_this_run": round(minutes, 1),
        "threads": args.threads,
        "device": args.device,
        **{
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("out", "work_dir", "device", "threads")
        },
    }
    (args.work_dir / "run.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
