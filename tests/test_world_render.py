"""The shapes world's renderer, captions and tokenizer: deterministic pixels, true ground truth, one token a word."""

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svdiff.world.render import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    Scene,
    WorldObject,
    caption,
    held_out,
    random_scene,
    render,
    world_words,
)
from svdiff.world.tokenizer import IDENTIFIERS, build_tokenizer


def test_same_seed_same_pixels_and_truth():
    a = [render(random_scene(random.Random(7))) for _ in range(2)]
    assert a[0][0].tobytes() == a[1][0].tobytes()
    assert a[0][1] == a[1][1]
    other = render(random_scene(random.Random(8)))[0]
    assert other.tobytes() != a[0][0].tobytes()


def test_world_has_the_promised_variety():
    assert len(SHAPES) >= 8 and len(COLORS) >= 8 and len(PATTERNS) >= 4
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert len(BACKGROUNDS) >= 3


@pytest.mark.parametrize("shape", SHAPES)
def test_box_is_the_object_and_plain_color_is_exact(shape):
    obj = WorldObject(shape=shape, color="blue", position="left")
    image, truth = render(Scene(objects=(obj,), background="white"))
    arr = np.asarray(image).astype(int)
    differs = np.abs(arr - np.array(BACKGROUNDS["white"])).sum(-1) > 30
    ys, xs = np.nonzero(differs)
    box = truth.objects[0]["box"]
    assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
    assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
    assert abs((box[0] + box[2]) / 2 - POSITIONS["left"][0]) < 4
    # The most common object pixel is the named color, exactly.
    colors, counts = np.unique(arr[differs].reshape(-1, 3), axis=0, return_counts=True)
    assert tuple(colors[counts.argmax()]) == COLORS["blue"]
    assert truth.objects[0]["shape"] == shape and truth.objects[0]["color"] == "blue"


def test_patterns_look_different():
    images = [
        np.asarray(render(Scene(objects=(WorldObject("square", "red", pattern=p, size="large"),)))[0]) for p in PATTERNS
    ]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).sum() > 5000


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6))
def test_two_objects_never_overlap_and_stay_in_frame(seed):
    scene = random_scene(random.Random(seed), n_objects=2)
    _, truth = render(scene)
    (a, b) = (o["box"] for o in truth.objects)
    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    for box in (a, b):
        assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64


def test_caption_names_every_object_and_place():
    scene = Scene(
        objects=(
            WorldObject("star", "red", "striped", position="left"),
            WorldObject("circle", "blue", position="right"),
        ),
        background="gray",
    )
    assert caption(scene) == (
        "a photo of a medium red striped star on the left and a medium blue plain circle "
        "on the right on a gray background"
    )


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6))
def test_shortened_captions_keep_shape_color_and_pairs_keep_places(seed):
    rng = random.Random(seed)
    scene = random_scene(rng)
    text = caption(scene, rng)
    for obj in scene.objects:
        assert obj.shape in text and obj.color in text
        if obj.pattern != "plain":
            assert obj.pattern in text
    if len(scene.objects) == 2:
        assert "on the left" in text or "at the top" in text


def test_attribute_dropout_leaves_out_colors_and_patterns_but_never_the_class():
    rng = random.Random(0)
    scenes = [random_scene(rng, n_objects=1) for _ in range(400)]
    texts = [caption(s, random.Random(i), attribute_dropout=0.3) for i, s in enumerate(scenes)]
    assert all(s.objects[0].shape in t for s, t in zip(scenes, texts, strict=True))
    no_color = sum(s.objects[0].color not in t for s, t in zip(scenes, texts, strict=True)) / len(scenes)
    assert 0.2 < no_color < 0.4
    neither = [
        t for s, t in zip(scenes, texts, strict=True) if s.objects[0].color not in t and s.objects[0].pattern not in t
    ]
    assert len(neither) > 20


def test_right_first_names_the_right_object_first_about_as_often_as_asked():
    scene = Scene(
        objects=(WorldObject("star", "red", position="left"), WorldObject("circle", "blue", position="right")),
        background="gray",
    )
    texts = [caption(scene, random.Random(i), right_first=0.5) for i in range(400)]
    first = [t.index("circle") < t.index("star") for t in texts]
    assert 0.4 < sum(first) / len(first) < 0.6
    for t in texts:  # each object keeps its own place, whichever is named first
        assert "star on the left" in t and "circle on the right" in t
    by_default = [caption(scene, random.Random(i)) for i in range(50)]
    assert all(t.index("star") < t.index("circle") for t in by_default)


def test_captions_without_attribute_dropout_are_those_the_shipped_base_was_trained_on():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(2)]
    assert [caption(s, random.Random(i)) for i, s in enumerate(scenes)] == [
        "a photo of a cyan checkered circle at the top and a green striped ring at the bottom on a beige background",
        "a photo of a medium orange heart on the left and a blue striped cross on the right on a white background",
    ]


def test_held_out_triples_are_an_eighth_and_never_in_pretraining_scenes():
    triples = [(s, c, p) for s in SHAPES for c in COLORS for p in PATTERNS]
    assert sum(held_out(*t) for t in triples) == len(triples) // 8
    rng = random.Random(0)
    for _ in range(300):
        for obj in random_scene(rng, allow_held_out=False).objects:
            assert not held_out(obj.shape, obj.color, obj.pattern)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_every_world_word_and_identifier_is_one_token(tokenizer):
    for word in world_words() + list(IDENTIFIERS):
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(ids[1]) == word + "</w>"


def test_captions_round_trip_through_the_tokenizer(tokenizer):
    rng = random.Random(3)
    for i in range(200):
        scene = random_scene(rng, marks=0.8)
        text = caption(scene, rng) if i % 2 else caption(scene)
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 <= tokenizer.model_max_length
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_captions_name_marks_part_of_the_time():
    marked = WorldObject("heart", "pink", "striped", emblem="diamond", emblem_color="black", outline="white")
    scene = Scene(objects=(replace(marked, position="left"),))
    assert caption(scene) == (
        "a photo of a medium pink striped heart with a white outline and a black diamond emblem on the left"
        " on a white background"
    )
    texts = [caption(scene, random.Random(i)) for i in range(400)]
    named = sum("with a white outline and a black diamond emblem" in t for t in texts) / len(texts)
    assert 0.65 < named < 0.85
    assert all("emblem" in t or "outline" not in t for t in texts)  # both marks are named, or neither
    assert caption(scene, random.Random(0), mark_naming=0.0).count("with") == 0
    outline_only = Scene(objects=(replace(marked, emblem=None, emblem_color=None),))
    assert "heart with a white outline" in caption(outline_only)


def test_unknown_words_split_into_pieces_not_unknown(tokenizer):
    ids = tokenizer("zebra").input_ids[1:-1]
    assert len(ids) > 1 and tokenizer.unk_token_id not in ids
