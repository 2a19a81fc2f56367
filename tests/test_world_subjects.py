"""Subjects: views differ but show one identity; the shipped example folders are complete and reproducible."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svdiff.world.render import SHAPES, random_scene, render
from svdiff.world.subjects import EXAMPLES, identity, load_subject, random_subject, views, write_examples

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "subjects"


def test_views_differ_but_keep_the_identity():
    subject = random_subject(random.Random(0))
    scenes = views(subject, 4, random.Random(1))
    images = [np.asarray(render(s)[0]).astype(int) for s in scenes]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).sum() > 10_000
    for scene in scenes:
        (obj,) = scene.objects
        assert identity(obj) == identity(subject)
    assert len({(s.objects[0].position, s.background) for s in scenes}) == 4


def test_subject_marks_never_occur_in_pretraining_scenes():
    rng = random.Random(0)
    for _ in range(200):
        for obj in random_scene(rng).objects:
            assert obj.emblem is None and obj.outline is None


def test_marks_change_the_pixels():
    subject = random_subject(random.Random(5))
    scene = views(subject, 1, random.Random(0))[0]
    plain = scene.__class__(
        objects=(
            scene.objects[0].__class__(
                **{**scene.objects[0].__dict__, "emblem": None, "emblem_color": None, "outline": None}
            ),
        ),
        background=scene.background,
    )
    assert np.abs(np.asarray(render(scene)[0]).astype(int) - np.asarray(render(plain)[0]).astype(int)).sum() > 3000


def test_example_folders_are_complete():
    folders = sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir())
    assert len(folders) >= 6
    classes = []
    for folder in folders:
        meta = json.loads((folder / "subject.json").read_text())
        assert meta["class_word"] in SHAPES
        assert meta["instance_prompt"] == f"a photo of {meta['identifier']} {meta['class_word']}"
        assert 3 <= len(list(folder.glob("*.png"))) <= 5
        assert load_subject(folder).shape == meta["class_word"]
        classes.append(meta["class_word"])
    assert len(classes) > len(set(classes)), "two example subjects should share a class"


@pytest.mark.parametrize("name", [e[0] for e in EXAMPLES[:2]])
def test_example_folders_regenerate_bit_for_bit(tmp_path, name):
    write_examples(tmp_path)
    for png in sorted((EXAMPLES_DIR / name).glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name / png.name)), np.asarray(Image.open(png)))
    assert (tmp_path / name / "subject.json").read_text() == (EXAMPLES_DIR / name / "subject.json").read_text()
