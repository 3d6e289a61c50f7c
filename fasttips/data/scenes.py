"""Procedural scenes: a few coloured shapes on a textured background, with exact captions at three
granularities and the per-pixel class mask of every image.

Classes (the mask's pixel values): 0 background, 1 circle, 2 square, 3 triangle, 4 star, 5 diamond.
Each scene is a pure function of its seed, so the demo data is the same on every machine.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("background", "circle", "square", "triangle", "star", "diamond")
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
                "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}
BACKGROUND_COLORS = {"gray": (128, 128, 128), "white": (235, 235, 230), "black": (25, 25, 25),
                     "beige": (220, 200, 160), "teal": (40, 120, 120), "pink": (240, 170, 190)}
TEXTURES = ("plain", "striped", "checkered", "dotted", "noisy")
SIZES = {"small": (0.12, 0.18), "medium": (0.2, 0.27), "large": (0.3, 0.38)}   # fraction of the side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
TEXTURE_WORDS = {"plain": "plain", "striped": "striped", "checkered": "checkered", "dotted": "dotted",
                 "noisy": "grainy"}
TEXTURE_LONG = {"plain": "a plain {c} background", "striped": "a {c} background with diagonal stripes",
                "checkered": "a {c} checkerboard background", "dotted": "a {c} background covered in dots",
                "noisy": "a grainy, noisy {c} background"}


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def position(self) -> str:
        row = ROWS[min(2, int(self.cy * 3))]
        col = COLS[min(2, int(self.cx * 3))]
        return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if kind == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
                for a in (-90, 30, 150)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = math.radians(-90 + 36 * i)
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return None


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _background(size: int, texture: str, color, rng: np.random.Generator) -> np.ndarray:
    """A 2-D texture pattern (cheap) added to the background colour."""
    yy, xx = _grid(size)
    contrast = 45.0 if np.mean(color) < 200 else -45.0
    if texture == "striped":
        period = rng.uniform(10, 22)
        pattern = contrast * (np.sin((xx + yy) * (2 * math.pi / period)) > 0)
    elif texture == "checkered":
        cell = int(rng.integers(14, 32))
        pattern = contrast * ((((xx // cell) + (yy // cell)) % 2) > 0)
    elif texture == "dotted":
        step = int(rng.integers(14, 24))
        pattern = contrast * (np.hypot((xx % step) - step / 2, (yy % step) - step / 2) < step / 5)
    elif texture == "noisy":
        pattern = 28.0 * rng.standard_normal((size, size), dtype=np.float32)
    else:
        pattern = np.zeros((size, size), np.float32)
    pattern = pattern + 4.0 * rng.standard_normal((size, size), dtype=np.float32)  # a little sensor noise
    img = np.asarray(color, np.float32)[None, None, :] + pattern[..., None].astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, n: int) -> list[Shape]:
    shapes: list[Shape] = []
    kinds = rng.choice(CLASSES[1:], size=n, replace=False)
    colors = rng.choice(list(SHAPE_COLORS), size=n, replace=False)
    for kind, color in zip(kinds, colors):
        for _ in range(50):
            size = str(rng.choice(list(SIZES)))
            r = rng.uniform(*SIZES[size]) / 2
            cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            if all(math.hypot(cx - s.cx, cy - s.cy) > r + s.radius + 0.03 for s in shapes):
                shapes.append(Shape(str(kind), str(color), size, float(cx), float(cy), float(r)))
                break
    return shapes


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        where = "to the left of" if dx > 0 else "to the right of"
    else:
        where = "above" if dy > 0 else "below"
    return f"the {a.color} {a.kind} is {where} the {b.color} {b.kind}"


def captions_for(shapes: list[Shape], texture: str, bg: str) -> dict[str, str]:
    alt = ", ".join([f"{s.color} {s.kind}" for s in shapes] + [f"{TEXTURE_WORDS[texture]} {bg} background"])
    things = [f"{_article(s.color)} {s.color} {s.kind}" for s in shapes]
    short = f"{_join(things)} on {_article(TEXTURE_WORDS[texture])} {TEXTURE_WORDS[texture]} {bg} background."
    placed = []
    for s in shapes:
        where = "in the center" if s.position == "center" else (
            f"at the {s.position}" if s.position.split()[0] in ("top", "bottom")
            else f"on the {s.position.split()[1]} side")
        placed.append(f"{_article(s.size)} {s.size} {s.color} {s.kind} {where}")
    long = f"{_join(placed)}, on {TEXTURE_LONG[texture].format(c=bg)}."
    if len(shapes) > 1:
        long += " " + _relation(shapes[0], shapes[1]).capitalize() + "."
    if len(shapes) > 2:
        long += " " + _relation(shapes[1], shapes[2]).capitalize() + "."
    return {"alt": alt, "short": short[0].upper() + short[1:], "long": long[0].upper() + long[1:]}


def make_scene(seed: int, size: int = 224, quality: int = 90) -> tuple[bytes, bytes, dict]:
    """(JPEG bytes, class-mask PNG bytes, json dict with captions and objects) of scene ``seed``."""
    rng = np.random.default_rng([seed, 20_260_522])
    texture = str(rng.choice(TEXTURES))
    bg = str(rng.choice(list(BACKGROUND_COLORS)))
    shapes = _place(rng, int(rng.integers(1, 4)))
    img = Image.fromarray(_background(size, texture, BACKGROUND_COLORS[bg], rng))
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for s in shapes:
        cx, cy, r = s.cx * size, s.cy * size, s.radius * size
        cls = CLASSES.index(s.kind)
        poly = _polygon(s.kind, cx, cy, r)
        if poly is None:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, fill=SHAPE_COLORS[s.color])
            mdraw.ellipse(box, fill=cls)
        else:
            draw.polygon(poly, fill=SHAPE_COLORS[s.color])
            mdraw.polygon(poly, fill=cls)
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG", quality=quality)
    mask.save(png, "PNG")
    meta = captions_for(shapes, texture, bg)
    meta["objects"] = [{"shape": s.kind, "color": s.color, "size": s.size, "position": s.position,
                        "class_id": CLASSES.index(s.kind)} for s in shapes]
    return jpg.getvalue(), png.getvalue(), meta
