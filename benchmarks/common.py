"""Shared by the benchmarks: what machine ran them, printing/saving the JSON, and the start and end of a quality
benchmark (the judge, the clock, the picture grid)."""

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SUBJECTS = Path(__file__).parents[1] / "examples" / "subjects"


def machine(device: str = "cpu") -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so a timer around it measures the work (a no-op on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def emit(result: dict, out: str | None) -> None:
    """Print the JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.flush()


class QualityRun:
    """What every quality benchmark does around its own measurements: the flags of its base and outputs, the judge,
    a clock from the start, and at the end the pictures as one PNG grid (at --picture, or beside --out) and the JSON
    with the machine, the picture and the minutes it took."""

    @staticmethod
    def add_flags(p: argparse.ArgumentParser, name: str) -> None:
        p.add_argument(
            "--base", default=None, help="embedded:flow or a shapes-world pipeline folder (default: the UNet)"
        )
        p.add_argument("--out", default=f"docs/results/{name}/{name}.json")
        p.add_argument("--picture", default=None, help="PNG grid (default: beside --out)")

    def __init__(self, args: argparse.Namespace):
        from svdiff.world import default_judge
        from svdiff.world.judge import load

        self.out, self.picture = args.out, Path(args.picture or Path(args.out).with_suffix(".png"))
        self.began = time.time()
        self.judge = load(default_judge())

    def finish(self, result: dict, pictures: list[Image.Image], cols: int, labels: list[str]) -> None:
        from svdiff.pictures import grid

        self.picture.parent.mkdir(parents=True, exist_ok=True)
        grid(pictures, cols=cols, labels=labels).save(self.picture)
        minutes = round((time.time() - self.began) / 60, 1)
        emit(result | {"machine": machine(), "picture": str(self.picture), "minutes": minutes}, self.out)


FRESH = Path("runs/subjects")  # new random subjects, written on first use


def subject_dir(name: str) -> Path:
    """The folder of an example subject, or of "fresh_<i>": a new subject of an identity held out of pretraining
    (`subjects.unseen_subject`), a pure function of i, written under runs/subjects on first use."""
    from svdiff.world.subjects import unseen_subject, write_subject_folder
    from svdiff.world.tokenizer import IDENTIFIERS

    if (SUBJECTS / name).is_dir() or not name.startswith("fresh_"):
        return SUBJECTS / name
    i = int(name.removeprefix("fresh_"))
    folder = FRESH / name
    if not (folder / "subject.json").is_file():
        subject = unseen_subject(random.Random(f"fresh-subject-{i}"))
        write_subject_folder(folder, subject, IDENTIFIERS[i % len(IDENTIFIERS)], n_views=4, seed=1000 + i)
    return folder


def subject_card(name: str) -> dict:
    """A subject's subject.json: class word, identifier, instance and class prompts, identity."""
    return json.loads((subject_dir(name) / "subject.json").read_text())


def keep_half(image: Image.Image, side: str) -> Image.Image:
    """The image with the other half painted over in this half's border color."""
    a = np.asarray(image.convert("RGB")).copy()
    w = a.shape[1] // 2
    keep = a[:, :w] if side == "left" else a[:, w:]
    border = np.median(np.concatenate([keep[0], keep[-1], keep[:, 0], keep[:, -1]]), axis=0)
    if side == "left":
        a[:, w:] = border
    else:
        a[:, :w] = border
    return Image.fromarray(a)


def embed(judge, images) -> torch.Tensor:
    from svdiff.world.judge import read

    return torch.stack([r["embedding"] for r in read(judge, images)])


CLASS_IMAGES = 50  # the demo's prior preservation


def add_class_images_flag(p: argparse.ArgumentParser) -> None:
    """--class_images of the benchmarks that train subjects with train_subject: a smoke run takes a few."""
    p.add_argument(
        "--class_images", type=int, default=CLASS_IMAGES, help="class images generated per class for the prior"
    )


def train_subject(
    runs: Path,
    name: str,
    method: str,
    steps: int,
    identifier: str | None = None,
    base: str | None = None,
    learning_rate: float | None = None,
    class_images: int = CLASS_IMAGES,
) -> dict:
    """Personalizes one example subject on `base` (None: the embedded UNet) with prior preservation (the demo's
    recipe) at the method's default rate or `learning_rate`, and returns the run's summary. `identifier` trains it
    under another subject's word (for interpolation, the paper's protocol). Runs are kept in `runs` and reused;
    delete a folder to retrain it."""
    from svdiff.train import recipes, train

    c = subject_card(name)
    prompt = c["instance_prompt"] if identifier is None else c["instance_prompt"].replace(c["identifier"], identifier)
    out = runs / f"{name}-as-{identifier}" if identifier else runs / name
    out = out / (
        f"{method}-{steps}-steps"
        + (f"-lr-{learning_rate:g}" if learning_rate else "")
        + (f"-{class_images}-class-images" if class_images != CLASS_IMAGES else "")
    )
    summary = out / "train_summary.json"
    if not summary.is_file():
        train(
            recipes.subject(
                subject_dir(name),
                prompt,
                c["class_prompt"],
                runs / f"class-{c['class_word']}",
                method=method,
                pretrained_model_name_or_path=base,
                learning_rate=learning_rate,
                max_train_steps=steps,
                num_class_images=class_images,
                output_dir=str(out),
                progress=False,
            )
        )
    return json.loads(summary.read_text())


def files_bytes(summary: dict) -> int:
    """What a run has to ship: the shift or LoRA file, or every fine-tuned component's weights."""
    weights = Path(summary["weights"])
    if summary["method"] == "full":
        return sum(f.stat().st_size for f in weights.parent.parent.glob("*/*.safetensors"))
    return weights.stat().st_size
