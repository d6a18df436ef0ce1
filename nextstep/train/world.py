"""The shapes world: scene specifications, their pictures, captions and edit instructions.

A scene is a background colour and one to three objects, each with a shape, a colour, a size
and a cell of a 3x3 grid. Objects sit in different cells and never share a colour with each
other or with the background, so a picture can be read back by colour alone (``evaluate``).
Every spec is assigned for good to one of three splits by a hash of its canonical text:
``train``, ``validation`` (to choose sampling settings) and ``test`` (held out for evaluation).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 210),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Cells of the 3x3 grid, row-major; the names are how captions and the evaluator speak of them.
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Object extent as a fraction of a cell's side. A small object is 23 pixels wide at 128x128, about
# three latent pixels: at 19 (0.45) a square's corners and a circle's curve differed by less in the
# latents than the model's error, and it drew both as the same blob.
SIZE_FRACTION = {"small": 0.55, "large": 0.85}
SUPERSAMPLE = 4  # draw larger, then downsample: soft edges like a photo, not jagged ones

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
CELL_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left side", "in the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "in the middle right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
EDIT_KINDS = ("recolour", "background", "add", "remove", "move")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def key(self) -> str:
        """Canonical text of the spec (object order does not matter)."""
        parts = sorted(f"{o.size} {o.colour} {o.shape} @ {o.cell}" for o in self.objects)
        return f"{self.background} | " + " ; ".join(parts)

    @property
    def split(self) -> str:
        digit = int(hashlib.sha256(self.key().encode()).hexdigest(), 16) % 10
        return "test" if digit == 0 else "validation" if digit == 1 else "train"

    def used_colours(self) -> set[str]:
        return {self.background} | {o.colour for o in self.objects}

    def free_cells(self) -> list[str]:
        taken = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in taken]


@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    source: Scene
    target: Scene


# ---- pictures ------------------------------------------------------------------------------


def cell_box(cell: str, size: int) -> tuple[float, float, float]:
    """(centre x, centre y, cell side) in pixels of a square canvas of ``size``."""
    row, col = divmod(CELLS.index(cell), 3)
    side = size / 3
    return (col + 0.5) * side, (row + 0.5) * side, side


def render(scene: Scene, size: int = 128) -> Image.Image:
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, side = cell_box(obj.cell, big)
        half = SIZE_FRACTION[obj.size] * side / 2
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:  # triangle pointing up, as wide as it is tall
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


# ---- random specs --------------------------------------------------------------------------


def random_object(rng: random.Random, scene: Scene) -> Obj:
    colour = rng.choice([c for c in COLOURS if c not in scene.used_colours()])
    return Obj(rng.choice(SHAPES), colour, rng.choice(SIZES), rng.choice(scene.free_cells()))


def random_scene(rng: random.Random, num_objects: int | None = None, split: str | None = None) -> Scene:
    """A random scene, redrawn until it belongs to ``split`` (any split when None)."""
    while True:
        count = num_objects or rng.choices((1, 2, 3), weights=(4, 3, 3))[0]
        scene = Scene(rng.choice(COLOURS), ())
        for _ in range(count):
            scene = replace(scene, objects=scene.objects + (random_object(rng, scene),))
        if split is None or scene.split == split:
            return scene


# ---- captions ------------------------------------------------------------------------------


def describe_object(obj: Obj, rng: random.Random, with_cell: bool = True) -> str:
    article = "an" if obj.colour == "orange" and rng.random() < 0.5 else "a"
    words = [article, rng.choice(SIZE_WORDS[obj.size]), obj.colour, obj.shape]
    if article == "an":  # "an orange ..." needs the colour first
        words[1], words[2] = words[2], words[1]
    text = " ".join(words)
    return f"{text} {rng.choice(CELL_PHRASES[obj.cell])}" if with_cell else text


def caption(scene: Scene, rng: random.Random) -> str:
    objects = list(scene.objects)
    rng.shuffle(objects)
    listed = [describe_object(o, rng) for o in objects]
    things = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    background = scene.background
    template = rng.randrange(4)
    if template == 0:
        return f"{things} on a {background} background"
    if template == 1:
        return f"a {background} background with {things}"
    if template == 2:
        return f"on a {background} background, {things}"
    return f"{things}, {background} background"


# ---- edits ---------------------------------------------------------------------------------


def mention(obj: Obj, scene: Scene, rng: random.Random) -> str:
    """How an instruction names an object: by colour and shape, or by shape alone when unique."""
    unique_shape = sum(o.shape == obj.shape for o in scene.objects) == 1
    if unique_shape and rng.random() < 0.3:
        return f"the {obj.shape}"
    return f"the {obj.colour} {obj.shape}"


def random_edit(scene: Scene, rng: random.Random, kind: str | None = None) -> Edit:
    """One instruction and the scene it should produce; kinds that do not fit the scene are skipped."""
    possible = [
        k
        for k in EDIT_KINDS
        if not (k == "add" and len(scene.objects) == 3) and not (k == "remove" and len(scene.objects) == 1)
    ]
    kind = kind if kind in possible else rng.choice(possible)
    objects = list(scene.objects)
    index = rng.randrange(len(objects))
    obj = objects[index]
    if kind == "recolour":
        colour = rng.choice([c for c in COLOURS if c not in scene.used_colours()])
        objects[index] = replace(obj, colour=colour)
        name = mention(obj, scene, rng)
        text = rng.choice(
            (f"make {name} {colour}", f"change the color of {name} to {colour}", f"turn {name} {colour}", f"paint {name} {colour}")
        )
        target = replace(scene, objects=tuple(objects))
    elif kind == "background":
        colour = rng.choice([c for c in COLOURS if c not in scene.used_colours()])
        text = rng.choice(
            (f"make the background {colour}", f"change the background to {colour}", f"set the background color to {colour}")
        )
        target = replace(scene, background=colour)
    elif kind == "add":
        new = random_object(rng, scene)
        text = f"{rng.choice(('add', 'put', 'draw'))} {describe_object(new, rng)}"
        target = replace(scene, objects=scene.objects + (new,))
    elif kind == "remove":
        name = mention(obj, scene, rng)
        text = rng.choice((f"remove {name}", f"delete {name}", f"take away {name}", f"erase {name}"))
        target = replace(scene, objects=tuple(o for o in objects if o is not obj))
    else:  # move
        cell = rng.choice(scene.free_cells())
        objects[index] = replace(obj, cell=cell)
        text = f"{rng.choice(('move', 'put', 'shift'))} {mention(obj, scene, rng)} {rng.choice(CELL_PHRASES[cell])}"
        target = replace(scene, objects=tuple(objects))
    return Edit(kind, text, scene, target)


def vocabulary() -> list[str]:
    """Every word the captions and instructions can use, for the tokenizer."""
    phrases = [
        "a an the and with on background of to color",
        "make change turn paint set add put draw remove delete take away erase move shift",
        " ".join(COLOURS + SHAPES),
        " ".join(w for words in SIZE_WORDS.values() for w in words),
        " ".join(p for phrases in CELL_PHRASES.values() for p in phrases),
    ]
    return sorted({word for phrase in phrases for word in phrase.split()})
