"""The judge: a small CNN that reads a shapes-world image back into words, and tells whether two images show the
same subject.

It looks at the five places an object can stand (left, right, top, bottom, center) and says for each whether an
object is there, which shape, color and pattern it has, and its marks: the emblem's shape and color, the outline's
color (or none). An embedding head, trained so that two views of one
object agree and views of different objects do not, plays the part DINO or CLIP-I plays for photos.

    python -m svdiff.world.judge --out src/svdiff/world/judge
"""

import argparse
import json
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdiffError
from .render import (
    BODY_SHAPES,
    COLORS,
    MARK_COLORS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    Scene,
    random_object,
    random_scene,
    render,
)
from .subjects import random_subject, views

SLOTS = tuple(POSITIONS)
COLOR_NAMES = tuple(COLORS)
MARK_COLOR_NAMES = tuple(MARK_COLORS)
# What each head of a place says, in the order of its classes; None is "no object" or "no mark".
CLASSES = {
    "shape": (None, *SHAPES),
    "color": COLOR_NAMES,
    "pattern": PATTERNS,
    "emblem": (None, *BODY_SHAPES),
    "emblem_color": MARK_COLOR_NAMES,
    "outline": (None, *MARK_COLOR_NAMES),
}
# Heads that only speak of something present: ignored in the loss where the object (or its emblem) is absent.
ATTRIBUTES = ("color", "pattern", "emblem", "emblem_color", "outline")
EMBED_DIM = 64


