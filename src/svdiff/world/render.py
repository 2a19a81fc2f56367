"""The shapes world: 64×64 scenes of one or two patterned objects, their captions and their ground truth.

Everything is drawn with PIL at 4× resolution and box-filtered down, so edges are anti-aliased and a scene is a pure
function of its spec: the same spec gives the same pixels on every machine.
"""

import math
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SIZE = 64
SS = 4  # supersampling factor

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": 16, "medium": 24, "large": 32}
POSITIONS = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
MARK_COLORS = {**COLORS, "black": (20, 20, 20), "white": (250, 250, 250)}
# Shapes whose centre is solid enough to carry an emblem (a ring's centre is a hole, a cross's arms are thin), and
# the shapes an emblem takes.
BODY_SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
BACKGROUNDS = {"white": (246, 246, 244), "gray": (150, 150, 150), "beige": (232, 216, 184), "dark": (40, 44, 52)}
# Two-object scenes always pair opposite sides, so the caption can say where each object is.
PAIRS = (("left", "right"), ("top", "bottom"))


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    pattern: str = "plain"
    size: str = "medium"
    position: str = "center"
    angle: float = 0.0  # degrees, counter-clockwise
    offset: tuple[int, int] = (0, 0)  # pixels from the position's anchor
    # Marks: a small shape at the centre in another color, and a colored border. Pretraining scenes put them on a
    # share of the objects and name them in words; a subject is a combination of them never seen whole.
    emblem: str | None = None
    emblem_color: str | None = None
    outline: str | None = None


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str = "white"


@dataclass
class Truth:
    """What is in a rendered scene: one record per object, box in pixels (x0, y0, x1, y1)."""

    objects: list[dict] = field(default_factory=list)
    background: str = "white"


def shape_outline(shape: str) -> list[list[tuple[float, float]]]:
    """Polygons (in [-1, 1]², y down) whose even-odd fill is the shape; the ring is an outer and an inner circle."""

    def circle(r, n=48):
        return [(r * math.cos(2 * math.pi * i / n), r * math.sin(2 * math.pi * i / n)) for i in range(n)]

    if shape == "circle":
        return [circle(1.0)]
    if shape == "ring":
        return [circle(1.0), circle(0.55)]
    if shape == "square":
        return [[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]]
    if shape == "diamond":
        return [[(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]]
    if shape == "triangle":
        return [[(0, -1), (1, 0.8), (-1, 0.8)]]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return [pts]
    if shape == "cross":
        w = 0.33
        return [
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        ]
    if shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 + 0.1))
        return [pts]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, px: int) -> Image.Image:
    """An L-mode mask of side `px` with the shape filling its box."""
    mask = Image.new("L", (px, px), 0)
    half = px / 2
    for i, poly in enumerate(shape_outline(shape)):
        pts = [(half + x * half * 0.98, half + y * half * 0.98) for x, y in poly]
        ImageDraw.Draw(mask).polygon(pts, fill=0 if i else 255)  # later polygons cut holes
    return mask


def pattern_texture(color: tuple[int, int, int], pattern: str, px: int) -> Image.Image:
    """The object's surface: its color, with the pattern drawn in a darker shade of it. Periods scale with size."""
    dark = tuple(int(c * 0.45) for c in color)
    tex = Image.new("RGB", (px, px), color)
    draw = ImageDraw.Draw(tex)
    if pattern == "striped":
        period = px / 4.5
        for k in range(6):
            y0 = k * period
            draw.rectangle([0, y0, px, y0 + period / 2], fill=dark)
    elif pattern == "dotted":
        step = px / 4
        r = step * 0.3
        for i in range(5):
            for j in range(5):
                cx, cy = (i + 0.5) * step, (j + 0.5) * step
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dark)
    elif pattern == "checkered":
        cell = px / 5
        for i in range(5):
            for j in range(5):
                if (i + j) % 2:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=dark)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return tex


