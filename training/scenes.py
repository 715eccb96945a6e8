"""Procedural scenes, captions, edit instructions and a pixel scorer for the bundled model.

The world is small on purpose: one flat-coloured shape on a plain background, at one of nine named places.
Everything the scorer knows comes from the same tables the renderer uses, so a score is a statement about
whether the image shows what the prompt asked for, not about a learned judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 128  # native resolution of the bundled model
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 210),
    "light blue": (135, 205, 250),
    "purple": (130, 50, 180),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES: list[str] = list(COLORS)
SHAPES: list[str] = ["circle", "square", "triangle", "star", "heart"]
SIZES: list[str] = ["small", "large"]
# Row-major 3x3 grid: index = row * 3 + col.
POSITIONS: list[str] = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
]
RADIUS = {"small": 12.0, "large": 19.0}  # half the bounding-box extent, in native pixels
JITTER_PX = 3.0


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; `jitter` selects a small deterministic offset/size variant."""

    shape: str
    color: str
    position: str
    size: str
    background: str
    jitter: int = 0

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.color, self.position)


def jitter_offsets(jitter: int) -> tuple[float, float, float]:
    """(dx, dy, radius scale) for a jitter variant; variant 0 is the canonical placement."""
    if jitter == 0:
        return 0.0, 0.0, 1.0
    rng = np.random.default_rng(1000 + jitter)
    dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
    return float(dx), float(dy), float(rng.uniform(0.9, 1.1))


