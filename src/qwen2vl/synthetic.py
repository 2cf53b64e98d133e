"""Seeded synthetic visual tasks (images, short videos, question, exact answer) for the built-in model.

Pure generator: PIL drawing and the standard library only; imports nothing from the model side.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .errors import InputError

TASKS = ("color", "shape", "count", "position", "digits", "motion")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUM_FRAMES = 4
# object half-sizes as fractions of the canvas (count: of a 3x3 grid cell) and background shades
OBJECT_SCALE, COUNT_SCALE, MOTION_SCALE = (0.13, 0.19), (0.34, 0.36), (0.11, 0.15)
BACKGROUND_SHADES = (248, 255)

QUESTIONS = {
    "color": ("What colour is the shape?", "What color is the object?", "Which colour is the shape?"),
    "shape": ("What shape is this?", "What is the shape?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "position": ("Where is the shape?", "In which corner is the object?", "Where is the object located?"),
    "digits": ("What number is written?", "Read the digits.", "What digits are shown?"),
    "motion": ("Which way does the shape move?", "In which direction is the object moving?",
               "Where does the object move?"),
}

# 5x7 glyphs for 0-9, one string per row ('#' = ink). Our own font, so images do not depend on
# which fonts the installed Pillow ships.
_GLYPHS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}


@dataclass(frozen=True)
class Sample:
    """One question about one image (or one video: a list of frames) with its exact answer."""

    task: str
    question: str
    answer: str
    image: Image.Image | None = None
    video: list[Image.Image] | None = None


def _background(rng: random.Random, size: int) -> Image.Image:
    """Near white, darkening to the right (less red) and downwards (less green) by up to 48 levels.

    Qwen2-VL's ViT has no absolute position embedding (only RoPE, which is relative), so on a
    uniform background nothing in a patch says where it is; this fixed gradient does.
    """
    shade = [rng.randint(*BACKGROUND_SHADES) for _ in range(3)]
    ramp = [round(48 * i / (size - 1)) for i in range(size)]
    red = Image.frombytes("L", (size, 1), bytes(max(0, shade[0] - r) for r in ramp)).resize((size, size))
    green = Image.frombytes("L", (1, size), bytes(max(0, shade[1] - r) for r in ramp)).resize((size, size))
    return Image.merge("RGB", (red, green, Image.new("L", (size, size), shade[2])))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw a filled circle / square / upward triangle of half-size r centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9  # a square of the same half-size looks larger than the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)


def _single_object(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    """One shape placed well inside one quadrant: (image, colour, shape, corner)."""
    img = _background(rng, size)
    colour, shape, corner = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(CORNERS)
    r = rng.uniform(*OBJECT_SCALE) * size
    half = size / 2
    lo, hi = r + 0.04 * size, half - r - 0.06 * size  # stay clear of the edge and the midlines
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if corner.endswith("right"):
        cx = size - cx
    if corner.startswith("bottom"):
        cy = size - cy
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLORS[colour])
    return img, colour, shape, corner


def _count_image(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    """1-4 circles of one size and random colours on non-overlapping cells of a 3x3 grid."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    n = rng.randint(1, 4)
    cell = size / 3
    r = rng.uniform(*COUNT_SCALE) * cell
    for index in rng.sample(range(9), n):
        cx = (index % 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (index // 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        draw_shape(draw, "circle", cx, cy, r, COLORS[rng.choice(list(COLORS))])
    return img, n


def draw_digits(text: str, rng: random.Random, size: int) -> Image.Image:
    """`text` (digits only) in the 5x7 glyphs, dark ink, each glyph cell 4-7 px (at size 112).

    Strokes stay >= 4 px wide at 112 px so that a digit covers about 2x2 ViT patches (14 px).
    """
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    width_cells = 6 * len(text) - 1  # 5 cells per glyph + 1 cell gap
    largest = max(1, int(0.8 * size / max(width_cells, 11)))
    cell = rng.randint(max(1, min(largest, size // 28)), largest)
    x0 = rng.randint(2, max(2, size - width_cells * cell - 2))
    y0 = rng.randint(2, max(2, size - 7 * cell - 2))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    for k, ch in enumerate(text):
        for row, line in enumerate(_GLYPHS[ch]):
            for col, mark in enumerate(line):
                if mark == "#":
                    x = x0 + (6 * k + col) * cell
                    y = y0 + row * cell
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=ink)
    return img


def _motion_video(rng: random.Random, size: int) -> tuple[list[Image.Image], str]:
    """NUM_FRAMES frames of one shape moving in a straight line: (frames, direction)."""
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    shape, colour = rng.choice(SHAPES), COLORS[rng.choice(list(COLORS))]
    r = rng.uniform(*MOTION_SCALE) * size
    step = rng.uniform(0.09, 0.12) * size
    travel = step * (NUM_FRAMES - 1)
    # start so that the whole path stays inside the canvas
    lo, hi = r + 2, size - r - 2
    x0 = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    y0 = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    background = _background(rng, size)
    frames = []
    for t in range(NUM_FRAMES):
        frame = background.copy()
        draw_shape(ImageDraw.Draw(frame), shape, x0 + dx * step * t, y0 + dy * step * t, r, colour)
        frames.append(frame)
    return frames, direction


def make_sample(rng: random.Random, task: str, size: int = 112) -> Sample:
    """One sample of `task` (one of TASKS), drawn from `rng`; images are size x size RGB."""
    if task not in TASKS:
        raise InputError(f"make_sample: unknown task {task!r}; allowed tasks are {', '.join(TASKS)}")
    question = rng.choice(QUESTIONS[task])
    if task in ("color", "shape", "position"):
        img, colour, shape, corner = _single_object(rng, size)
        answer = {"color": colour, "shape": shape, "position": corner}[task]
        return Sample(task, question, answer, image=img)
    if task == "count":
        img, n = _count_image(rng, size)
        return Sample(task, question, str(n), image=img)
    if task == "digits":
        text = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 2)))
        return Sample(task, question, text, image=draw_digits(text, rng, size))
    frames, direction = _motion_video(rng, size)
    return Sample(task, question, direction, video=frames)


def make_samples(n: int, seed: int | str, tasks: Sequence[str] = TASKS, size: int = 112) -> list[Sample]:
    """`n` samples cycling through `tasks` in order; the same (seed, tasks, size) gives the same samples."""
    if n < 0:
        raise InputError(f"make_samples: n is {n}; it must be >= 0")
    rng = random.Random(f"qwen2vl-synthetic:{seed}")
    return [make_sample(rng, tasks[i % len(tasks)], size) for i in range(n)]
