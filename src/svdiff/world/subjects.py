"""Subjects: unique objects the base model cannot draw from words alone, each seen in a few views.

A subject is a world shape with marks no pretraining scene has (a two-color emblem at its centre and a colored
outline); a view places it somewhere else, at another size, angle and background. Fine-tuning binds a subject to an
identifier ("a photo of sks heart"); the class word keeps meaning every heart.
"""

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

from .render import BACKGROUNDS, COLORS, MARK_COLORS, PATTERNS, SHAPES, Scene, WorldObject, render

# Shapes whose centre is solid enough to carry an emblem (a ring's centre is a hole, a cross's arms are thin).
BODY_SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
VIEW_POSITIONS = ("left", "right", "top", "bottom", "center")


def random_subject(rng: random.Random, shape: str | None = None) -> WorldObject:
    shape = shape or rng.choice(BODY_SHAPES)
    color = rng.choice(list(COLORS))
    emblem = rng.choice([s for s in SHAPES if s not in (shape, "ring", "cross")])
    emblem_color = rng.choice([c for c in MARK_COLORS if c != color])
    outline = rng.choice([c for c in MARK_COLORS if c not in (color, emblem_color)])
    return WorldObject(
        shape=shape,
        color=color,
        pattern=rng.choice(PATTERNS),
        size="large",
        emblem=emblem,
        emblem_color=emblem_color,
        outline=outline,
    )


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
    keep = ("shape", "color", "pattern", "emblem", "emblem_color", "outline")
    return {k: v for k, v in asdict(subject).items() if k in keep}


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


def write_examples(root: str | Path, n_views: int = 4) -> list[Path]:
    folders = []
    for name, shape, identifier, seed in EXAMPLES:
        subject = random_subject(random.Random(seed), shape=shape)
        write_subject_folder(Path(root) / name, subject, identifier, n_views, seed)
        folders.append(Path(root) / name)
    return folders
