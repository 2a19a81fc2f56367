"""Subjects: unique objects, each seen in a few views, that the base model has never seen whole.

A subject is a world shape with both marks, an emblem at its centre and a colored outline. The base knows every
part from pretraining (shapes, colors, patterns, emblems and outlines, named in captions), but never this
combination: held-out identities (`render.held_out_identity`) are kept out of pretraining. A view places the subject
somewhere else, at another size, angle and background. Fine-tuning binds a subject to an identifier ("a photo of
sks heart"), as DreamBooth binds a particular dog; the class word keeps meaning every heart.
"""

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

from .render import (
    BACKGROUNDS,
    BODY_SHAPES,
    COLORS,
    IDENTITY,
    PATTERNS,
    Scene,
    WorldObject,
    held_out_identity,
    random_marks,
    render,
)

VIEW_POSITIONS = ("left", "right", "top", "bottom", "center")


def random_subject(rng: random.Random, shape: str | None = None) -> WorldObject:
    """A body shape with both marks (any identity; `unseen_subject` draws one pretraining never showed)."""
    shape = shape or rng.choice(BODY_SHAPES)
    color = rng.choice(list(COLORS))
    marks = random_marks(rng, color, shape)
    return WorldObject(shape=shape, color=color, pattern=rng.choice(PATTERNS), size="large", **marks)


def unseen_subject(rng: random.Random, shape: str | None = None) -> WorldObject:
    """A subject whose identity is held out of pretraining: what a benchmark measures personalization on."""
    while True:
        subject = random_subject(rng, shape)
        if held_out_identity(subject):
            return subject


def views(subject: WorldObject, n: int, rng: random.Random) -> list[Scene]:
    """`n` scenes of the subject alone, each at a different position and background when n allows."""
    positions = rng.sample(VIEW_POSITIONS, k=min(n, len(VIEW_POSITIONS)))
    backgrounds = rng.sample(tuple(BACKGROUNDS), k=len(BACKGROUNDS))
    scenes = []
    for i in range(n):
        position = positions[i % len(positions)]
        # Large only fits in the centre; elsewhere the subject would leave the frame.
        size = rng.choice(("medium", "large")) if position == "center" else "medium"
        obj = replace(
            subject,
            position=position,
            size=size,
            angle=round(rng.uniform(-20, 20), 1),
            offset=(rng.randint(-2, 2), rng.randint(-2, 2)),
        )
        scenes.append(Scene(objects=(obj,), background=backgrounds[i % len(backgrounds)]))
    return scenes


def identity(subject: WorldObject) -> dict:
    """The fields that make a subject itself, independent of any view."""
    return {k: v for k, v in asdict(subject).items() if k in IDENTITY}


def write_subject_folder(folder: Path, subject: WorldObject, identifier: str, n_views: int, seed: int) -> None:
    """Images 00.png… and subject.json with the class word and the prompts a trainer needs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(views(subject, n_views, random.Random(seed))):
        render(scene)[0].save(folder / f"{i:02d}.png")
    meta = {
        "class_word": subject.shape,
        "identifier": identifier,
        "instance_prompt": f"a photo of {identifier} {subject.shape}",
        "class_prompt": f"a photo of a {subject.shape}",
        "subject": identity(subject),
        "seed": seed,
    }
    (folder / "subject.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_subject(folder: str | Path) -> WorldObject:
    meta = json.loads((Path(folder) / "subject.json").read_text())
    return WorldObject(**meta["subject"])


# The example set in examples/subjects/: (folder, class, identifier, seed). Two hearts, so that multi-subject
# work has to keep apart two subjects of one class, as the paper's dog and panda case does; of different colors
# and patterns (pink striped, blue dotted), so that a blend of the two shows in a 64-pixel picture.
EXAMPLES = (
    ("heart_sks", "heart", "sks", 11),
    ("heart_xyz", "heart", "xyz", 35),
    ("star_zwx", "star", "zwx", 13),
    ("square_vyx", "square", "vyx", 14),
    ("circle_qlo", "circle", "qlo", 15),
    ("triangle_sks", "triangle", "sks", 16),
)


def examples(n_views: int = 4) -> dict[str, tuple[WorldObject, list[Scene]]]:
    """The example set, name → (subject, its views), as `write_examples` writes it."""
    out = {}
    for name, shape, _, seed in EXAMPLES:
        subject = random_subject(random.Random(seed), shape=shape)
        out[name] = (subject, views(subject, n_views, random.Random(seed)))
    return out


def write_examples(root: str | Path, n_views: int = 4) -> list[Path]:
    folders = []
    for name, shape, identifier, seed in EXAMPLES:
        subject = random_subject(random.Random(seed), shape=shape)
        write_subject_folder(Path(root) / name, subject, identifier, n_views, seed)
        folders.append(Path(root) / name)
    return folders
