"""The judge: a small CNN that reads a shapes-world image back into words, and tells whether two images show the
same subject.

It looks at the five places an object can stand (left, right, top, bottom, center) and says for each whether an
object is there and which shape, color and pattern it has. An embedding head, trained so that two views of one
object agree and views of different objects do not, plays the part DINO or CLIP-I plays for photos.

    python -m svdiff.world.judge --out src/svdiff/world/judge
"""

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .render import COLORS, PATTERNS, POSITIONS, SHAPES, Scene, random_object, random_scene, render
from .subjects import random_subject, views

SLOTS = tuple(POSITIONS)
COLOR_NAMES = tuple(COLORS)
EMBED_DIM = 64


class Judge(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def conv(cin, cout, dilation=1):
            return [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU()]

        def block(cin, cout):
            return [*conv(cin, cout), *conv(cout, cout), nn.MaxPool2d(2)]

        # One convolution at full resolution (enough to see 2-pixel stripes), two per level below it, then two
        # at 8×8 (one dilated) so each cell sees a whole large object and its surroundings.
        self.features = nn.Sequential(
            *conv(3, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 4 * w),
            *conv(4 * w, 4 * w, dilation=2),
            *conv(4 * w, 4 * w),
        )
        # Every place is read by the same head from the features under its anchor, so a shape learned on the
        # left is known on the right too.
        self.head = nn.Sequential(nn.Linear(4 * w, 128), nn.ReLU())
        self.shape = nn.Linear(128, len(SHAPES) + 1)  # "no object" plus every shape
        self.color = nn.Linear(128, len(COLOR_NAMES))
        self.pattern = nn.Linear(128, len(PATTERNS))
        self.embed = nn.Sequential(nn.Linear(4 * w, 128), nn.ReLU(), nn.Linear(128, EMBED_DIM))
        anchors = torch.tensor([POSITIONS[s] for s in SLOTS], dtype=torch.float32) / 64 * 2 - 1
        self.register_buffer("anchors", anchors.view(1, 1, len(SLOTS), 2), persistent=False)

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        grid = self.anchors.expand(len(x), -1, -1, -1)
        at = F.grid_sample(f, grid, align_corners=False).squeeze(2).transpose(1, 2)  # (batch, slot, channel)
        h = self.head(at)
        return {
            "shape": self.shape(h),
            "color": self.color(h),
            "pattern": self.pattern(h),
            # Pooled, so the embedding does not depend on where the subject stands.
            "embedding": F.normalize(self.embed(f.amax(dim=(2, 3))), dim=-1),
        }


def to_input(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def nearest_slot(box) -> int:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(range(len(SLOTS)), key=lambda i: (POSITIONS[SLOTS[i]][0] - cx) ** 2 + (POSITIONS[SLOTS[i]][1] - cy) ** 2)


def targets(truth) -> dict:
    """Slot labels from ground truth; -100 (ignored by the loss) for the color and pattern of empty slots."""
    shape = [0] * len(SLOTS)
    color, pattern = [-100] * len(SLOTS), [-100] * len(SLOTS)
    for obj in truth.objects:
        s = nearest_slot(obj["box"])
        shape[s] = SHAPES.index(obj["shape"]) + 1
        color[s], pattern[s] = COLOR_NAMES.index(obj["color"]), PATTERNS.index(obj["pattern"])
    return {"shape": shape, "color": color, "pattern": pattern}


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
    """Training scenes: the world's scenes placed more loosely, and a share of marked subjects."""
    scene = random_scene(rng)
    objects = []
    for obj in scene.objects:
        obj = replace(obj, offset=(rng.randint(-5, 5), rng.randint(-5, 5)), angle=round(rng.uniform(-25, 25), 1))
        if rng.random() < 0.2:
            marks = random_subject(rng, shape=obj.shape)
            obj = replace(obj, emblem=marks.emblem, emblem_color=marks.emblem_color, outline=marks.outline)
        objects.append(obj)
    return replace(scene, objects=tuple(objects))


def pair_views(rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """Two views of one object: a marked subject or a plain object, seen at two places, sizes and backgrounds."""
    obj = random_subject(rng) if rng.random() < 0.5 else replace(random_object(rng, "center"), size="large")
    a, b = views(obj, 2, rng)
    return render(a)[0], render(b)[0]


def train_batch(rng: random.Random, batch_size: int):
    images, labels = [], {"shape": [], "color": [], "pattern": []}
    for _ in range(batch_size):
        image, truth = render(judge_scene(rng))
        images.append(degrade(image, rng))
        for k, v in targets(truth).items():
            labels[k].append(v)
    pairs = [pair_views(rng) for _ in range(batch_size // 4)]
    views_a = [degrade(a, rng) for a, _ in pairs]
    views_b = [degrade(b, rng) for _, b in pairs]
    return to_input(images), {k: torch.tensor(v) for k, v in labels.items()}, to_input(views_a), to_input(views_b)


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


def train(args) -> Judge:
    torch.manual_seed(args.seed)
    model = Judge().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    loader = torch.utils.data.DataLoader(
        Batches(args.seed, args.steps, args.batch_size), batch_size=None, num_workers=args.workers
    )
    bar = tqdm(loader, desc="judge")
    for x, y, va, vb in bar:
        x, va, vb = x.to(args.device), va.to(args.device), vb.to(args.device)
        y = {k: v.to(args.device) for k, v in y.items()}
        out = model(torch.cat([x, va, vb]))
        n, m = len(x), len(va)
        loss = sum(
            F.cross_entropy(out[k][:n].flatten(0, 1), y[k].flatten(), ignore_index=-100)
            for k in ("shape", "color", "pattern")
        )
        loss = loss + contrastive_loss(out["embedding"][n : n + m], out["embedding"][n + m :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.cpu().eval()


def save(model: Judge, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "judge.safetensors"),
        metadata={"format": "svdiff-world-judge", "slots": ",".join(SLOTS)},
    )


def load(folder: str | Path) -> Judge:
    model = Judge()
    model.load_state_dict(load_file(str(Path(folder) / "judge.safetensors")))
    return model.eval()


@torch.no_grad()
def read(model: Judge, images, batch_size: int = 64) -> list[dict]:
    """What the judge sees in each image: per slot, the object (or None) with its shape, color and pattern and
    the judge's confidence that something stands there; plus the embedding."""
    results = []
    for i in range(0, len(images), batch_size):
        out = model(to_input(images[i : i + batch_size]))
        shape_p = out["shape"].softmax(-1)
        for b in range(len(shape_p)):
            slots = {}
            for s, name in enumerate(SLOTS):
                k = int(shape_p[b, s].argmax())
                slots[name] = (
                    None
                    if k == 0
                    else {
                        "shape": SHAPES[k - 1],
                        "color": COLOR_NAMES[int(out["color"][b, s].argmax())],
                        "pattern": PATTERNS[int(out["pattern"][b, s].argmax())],
                        "confidence": round(float(1 - shape_p[b, s, 0]), 4),
                    }
                )
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
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.time()
    model = train(args)
    save(model, args.out)
    minutes = (time.time() - began) / 60
    record = {k: str(v) for k, v in vars(args).items() if k != "out"} | {"minutes": round(minutes, 1)}
    (args.out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
