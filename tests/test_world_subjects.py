"""Subjects: views differ but show one identity; the shipped example folders are complete and reproducible."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svdiff.world.render import (
    BODY_SHAPES,
    EXAMPLE_IDENTITIES,
    SHAPES,
    held_out_identity,
    random_scene,
    render,
)
from svdiff.world.subjects import (
    EXAMPLES,
    examples,
    identity,
    load_subject,
    random_subject,
    unseen_subject,
    views,
    write_examples,
)

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


def test_marks_are_vocabulary_but_held_out_identities_never_occur_in_pretraining():
    rng = random.Random(0)
    objects = [obj for _ in range(600) for obj in random_scene(rng, allow_held_out=False, marks=0.5).objects]
    assert not any(held_out_identity(obj) for obj in objects)
    both = [obj for obj in objects if obj.emblem and obj.outline]
    assert len(both) > 50 and any(obj.emblem and not obj.outline for obj in objects)
    assert any(obj.outline and not obj.emblem for obj in objects)
    assert all(obj.shape in BODY_SHAPES for obj in objects if obj.emblem or obj.outline)
    # Every example identity is held out, and about one identity in eight besides.
    assert all(held_out_identity(subject) for subject, _ in examples().values())
    drawn = [random_subject(random.Random(i)) for i in range(2000)]
    assert 0.1 < sum(map(held_out_identity, drawn)) / len(drawn) < 0.16
    assert all(held_out_identity(unseen_subject(random.Random(i))) for i in range(50))
    assert EXAMPLE_IDENTITIES == {tuple(identity(s).values()) for s, _ in examples().values()}


def test_unmarked_scenes_draw_as_before():
    """marks=0 takes no extra random draws, so the world's unmarked scenes and captions are unchanged."""
    a, b = random.Random(4), random.Random(4)
    assert [random_scene(a) for _ in range(50)] == [random_scene(b, marks=0.0) for _ in range(50)]


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


def test_mark_masks_find_each_mark_and_the_pixel_test_sees_a_lost_mark_color():
    from dataclasses import replace

    from svdiff.world.quality import mark_colors_kept, mark_masks
    from svdiff.world.render import render
    from svdiff.world.subjects import examples

    _, scenes = examples()["heart_sks"]
    scene = scenes[0]
    masks = mark_masks(scene)
    assert masks["outline"].sum() > 20 and masks["emblem"].sum() > 4

    def pixels(s):
        return np.asarray(render(s)[0], dtype=np.float32)[None]

    real = pixels(scene)
    assert mark_colors_kept(real, real, [masks]) == {"outline": 1.0, "emblem": 1.0}
    obj = scene.objects[0]
    no_outline = pixels(replace(scene, objects=(replace(obj, outline=None),)))
    assert mark_colors_kept(no_outline, real, [masks]) == {"outline": 0.0, "emblem": 1.0}