def cell_center(position: str, size: int = SIZE) -> tuple[float, float]:
    idx = POSITIONS.index(position)
    row, col = divmod(idx, 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape whose bounding box is centred on (cx, cy) with half-extent r (y grows down)."""
    if shape == "circle":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    elif shape == "square":
        k = 0.88
        pts = [(-k, -k), (k, -k), (k, k), (-k, k)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (1.0, 0.75), (-1.0, 0.75)]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    arr = np.asarray(pts, dtype=np.float64)
    lo, hi = arr.min(0), arr.max(0)
    arr = (arr - (lo + hi) / 2) / ((hi - lo).max() / 2)  # bbox centred, longest side 2
    return [(cx + r * x, cy + r * y) for x, y in arr]


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """Draw a scene antialiased by supersampling; the object's bounding box is centred in its cell."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), COLORS[scene.background])
    dx, dy, k = jitter_offsets(scene.jitter)
    cx, cy = cell_center(scene.position, size)
    scale = SUPERSAMPLE * size / SIZE
    r = RADIUS[scene.size] * k * scale
    poly = shape_polygon(
        scene.shape, (cx + dx * size / SIZE) * SUPERSAMPLE, (cy + dy * size / SIZE) * SUPERSAMPLE, r
    )
    ImageDraw.Draw(img).polygon(poly, fill=COLORS[scene.color])
    return img.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------- captions

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
POSITION_PHRASES: dict[str, list[str]] = {
    "top left": ["in the top left corner", "at the top left", "in the upper left corner", "top left"],
    "top": ["at the top", "in the top middle", "at the top center", "top middle"],
    "top right": ["in the top right corner", "at the top right", "in the upper right corner", "top right"],
    "left": ["on the left", "in the middle left", "at the left side", "middle left"],
    "center": ["in the center", "in the middle", "at the center", "center"],
    "right": ["on the right", "in the middle right", "at the right side", "middle right"],
    "bottom left": [
        "in the bottom left corner",
        "at the bottom left",
        "in the lower left corner",
        "bottom left",
    ],
    "bottom": ["at the bottom", "in the bottom middle", "at the bottom center", "bottom middle"],
    "bottom right": [
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right corner",
        "bottom right",
    ],
}
CAPTION_TEMPLATES = [
    "a {size} {color} {shape} {where} on a {bg} background",
    "{size} {color} {shape} {where}, {bg} background",
    "a {color} {shape}, {size}, {where} against a {bg} background",
    "there is a {size} {color} {shape} {where}; the background is {bg}",
    "{bg} background with a {size} {color} {shape} {where}",
    "a picture of a {size} {color} {shape} {where} on {bg}",
    "{where}: a {size} {color} {shape} on a plain {bg} background",
]
RECOLOR_TEMPLATES = [
    "make the {shape} {new}",
    "change the {shape} to {new}",
    "turn the {shape} {new}",
    "recolor the {shape} {new}",
    "paint the {shape} {new}",
    "make it {new}",
    "change the color of the {shape} to {new}",
]
BACKGROUND_TEMPLATES = [
    "make the background {new}",
    "change the background to {new}",
    "set the background to {new}",
    "use a {new} background",
    "paint the background {new}",
]
MOVE_TEMPLATES = [
    "move the {shape} {where}",
    "put the {shape} {where}",
    "move it {where}",
]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied English description; the same scene gets different wordings under different draws."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    words = SIZE_WORDS[scene.size]
    phrases = POSITION_PHRASES[scene.position]
    return template.format(
        size=words[rng.integers(len(words))],
        color=scene.color,
        shape=scene.shape,
        where=phrases[rng.integers(len(phrases))],
        bg=scene.background,
    )


@dataclass(frozen=True)
class Edit:
    kind: str  # "recolor", "background" or "move"
    source: Scene
    target: Scene
    instruction: str


def make_edit(source: Scene, kind: str, rng: np.random.Generator, new: str | None = None) -> Edit:
    """An edit of `kind` applied to `source`, with a random new value unless `new` is given."""
    if kind == "recolor":
        choices = [c for c in COLOR_NAMES if c not in (source.color, source.background)]
        new = new or choices[rng.integers(len(choices))]
        target = replace(source, color=new)
        tpl = RECOLOR_TEMPLATES[rng.integers(len(RECOLOR_TEMPLATES))]
        text = tpl.format(shape=source.shape, new=new)
    elif kind == "background":
        choices = [c for c in COLOR_NAMES if c not in (source.color, source.background)]
        new = new or choices[rng.integers(len(choices))]
        target = replace(source, background=new)
        tpl = BACKGROUND_TEMPLATES[rng.integers(len(BACKGROUND_TEMPLATES))]
        text = tpl.format(new=new)
    elif kind == "move":
        choices = [p for p in POSITIONS if p != source.position]
        new = new or choices[rng.integers(len(choices))]
        target = replace(source, position=new)
        tpl = MOVE_TEMPLATES[rng.integers(len(MOVE_TEMPLATES))]
        phrases = POSITION_PHRASES[new]
        text = tpl.format(shape=source.shape, where=phrases[rng.integers(len(phrases))])
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return Edit(kind, source, target, text)


def vocabulary() -> list[str]:
    """Every word any caption or instruction can contain, in a stable order."""
    texts: list[str] = []
    texts += CAPTION_TEMPLATES + RECOLOR_TEMPLATES + BACKGROUND_TEMPLATES + MOVE_TEMPLATES
    texts += COLOR_NAMES + SHAPES + [w for ws in SIZE_WORDS.values() for w in ws]
    texts += [p for ps in POSITION_PHRASES.values() for p in ps]
    words: list[str] = []
    for text in texts:
        for w in normalize_prompt(re.sub(r"\{\w+\}", " ", text)).split():
            if w not in words:
                words.append(w)
    return words


def normalize_prompt(text: str) -> str:
    """Lower-case and split punctuation off words, as both tokenizers see text."""
    text = text.lower()
    for p in ",;:.!?":
        text = text.replace(p, f" {p} ")
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------- split


def all_triples() -> list[tuple[str, str, str]]:
    return [(s, c, p) for s in SHAPES for c in COLOR_NAMES for p in POSITIONS]


def heldout_triples(fraction: float = 0.1, seed: int = 1234) -> set[tuple[str, str, str]]:
    """(shape, colour, position) triples never rendered in training; fixed by `seed`, not by the run."""
    triples = all_triples()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(triples))
    n = round(len(triples) * fraction)
    return {triples[i] for i in order[:n]}


def all_scenes(jitters: int = 1) -> Iterator[Scene]:
    for shape, color, position in all_triples():
        for size in SIZES:
            for bg in COLOR_NAMES:
                if bg == color:
                    continue
                for j in range(jitters):
                    yield Scene(shape, color, position, size, bg, j)


def random_scene(rng: np.random.Generator, triples: list[tuple[str, str, str]], jitters: int = 1) -> Scene:
    shape, color, position = triples[rng.integers(len(triples))]
    bgs = [c for c in COLOR_NAMES if c != color]
    return Scene(
        shape,
        color,
        position,
        SIZES[rng.integers(2)],
        bgs[rng.integers(len(bgs))],
        int(rng.integers(jitters)),
    )


def eval_prompts(n: int = 200, seed: int = 7) -> list[tuple[Scene, str]]:
    """Held-out text-to-image prompts: every scene's (shape, colour, position) was never trained on."""
    rng = np.random.default_rng(seed)
    triples = sorted(heldout_triples())
    out = []
    for _ in range(n):
        scene = random_scene(rng, triples)
        out.append((scene, caption(scene, rng)))
    return out