def object_layer(obj: WorldObject) -> tuple[Image.Image, Image.Image]:
    """The object's texture and mask at SS× resolution, rotated; the caller pastes them centred on the anchor."""
    px = SIZES[obj.size] * SS
    tex, mask = pattern_texture(COLORS[obj.color], obj.pattern, px), shape_mask(obj.shape, px)
    if obj.emblem:
        side = int(px * 0.42)
        corner = ((px - side) // 2, (px - side) // 2)
        tex.paste(
            MARK_COLORS[obj.emblem_color], (*corner, corner[0] + side, corner[1] + side), shape_mask(obj.emblem, side)
        )
    if obj.outline:
        inner = mask.filter(ImageFilter.MinFilter(2 * SS + 1))
        tex.paste(MARK_COLORS[obj.outline], (0, 0), ImageChops.subtract(mask, inner))
    if obj.angle:
        tex = tex.rotate(obj.angle, resample=Image.BICUBIC, expand=True)
        mask = mask.rotate(obj.angle, resample=Image.BICUBIC, expand=True)
    return tex, mask


def paste_layer(canvas: Image.Image, tex: Image.Image, mask: Image.Image, center: tuple[int, int]) -> tuple:
    """Pastes a layer centred at `center` (output pixels) and returns its box in output pixels."""
    x = int(round(center[0] * SS - tex.width / 2))
    y = int(round(center[1] * SS - tex.height / 2))
    canvas.paste(tex, (x, y), mask)
    bx0, by0, bx1, by1 = mask.getbbox() or (0, 0, 0, 0)
    box = ((x + bx0) / SS, (y + by0) / SS, (x + bx1) / SS, (y + by1) / SS)
    return tuple(round(max(0.0, min(float(SIZE), v)), 1) for v in box)


def anchor(obj: WorldObject) -> tuple[int, int]:
    ax, ay = POSITIONS[obj.position]
    return ax + obj.offset[0], ay + obj.offset[1]


def render(scene: Scene) -> tuple[Image.Image, Truth]:
    """Draws a scene; returns the 64×64 RGB image and the ground truth of every object."""
    canvas = Image.new("RGB", (SIZE * SS, SIZE * SS), BACKGROUNDS[scene.background])
    truth = Truth(background=scene.background)
    for obj in scene.objects:
        tex, mask = object_layer(obj)
        box = paste_layer(canvas, tex, mask, anchor(obj))
        truth.objects.append({**asdict(obj), "box": box})
    return canvas.resize((SIZE, SIZE), Image.BOX), truth


def describe(obj: WorldObject, size: bool = False, pattern: bool = True, color: bool = True, marks: bool = True) -> str:
    """ "large pink striped heart with a white outline and a black diamond emblem": the object, with the words
    asked for."""
    words = [obj.size] if size else []
    if color:
        words.append(obj.color)
    if pattern:
        words.append(obj.pattern)
    words.append(obj.shape)
    named = []
    if marks and obj.outline:
        named.append(f"a {obj.outline} outline")
    if marks and obj.emblem:
        named.append(f"a {obj.emblem_color} {obj.emblem} emblem")
    if named:
        words += ["with", " and ".join(named)]
    return " ".join(words)


def caption(
    scene: Scene,
    rng: random.Random | None = None,
    attribute_dropout: float = 0.0,
    right_first: float = 0.0,
    mark_naming: float = 0.75,
) -> str:
    """The scene's caption. With an rng, optional words (size, plain, position of a lone object, background) are
    dropped at random so a model learns each word on its own; an object's marks are named with chance
    `mark_naming`, so a model also learns to draw marks that a caption leaves unsaid; without an rng, the caption
    says everything.
    `attribute_dropout` also drops an object's color, and its pattern, each with that probability, so that a
    caption naming only the class ("a photo of a heart") still draws one. `right_first` is the chance that a
    two-object caption names the right (or bottom) object first, so that a model binds each object to its place
    by what "on the left" says rather than by the order of the names."""

    def keep(p):
        return rng is None or rng.random() < p

    objects = scene.objects
    if rng is not None and right_first > 0 and len(objects) == 2 and rng.random() < right_first:
        objects = objects[::-1]
    parts = []
    for obj in objects:
        size = keep(0.5)
        pattern = obj.pattern != "plain" or keep(0.5)
        color = True
        if attribute_dropout > 0:
            color = keep(1 - attribute_dropout)
            pattern = pattern and keep(1 - attribute_dropout)
        marks = not (obj.emblem or obj.outline) or keep(mark_naming)
        text = describe(obj, size=size, pattern=pattern, color=color, marks=marks)
        if len(scene.objects) > 1 or keep(0.8):
            text += " " + POSITION_PHRASES[obj.position]
        parts.append(("an " if text[0] in "aeiou" else "a ") + text)
    text = "a photo of " + " and ".join(parts)
    if keep(0.5):
        text += f" on a {scene.background} background"
    return text


def held_out(shape: str, color: str, pattern: str) -> bool:
    """One in eight (shape, color, pattern) triples never appears in pretraining, so prompts naming them are
    unseen by the base model and measure how it composes words it knows."""
    return (SHAPES.index(shape) * 3 + list(COLORS).index(color) * 5 + PATTERNS.index(pattern) * 7) % 8 == 3


def random_marks(rng: random.Random, color: str, shape: str, emblem: bool = True, outline: bool = True) -> dict:
    """An emblem (a body shape other than the object's, in a color other than its) and an outline color that
    differs from both, or only one of the two."""
    marks = {"emblem": None, "emblem_color": None, "outline": None}
    if emblem:
        marks["emblem"] = rng.choice([s for s in BODY_SHAPES if s != shape])
        marks["emblem_color"] = rng.choice([c for c in MARK_COLORS if c != color])
    if outline:
        marks["outline"] = rng.choice([c for c in MARK_COLORS if c not in (color, marks["emblem_color"])])
    return marks


IDENTITY = ("shape", "color", "pattern", "emblem", "emblem_color", "outline")


def identity(obj: WorldObject) -> tuple:
    """The fields that make an object itself, independent of where and how it is seen."""
    return tuple(getattr(obj, k) for k in IDENTITY)


def held_out_identity(obj: WorldObject) -> bool:
    """One in eight identities with both marks never appears in pretraining (the example subjects' are among
    them, see `subjects.py`), so a subject drawn from them is a combination the base has never seen whole."""
    if not (obj.emblem and obj.outline):
        return False
    code = (
        SHAPES.index(obj.shape) * 3
        + list(COLORS).index(obj.color) * 5
        + PATTERNS.index(obj.pattern) * 7
        + SHAPES.index(obj.emblem) * 11
        + list(MARK_COLORS).index(obj.emblem_color) * 13
        + list(MARK_COLORS).index(obj.outline) * 17
    )
    return code % 8 == 5 or identity(obj) in EXAMPLE_IDENTITIES


# The example subjects of `examples/subjects/` (see `subjects.EXAMPLES`), kept out of pretraining whatever the rule.
EXAMPLE_IDENTITIES = frozenset(
    {
        ("circle", "green", "striped", "square", "white", "red"),
        ("heart", "pink", "striped", "diamond", "black", "white"),
        ("heart", "blue", "dotted", "square", "purple", "yellow"),
        ("square", "orange", "dotted", "diamond", "white", "cyan"),
        ("star", "cyan", "striped", "triangle", "yellow", "blue"),
        ("triangle", "blue", "checkered", "heart", "black", "cyan"),
    }
)


def random_object(
    rng: random.Random,
    position: str,
    sizes=tuple(SIZES),
    jitter: int = 2,
    max_angle: float = 12.0,
    allow_held_out: bool = True,
    marks: float = 0.0,
) -> WorldObject:
    """An object with random attributes. A body shape carries marks with chance `marks`: an emblem, an outline,
    or both, each combination as often. Without `allow_held_out`, neither a held-out (shape, color, pattern)
    triple nor a held-out identity is drawn."""
    while True:
        shape, color, pattern = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(PATTERNS)
        if not allow_held_out and held_out(shape, color, pattern):
            continue
        drawn = {}
        if shape in BODY_SHAPES and marks > 0 and rng.random() < marks:
            kind = rng.randrange(3)
            drawn = random_marks(rng, color, shape, emblem=kind != 1, outline=kind != 0)
        obj = WorldObject(
            shape=shape,
            color=color,
            pattern=pattern,
            size=rng.choice(sizes),
            position=position,
            angle=round(rng.uniform(-max_angle, max_angle), 1),
            offset=(rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)),
            **drawn,
        )
        if allow_held_out or not held_out_identity(obj):
            return obj


def random_scene(
    rng: random.Random, n_objects: int | None = None, allow_held_out: bool = True, marks: float = 0.0
) -> Scene:
    """A scene with one object anywhere, or two on opposite sides (small or medium so they never overlap); each
    body shape carries marks with chance `marks`."""
    if n_objects is None:
        n_objects = 1 if rng.random() < 0.5 else 2
    if n_objects == 1:
        objects = (random_object(rng, rng.choice(tuple(POSITIONS)), allow_held_out=allow_held_out, marks=marks),)
    elif n_objects == 2:
        pair = rng.choice(PAIRS)
        objects = tuple(
            random_object(rng, p, sizes=("small", "medium"), allow_held_out=allow_held_out, marks=marks) for p in pair
        )
    else:
        raise ValueError("a scene holds one or two objects")
    return Scene(objects=objects, background=rng.choice(tuple(BACKGROUNDS)))


def world_words() -> list[str]:
    """Every word a caption of this world can contain."""
    words = {"a", "an", "photo", "of", "and", "on", "the", "at", "in", "background", "with", "outline", "emblem"}
    words.update(SHAPES, MARK_COLORS, PATTERNS, SIZES, BACKGROUNDS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
