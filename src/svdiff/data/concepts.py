"""What a personalization run learns: concepts (a subject's images and prompt, and optionally a class prompt with
class images for prior preservation), read from flags or a `--concepts_list` JSON, and the class images the base
model generates for the prior when the folder has too few."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..checks import overlaps
from ..errors import SvdiffError
from ..files import atomic_path
from ..sample import sample
from .images import image_files, is_image, load_image_folder, open_images

CONCEPT_KEYS = ("instance_prompt", "instance_data_dir", "class_prompt", "class_data_dir")


@dataclass
class Concept:
    instance_prompt: str
    instance_data_dir: Path
    class_prompt: str | None = None
    class_data_dir: Path | None = None
    instance_images: list[Image.Image] = field(default_factory=list, repr=False)
    class_images: list[Image.Image] = field(default_factory=list, repr=False)


def read_concepts(args) -> list[Concept]:
    """The concepts named by the flags, or by the `--concepts_list` file; images not yet loaded."""
    if args.concepts_list is None:
        entries = [{k: getattr(args, k) for k in CONCEPT_KEYS}]
        where = "the flags"
    else:
        path = Path(args.concepts_list)
        try:
            entries = json.loads(path.read_text())
        except OSError as e:
            raise SvdiffError(f"cannot read --concepts_list {path}: {e.strerror}") from None
        except ValueError as e:
            raise SvdiffError(f"--concepts_list {path} is not valid JSON: {e}") from None
        except RecursionError:
            raise SvdiffError(f"--concepts_list {path} is nested too deeply to be a list of concepts") from None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise SvdiffError(f"--concepts_list {path} must hold a non-empty list of objects")
        where = str(path)
    concepts = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - set(CONCEPT_KEYS)
        if unknown:
            raise SvdiffError(f"concept {i} in {where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("instance_prompt", "instance_data_dir"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise SvdiffError(f"concept {i} in {where}: {key} is missing")
        if args.with_prior_preservation and not (entry.get("class_prompt") and entry.get("class_data_dir")):
            raise SvdiffError(f"concept {i} in {where}: prior preservation needs class_prompt and class_data_dir")
        class_dir = entry.get("class_data_dir")
        if class_dir is not None and not isinstance(class_dir, str):
            raise SvdiffError(f"concept {i} in {where}: class_data_dir must be text")
        # svdiff writes class images there: a list from elsewhere must not aim them out of the current folder
        if args.concepts_list is not None and class_dir and ".." in Path(class_dir).parts:
            raise SvdiffError(f"concept {i} in {where}: class_data_dir {class_dir!r} climbs out with '..'")
        if class_dir and overlaps(class_dir, entry["instance_data_dir"]):
            raise SvdiffError(
                f"concept {i} in {where}: the class folder {class_dir} and the instance folder "
                f"{entry['instance_data_dir']} overlap (class images would be mixed with the photos)"
            )
        concepts.append(
            Concept(
                instance_prompt=entry["instance_prompt"],
                instance_data_dir=Path(entry["instance_data_dir"]),
                class_prompt=entry.get("class_prompt"),
                class_data_dir=Path(entry["class_data_dir"]) if entry.get("class_data_dir") else None,
            )
        )
    return concepts


def load_instance_images(concepts: list[Concept]) -> None:
    for c in concepts:
        c.instance_images = load_image_folder(c.instance_data_dir)


def class_image_files(folder: Path) -> list[Path]:
    """The images already in a class folder (none if it does not exist yet)."""
    return image_files([folder]) if folder.is_dir() and any(is_image(f) for f in folder.iterdir()) else []


def missing_class_images(concept: Concept, wanted: int) -> int:
    return max(0, wanted - len(class_image_files(concept.class_data_dir)))


def generate_class_images(
    pipe, concept: Concept, wanted: int, *, batch_size: int, seed: int, steps: int = 50, progress: bool = True
) -> int:
    """Fill `class_data_dir` up to `wanted` images of `class_prompt`, sampled by the base with DDIM. Image i is
    `class-<i>.png` from seed + i, so an interrupted fill resumes where it stopped. Returns how many it made."""
    folder = concept.class_data_dir
    have = len(class_image_files(folder))
    todo = max(0, wanted - have)
    if not todo:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=todo, desc=f"class images ({concept.class_prompt})", disable=not progress)
    for start in range(have, wanted, batch_size):
        n = min(batch_size, wanted - start)
        images = sample(
            pipe,
            concept.class_prompt,
            num_images=n,
            seed=seed + start,
            num_inference_steps=steps,
            batch_size=n,
            progress=False,
        )
        for i, image in enumerate(images):
            with atomic_path(folder / f"class-{start + i:05d}.png") as temp:
                image.save(temp, format="PNG")
        bar.update(n)
    bar.close()
    return todo


def load_class_images(concept: Concept, wanted: int) -> None:
    files = class_image_files(concept.class_data_dir)[:wanted]
    if not files:
        raise SvdiffError(f"no class images in {concept.class_data_dir}")
    concept.class_images = open_images(files, skip_unreadable=True)