def eval_edits(n: int = 100, seed: int = 11, kind: str = "recolor") -> list[Edit]:
    """Held-out recolour, background or move edits: the result's (shape, colour, position) triple was never
    trained on (a background edit keeps the triple, so its source is a held-out scene too)."""
    rng = np.random.default_rng(seed)
    held = sorted(heldout_triples())
    out: list[Edit] = []
    while len(out) < n:
        shape, new_color, new_position = held[rng.integers(len(held))]
        if kind == "recolor":
            colors = [c for c in COLOR_NAMES if c != new_color]
            color, position, new = colors[rng.integers(len(colors))], new_position, new_color
        elif kind == "move":
            places = [p for p in POSITIONS if p != new_position]
            color, position, new = new_color, places[rng.integers(len(places))], new_position
        elif kind == "background":
            colors = [c for c in COLOR_NAMES if c != new_color]
            color, position, new = new_color, new_position, colors[rng.integers(len(colors))]
        else:
            raise ValueError(f"eval_edits: kind must be 'recolor', 'background' or 'move', not {kind!r}")
        bgs = [c for c in COLOR_NAMES if c not in (color, new_color, new)]
        src = Scene(shape, color, position, SIZES[rng.integers(2)], bgs[rng.integers(len(bgs))])
        out.append(make_edit(src, kind, rng, new=new))
    return out


# ----------------------------------------------------------------------------------------- scorer

_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float64)
_TEMPLATE_RES = 32


def nearest_color(rgb: np.ndarray) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)
    return COLOR_NAMES[int(d.argmin())]


def _mask_template(mask: np.ndarray) -> np.ndarray:
    """A boolean mask cropped to its bounding box and resampled to a fixed square."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    img = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (_TEMPLATE_RES, _TEMPLATE_RES), Image.Resampling.BILINEAR
    )
    return np.asarray(img) >= 128


def _shape_templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        s = 256
        img = Image.new("L", (s, s), 0)
        ImageDraw.Draw(img).polygon(shape_polygon(shape, s / 2, s / 2, s * 0.45), fill=255)
        out[shape] = _mask_template(np.asarray(img) >= 128)
    return out


_TEMPLATES = _shape_templates()


@dataclass(frozen=True)
class Analysis:
    background: str
    color: str | None
    position: str | None
    shape: str | None
    size: str | None
    area: int


def analyse(image: Image.Image) -> Analysis:
    """Read back background, object colour, 3x3 cell, shape and size from pixels alone.

    Background: median of the border. Object: the largest connected region that differs clearly from the
    background. Shape: best IoU of the region's bbox-normalised mask against each rendered shape.
    """
    img = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    border = np.concatenate(
        [
            img[:2].reshape(-1, 3),
            img[-2:].reshape(-1, 3),
            img[:, :2].reshape(-1, 3),
            img[:, -2:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    diff = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    labels, count = ndimage.label(diff > 60)
    if count == 0:
        return Analysis(background, None, None, None, None, 0)
    areas = ndimage.sum_labels(np.ones_like(diff), labels, index=np.arange(1, count + 1))
    best = int(np.argmax(areas)) + 1
    mask = labels == best
    area = int(mask.sum())
    if area < 30:
        return Analysis(background, None, None, None, None, area)
    core = ndimage.binary_erosion(mask, iterations=2)
    pixels = img[core] if core.sum() >= 10 else img[mask]
    color = nearest_color(np.median(pixels, axis=0))
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    col, row = min(int(cx * 3 // SIZE), 2), min(int(cy * 3 // SIZE), 2)
    filled = ndimage.binary_fill_holes(mask)
    tmpl = _mask_template(filled)
    ious = {s: (tmpl & t).sum() / max((tmpl | t).sum(), 1) for s, t in _TEMPLATES.items()}
    shape = max(ious, key=lambda s: ious[s])
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    size = "small" if extent < (RADIUS["small"] + RADIUS["large"]) else "large"
    return Analysis(background, color, POSITIONS[row * 3 + col], shape, size, area)


def score(image: Image.Image, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of an image against the scene its prompt described."""
    a = analyse(image)
    return {
        "background": a.background == scene.background,
        "color": a.color == scene.color,
        "position": a.position == scene.position,
        "shape": a.shape == scene.shape,
        "size": a.size == scene.size,
    }