# Where each place's heads read the 16×16 map: a 3×3 grid around the anchor, 4 pixels apart, so an object's
# centre (and its emblem) is read wherever the object's jitter put it.
NEAR = [(dx, dy) for dy in (-4, 0, 4) for dx in (-4, 0, 4)]


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = self.width = width

        def conv(cin, cout, dilation=1):
            return [
                nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        def block(cin, cout):
            return [*conv(cin, cout), *conv(cout, cout), nn.MaxPool2d(2)]

        # One convolution at full resolution (enough to see 2-pixel stripes), two per level below it, then two
        # at 8×8 (one dilated) so each cell sees a whole large object and its surroundings.
        self.fine = nn.Sequential(*conv(3, w), nn.MaxPool2d(2), *block(w, 2 * w))  # 16×16, 4-pixel cells
        self.coarse = nn.Sequential(*block(2 * w, 4 * w), *conv(4 * w, 4 * w, dilation=2), *conv(4 * w, 4 * w))  # 8×8
        # Every place is read by the same head from the features under its anchor, so a shape learned on the
        # left is known on the right too: the coarse map's vector (the whole object and its surroundings) and the
        # fine map's around the anchor (an emblem's or a pattern's shape).
        self.head = nn.Sequential(nn.Linear(4 * w + len(NEAR) * 2 * w, 192), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(192, len(v)) for k, v in CLASSES.items()})
        self.embed = nn.Sequential(nn.Linear(4 * w, 128), nn.ReLU(), nn.Linear(128, EMBED_DIM))
        anchors = torch.tensor([POSITIONS[s] for s in SLOTS], dtype=torch.float32) / 64 * 2 - 1
        self.register_buffer("anchors", anchors.view(1, 1, len(SLOTS), 2), persistent=False)
        near = torch.tensor([[POSITIONS[s][0] + dx, POSITIONS[s][1] + dy] for s in SLOTS for dx, dy in NEAR])
        self.register_buffer("near", (near.float() / 64 * 2 - 1).view(1, 1, -1, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> dict:
        fine = self.fine(x)
        f = self.coarse(fine)
        b = len(x)
        at = F.grid_sample(f, self.anchors.expand(b, -1, -1, -1), align_corners=False).squeeze(2).transpose(1, 2)
        around = F.grid_sample(fine, self.near.expand(b, -1, -1, -1), align_corners=False).squeeze(2)
        around = around.view(b, -1, len(SLOTS), len(NEAR)).permute(0, 2, 1, 3).flatten(2)  # (batch, slot, c·9)
        h = self.head(torch.cat([at, around], dim=-1))
        return {
            **{k: head(h) for k, head in self.heads.items()},
            # Pooled, so the embedding does not depend on where the subject stands.
            "embedding": F.normalize(self.embed(f.amax(dim=(2, 3))), dim=-1),
        }


def to_input(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def nearest_slot(box) -> int:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(
        range(len(SLOTS)),
        key=lambda i: (POSITIONS[SLOTS[i]][0] - cx) ** 2 + (POSITIONS[SLOTS[i]][1] - cy) ** 2,
    )


def targets(truth) -> dict:
    """Slot labels from ground truth; -100 (ignored by the loss) for the attributes of empty slots, the marks of
    shapes that cannot carry them and the emblem color of an object without an emblem."""
    labels = {k: [0 if k == "shape" else -100] * len(SLOTS) for k in CLASSES}
    for obj in truth.objects:
        s = nearest_slot(obj["box"])
        for k in ("shape", "color", "pattern"):
            labels[k][s] = CLASSES[k].index(obj[k])
        if obj["shape"] in BODY_SHAPES:
            labels["emblem"][s] = CLASSES["emblem"].index(obj["emblem"])
            labels["outline"][s] = CLASSES["outline"].index(obj["outline"])
            if obj["emblem"]:
                labels["emblem_color"][s] = CLASSES["emblem_color"].index(obj["emblem_color"])
    return labels


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur and noise, so the judge reads generated images (softer than renders) as well as renders."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.5:
        arr = np.asarray(image, dtype=np.float32)
        arr = arr + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 10), arr.shape)
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return image


def judge_scene(rng: random.Random) -> Scene:
    """Training scenes: the world's scenes placed more loosely, half of their objects marked."""
    scene = random_scene(rng, marks=0.5)
    objects = tuple(
        replace(
            obj,
            offset=(rng.randint(-5, 5), rng.randint(-5, 5)),
            angle=round(rng.uniform(-25, 25), 1),
        )
        for obj in scene.objects
    )
    return replace(scene, objects=objects)


def pair_views(rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """Two views of one object: a marked subject or a plain object, seen at two places, sizes and backgrounds."""
    obj = random_subject(rng) if rng.random() < 0.5 else replace(random_object(rng, "center", marks=0.5), size="large")
    a, b = views(obj, 2, rng)
    return render(a)[0], render(b)[0]


def train_batch(rng: random.Random, batch_size: int):
    images, labels = [], {k: [] for k in CLASSES}
    for _ in range(batch_size):
        image, truth = render(judge_scene(rng))
        images.append(degrade(image, rng))
        for k, v in targets(truth).items():
            labels[k].append(v)
    pairs = [pair_views(rng) for _ in range(batch_size // 4)]
    views_a = [degrade(a, rng) for a, _ in pairs]
    views_b = [degrade(b, rng) for _, b in pairs]
    return (
        to_input(images),
        {k: torch.tensor(v) for k, v in labels.items()},
        to_input(views_a),
        to_input(views_b),
    )


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE both ways: each view must pick its partner out of the batch."""
    logits = za @ zb.T / temperature
    target = torch.arange(len(za), device=za.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Batches(torch.utils.data.Dataset):
    """Batch `step` is a pure function of (seed, step), so loader workers may build them in any order."""

    def __init__(self, seed: int, steps: int, batch_size: int):
        self.seed, self.steps, self.batch_size = seed, steps, batch_size

    def __len__(self):
        return self.steps

    def __getitem__(self, step):
        return train_batch(random.Random(f"{self.seed}-judge-{step}"), self.batch_size)


def train(args) -> tuple[Judge, float | None]:
    """Trains a judge; checkpoints every `--checkpoint_every` steps into `--out`, and the same command resumes.
    Returns it and its seconds of work over every resumed run (None where a checkpoint did not keep them)."""
    from .pretrain import Clock, load_checkpoint, save_checkpoint

    torch.manual_seed(args.seed)
    model = Judge(args.width).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    ckpt = args.out / "checkpoint.safetensors"
    start, earlier = 0, 0.0
    if ckpt.exists():
        start, earlier = load_checkpoint(ckpt, {"judge": model}, opt)
        with warnings.catch_warnings():  # the schedule is replayed to where the checkpoint left it
            warnings.simplefilter("ignore")
            for _ in range(start):
                sched.step()
    clock = Clock(earlier)
    model.train()
    batches = Batches(args.seed, args.steps, args.batch_size)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start, args.steps)),
        batch_size=None,
        num_workers=args.workers,
    )
    bar = tqdm(loader, desc="judge", initial=start, total=args.steps)
    for step, (x, y, va, vb) in enumerate(bar, start=start):
        x, va, vb = x.to(args.device), va.to(args.device), vb.to(args.device)
        y = {k: v.to(args.device) for k, v in y.items()}
        out = model(torch.cat([x, va, vb]))
        n, m = len(x), len(va)
        loss = sum(F.cross_entropy(out[k][:n].flatten(0, 1), y[k].flatten(), ignore_index=-100) for k in CLASSES)
        loss = loss + contrastive_loss(out["embedding"][n : n + m], out["embedding"][n + m :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(ckpt, {"judge": model}, opt, step + 1, clock.seconds())
    return model.cpu().eval(), clock.total()


def save(model: Judge, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "judge.safetensors"),
        metadata={
            "format": "svdiff-world-judge",
            "slots": ",".join(SLOTS),
            "width": str(model.width),
        },
    )


def load(folder: str | Path) -> Judge:
    path = str(Path(folder) / "judge.safetensors")
    with safe_open(path, "pt") as f:
        width = int((f.metadata() or {}).get("width", 24))
    model = Judge(width)
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def read(model: Judge, images, batch_size: int = 64) -> list[dict]:
    """What the judge sees in each image: per slot, the object (or None) with its shape, color, pattern and marks
    (None where it has none) and the judge's confidence that something stands there; plus the embedding."""
    results = []
    for i in range(0, len(images), batch_size):
        out = model(to_input(images[i : i + batch_size]))
        shape_p = out["shape"].softmax(-1)
        best = {k: out[k].argmax(-1).tolist() for k in CLASSES}
        for b in range(len(shape_p)):
            slots = {}
            for s, name in enumerate(SLOTS):
                found = {k: CLASSES[k][best[k][b][s]] for k in CLASSES}
                if found["shape"] is not None and found["shape"] not in BODY_SHAPES:
                    found["emblem"] = found["outline"] = None
                if found["emblem"] is None:
                    found["emblem_color"] = None
                found["confidence"] = round(float(1 - shape_p[b, s, 0]), 4)
                slots[name] = None if found["shape"] is None else found
            results.append({"slots": slots, "embedding": out["embedding"][b]})
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the shapes-world judge.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="processes rendering batches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=32, help="channels of the first convolution")
    p.add_argument("--checkpoint_every", type=int, default=250)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.batch_size < 4:
        raise SvdiffError("--batch_size must be at least 4: a quarter of each batch is pairs of views")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model, seconds = train(args)
    save(model, args.out)
    minutes = (time.time() - began) / 60
    record = {k: str(v) for k, v in vars(args).items() if k != "out"} | {
        # work over every resumed run (None where a checkpoint did not keep it); this run's wall time beside it
        "minutes": None if seconds is None else round(seconds / 60, 1),
        "minutes_this_run": round(minutes, 1),
    }
    (args.out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
