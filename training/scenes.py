"""Procedural scenes, captions, edit instructions and a pixel scorer for the bundled model.

The world is small on purpose: one flat-coloured shape on a plain background, at one of nine named places.
Everything the scorer knows comes from the same tables the renderer uses, so a score is a statement about
whether the image shows what the prompt asked for, not about a learned judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fluxserve.engines.phrasing import Phrasing

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


def cell_center(position: str, size: int = SIZE, height: int | None = None) -> tuple[float, float]:
    """Centre of a position's cell in the 3x3 grid over a ``size`` x ``height`` image (square by default)."""
    idx = POSITIONS.index(position)
    row, col = divmod(idx, 3)
    return (col + 0.5) * size / 3, (row + 0.5) * (height or size) / 3


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


def render(scene: Scene, size: int = SIZE, height: int | None = None) -> Image.Image:
    """Draw a scene antialiased by supersampling; the object's bounding box is centred in its cell."""
    return render_objects([scene], size, height)


def render_objects(scenes: list[Scene], width: int = SIZE, height: int | None = None) -> Image.Image:
    """Draw several objects (each scene's shape, colour, place, size) on the first one's background.

    Non-square images (the aspect buckets) keep the 3x3 grid over the whole frame and scale objects with
    the short side, so an object still fits its cell.
    """
    height = height or width
    img = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), COLORS[scenes[0].background])
    draw = ImageDraw.Draw(img)
    unit = SUPERSAMPLE * min(width, height) / SIZE
    for scene in scenes:
        dx, dy, k = jitter_offsets(scene.jitter)
        cx, cy = cell_center(scene.position, width, height)
        poly = shape_polygon(
            scene.shape,
            cx * SUPERSAMPLE + dx * unit,
            cy * SUPERSAMPLE + dy * unit,
            RADIUS[scene.size] * k * unit,
        )
        draw.polygon(poly, fill=COLORS[scene.color])
    return img.resize((width, height), Image.Resampling.BOX)


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
# Training phrasings. A template without {bg} describes the default background (DEFAULT_BACKGROUND), one
# without {where} the default place (the center): "a red circle" is a red circle in the middle of white.
CAPTION_TEMPLATES = [
    "a {size} {color} {shape} {where} on a {bg} background",
    "{size} {color} {shape} {where}, {bg} background",
    "a {color} {shape}, {size}, {where} against a {bg} background",
    "there is a {size} {color} {shape} {where}; the background is {bg}",
    "{bg} background with a {size} {color} {shape} {where}",
    "a picture of a {size} {color} {shape} {where} on {bg}",
    "{where}: a {size} {color} {shape} on a plain {bg} background",
    "a {color} {shape} {where} on a {bg} background",
    "a {size} {shape} in {color} {where}, on a {bg} background",
    "a {size} {color} {shape} {where}",
    "a {color} {shape} {where}",
    "{where}: a {size} {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} on a {bg} background",
    "a {color} {shape}",
]
# The phrasing the server's reader writes every prompt it understands in (exported as phrasing.json, read by
# fluxserve.engines.phrasing): v1's first template, or its unsized form when the prompt names no size; each
# place in its first phrase, the background always said.
CANONICAL_TEMPLATES = {"sized": CAPTION_TEMPLATES[0], "unsized": CAPTION_TEMPLATES[7]}
# Phrasings kept out of training, for the held-out evaluation: new word orders of the same words.
EVAL_CAPTION_TEMPLATES = [
    "on a {bg} background, a {size} {color} {shape} {where}",
    "{where} there is a {size} {color} {shape} on a {bg} background",
    "the {shape} is {color} and {size}, {where}; {bg} background",
    "a {size} {color} {shape} on a {bg} background, {where}",
    "{size} {color} {shape} {where}",
    "the {color} {shape} {where}",
]
# Two objects, each "{size} {color} {shape}" or "{color} {shape}" with its place.
PAIR_TEMPLATES = [
    "a {o1} {w1} and a {o2} {w2} on a {bg} background",
    "{bg} background with a {o1} {w1} and a {o2} {w2}",
    "a {o1} {w1} and a {o2} {w2}",
    "there is a {o1} {w1} and a {o2} {w2}; the background is {bg}",
]
EVAL_PAIR_TEMPLATES = [
    "{w1} a {o1}, {w2} a {o2}, on a {bg} background",
    "a {o1} {w1}, and a {o2} {w2}",
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
DEFAULT_BACKGROUND = "white"
DEFAULT_POSITION = "center"
# Words read as another word (the encoders give both the same embedding, training.model.tie_synonyms), so
# common alternatives work without retraining. Single words only; each maps to a trained word.
SYNONYMS: dict[str, str] = {
    "an": "a",
    "one": "a",
    "giant": "huge",
    "enormous": "huge",
    "massive": "huge",
    "mini": "tiny",
    "smaller": "small",
    "bigger": "large",
    "centre": "center",
    "central": "center",
    "centered": "center",
    "centred": "center",
    "colour": "color",
    "recolour": "recolor",
    "violet": "purple",
    "scarlet": "red",
    "crimson": "red",
    "dot": "circle",
    "disc": "circle",
    "disk": "circle",
    "ball": "circle",
    "box": "square",
    "backdrop": "background",
    "image": "picture",
    "above": "at",
}


def default_background(color: str) -> str:
    """The background of a prompt that names none: white, or black behind a white object."""
    return "black" if color == DEFAULT_BACKGROUND else DEFAULT_BACKGROUND


def _fill(template: str, scene: Scene, rng: np.random.Generator) -> str:
    words = SIZE_WORDS[scene.size]
    phrases = POSITION_PHRASES[scene.position]
    return template.format(
        size=words[rng.integers(len(words))],
        color=scene.color,
        shape=scene.shape,
        where=phrases[rng.integers(len(phrases))],
        bg=scene.background,
    )


@cache
def canonical_phrasing() -> Phrasing:
    """The scene world and the phrasing the server's reader writes (the folder's phrasing.json): these
    tables, each place in its first phrase, CANONICAL_TEMPLATES."""
    return Phrasing(
        colors=tuple(COLOR_NAMES),
        shapes=tuple(SHAPES),
        sizes={word: size for size, words in SIZE_WORDS.items() for word in words},
        synonyms=SYNONYMS,
        places={place: phrases[0] for place, phrases in POSITION_PHRASES.items()},
        default_place=DEFAULT_POSITION,
        default_background=DEFAULT_BACKGROUND,
        background_behind_default=default_background(DEFAULT_BACKGROUND),
        **CANONICAL_TEMPLATES,
    )


def canonical_caption(scene: Scene, sized: bool = True) -> str:
    """The scene as the server's reader phrases it."""
    size = scene.size if sized else None
    return canonical_phrasing().write(scene.shape, scene.color, scene.position, scene.background, size)


def fits(template: str, scene: Scene) -> bool:
    """Whether ``template`` describes ``scene`` exactly: what it leaves out must be the default."""
    if "{bg}" not in template and scene.background != default_background(scene.color):
        return False
    return "{where}" in template or scene.position == DEFAULT_POSITION


# The caption grammar (training): a description is its parts (the object, its place, the background) in any
# order, each in one of several forms, joined the ways people type them. Templates are drawn with their
# slots open and filled afterwards; a draw whose template is one of the held-out phrasings (EVAL_*) is drawn
# again, so the evaluation's word orders stay unseen.
ARTICLES = ["a", "a", "a", "the", "one", ""]
OBJECT_FORMS = [
    "{size} {color} {shape}",
    "{size} {color} {shape}",
    "{color} {shape}",
    "{color} {shape}",
    "{size} {shape} in {color}",
    "{shape} in {color}",
    "{color} {size} {shape}",
]
OPENERS = ["there is", "a picture of", "draw", "showing"]
BACKGROUND_FIRST = [
    "on a {bg} background,",
    "{bg} background with",
    "a {bg} background with",
    "{bg} background:",
    "the background is {bg};",
    "over a {bg} background,",
]
BACKGROUND_LATER = [
    "on a {bg} background",
    "against a {bg} background",
    "on {bg}",
    "on a plain {bg} background",
    "with a {bg} background",
    "over a {bg} background",
    "{bg} background",
    "the background is {bg}",
]
JOINERS = [" ", " ", ", ", "; "]
GROUP_JOINERS = [" and ", ", ", ", and ", "; ", " with "]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_template(rng: np.random.Generator) -> str:
    """An article (or none) and one object form."""
    art = _pick(rng, ARTICLES)
    form = _pick(rng, OBJECT_FORMS)
    return f"{art} {form}" if art else form


def _background_part(rng: np.random.Generator, first: bool) -> str:
    return _pick(rng, BACKGROUND_FIRST if first else BACKGROUND_LATER)


@cache
def _held_out_forms() -> frozenset[str]:
    return frozenset(normalize_prompt(t) for t in EVAL_CAPTION_TEMPLATES + EVAL_PAIR_TEMPLATES)


def held_out(template: str) -> bool:
    """Whether a template is one of the evaluation's phrasings (compared as the tokenizers read them)."""
    return normalize_prompt(template) in _held_out_forms()


def single_template(rng: np.random.Generator, place: bool, background: bool) -> str:
    """One object's caption template: object, place (when said) and background (when said) in any order."""
    while True:
        parts = ["object"] + (["place"] if place else []) + (["background"] if background else [])
        order = [parts[i] for i in rng.permutation(len(parts))]
        text = ""
        for i, part in enumerate(order):
            if part == "object":
                piece = _object_template(rng)
                if i == 0 and rng.random() < 0.2:
                    piece = f"{_pick(rng, OPENERS)} {piece}"
            elif part == "place":
                piece = "{where}"
            else:
                piece = _background_part(rng, first=i == 0)
                while i == 0 and order[1] == "place" and piece.endswith("with"):
                    piece = _background_part(rng, first=True)  # "... with" is followed by the object
            if i == 0:
                text = piece
            elif text.endswith((",", ":", ";")) or (order[i - 1] == "background" and text.endswith("with")):
                text = f"{text} {piece}"
            else:
                text += _pick(rng, JOINERS + ([": "] if order[i - 1] == "place" else [])) + piece
        if not held_out(text):
            return text


def group_template(rng: np.random.Generator, n: int, background: bool) -> str:
    """Several objects, each with its place ({o1} {w1}, ...), joined, and the background when said."""
    while True:
        items = []
        for k in range(1, n + 1):
            art = _pick(rng, ARTICLES[:-1])
            items.append(f"{art} {{o{k}}} {{w{k}}}" if rng.random() < 0.7 else f"{{w{k}}} {art} {{o{k}}}")
        text = items[0]
        for k, item in enumerate(items[1:], start=2):
            text += (_pick(rng, GROUP_JOINERS) if k == n else ", ") + item
        if background:
            if rng.random() < 0.5:
                text = f"{_background_part(rng, first=True)} {text}"
            else:
                text += _pick(rng, [" ", ", ", "; "]) + _background_part(rng, first=False)
        if not held_out(text):
            return text


def grammar_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from the grammar; the place is left unsaid only in the center, the background only when it
    is the default one."""
    place = scene.position != DEFAULT_POSITION or rng.random() < 0.5
    background = scene.background != default_background(scene.color) or rng.random() < 0.4
    return _fill(single_template(rng, place, background), scene, rng)


def group_caption(scenes: Sequence[Scene], rng: np.random.Generator) -> str:
    """A caption of several objects in the order given, each named with its place, on their background."""
    background = scenes[0].background != default_background_group(scenes) or rng.random() < 0.4
    template = group_template(rng, len(scenes), background)
    values: dict[str, str] = {"bg": scenes[0].background}
    for k, scene in enumerate(scenes, start=1):
        form = _pick(rng, OBJECT_FORMS[:6])
        values[f"o{k}"] = form.format(
            size=_pick(rng, SIZE_WORDS[scene.size]), color=scene.color, shape=scene.shape
        )
        values[f"w{k}"] = _pick(rng, POSITION_PHRASES[scene.position])
    return template.format(**values)


def caption(scene: Scene, rng: np.random.Generator, templates: list[str] | None = None) -> str:
    """A varied English description; the same scene gets different wordings under different draws.

    Without ``templates`` the wording comes from the caption grammar (:func:`grammar_caption`); with them,
    from those that fit the scene (a background or place left unsaid is the default one).
    """
    if templates is None:
        return grammar_caption(scene, rng)
    usable = [t for t in templates if fits(t, scene)]
    return _fill(usable[rng.integers(len(usable))], scene, rng)


def with_defaults(scene: Scene, rng: np.random.Generator, share: float) -> Scene:
    """With probability ``share``, the scene on its default background (so short captions fit it)."""
    if rng.random() < share:
        return replace(scene, background=default_background(scene.color))
    return scene


def pair_caption(
    pair: tuple[Scene, Scene], rng: np.random.Generator, templates: list[str] | None = None
) -> str:
    """Two objects with their places, in the order given, on the first scene's background; from the caption
    grammar (:func:`group_caption`) unless ``templates`` are given."""
    if templates is None:
        return group_caption(list(pair), rng)
    usable = [t for t in templates if "{bg}" in t or pair[0].background == default_background_group(pair)]
    template = usable[rng.integers(len(usable))]

    def obj(scene: Scene) -> str:
        words = SIZE_WORDS[scene.size]
        return (
            f"{words[rng.integers(len(words))]} {scene.color} {scene.shape}"
            if rng.random() < 0.5
            else (f"{scene.color} {scene.shape}")
        )

    def where(scene: Scene) -> str:
        phrases = POSITION_PHRASES[scene.position]
        return phrases[rng.integers(len(phrases))]

    a, b = pair
    return template.format(o1=obj(a), w1=where(a), o2=obj(b), w2=where(b), bg=a.background)


def default_background_group(scenes: Sequence[Scene]) -> str:
    """White unless an object is white (then black)."""
    return "black" if any(s.color == DEFAULT_BACKGROUND for s in scenes) else DEFAULT_BACKGROUND


def random_pair(
    rng: np.random.Generator, triples: list[tuple[str, str, str]], default_share: float = 0.3
) -> tuple[Scene, Scene]:
    """Two objects of different colours at different places, drawn from ``triples``, on one background."""
    a, b = random_group(rng, triples, 2, default_share)
    return a, b


def random_group(
    rng: np.random.Generator, triples: list[tuple[str, str, str]], n: int, default_share: float = 0.3
) -> list[Scene]:
    """``n`` objects of different colours at different places, drawn from ``triples``, on one background
    that is none of their colours (the default one, white or black, for ``default_share`` of groups, unless
    both are among them)."""
    while True:
        picked = [triples[i] for i in rng.integers(len(triples), size=n)]
        if len({p for _, _, p in picked}) == n and len({c for _, c, _ in picked}) == n:
            break
    colors = {c for _, c, _ in picked}
    bgs = [c for c in COLOR_NAMES if c not in colors]
    sizes = [SIZES[i] for i in rng.integers(2, size=n)]
    bg = bgs[rng.integers(len(bgs))]
    group = [Scene(s, c, p, z, bg, int(rng.integers(2))) for (s, c, p), z in zip(picked, sizes, strict=True)]
    if rng.random() < default_share and default_background_group(group) not in colors:
        bg = default_background_group(group)
        group = [replace(scene, background=bg) for scene in group]
    return group


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
    texts += CAPTION_TEMPLATES + PAIR_TEMPLATES + RECOLOR_TEMPLATES + BACKGROUND_TEMPLATES + MOVE_TEMPLATES
    texts += ARTICLES + OBJECT_FORMS + OPENERS + BACKGROUND_FIRST + BACKGROUND_LATER + GROUP_JOINERS
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


def eval_prompts(n: int = 200, seed: int = 7, default_share: float = 0.3) -> list[tuple[Scene, str]]:
    """Held-out text-to-image prompts: every scene's (shape, colour, position) was never trained on, and the
    phrasings are EVAL_CAPTION_TEMPLATES, which training never used; ``default_share`` of them name no
    background (the scene's is the default)."""
    rng = np.random.default_rng(seed)
    triples = sorted(heldout_triples())
    out = []
    for _ in range(n):
        scene = with_defaults(random_scene(rng, triples), rng, default_share)
        out.append((scene, caption(scene, rng, EVAL_CAPTION_TEMPLATES)))
    return out


def eval_pairs(n: int = 100, seed: int = 17) -> list[tuple[tuple[Scene, Scene], str]]:
    """Held-out two-object prompts: both objects' triples held out, phrasings from EVAL_PAIR_TEMPLATES."""
    rng = np.random.default_rng(seed)
    triples = sorted(heldout_triples())
    out = []
    for _ in range(n):
        pair = random_pair(rng, triples)
        out.append((pair, pair_caption(pair, rng, EVAL_PAIR_TEMPLATES)))
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


def analyse_objects(image: Image.Image) -> tuple[str, list[Analysis]]:
    """The background and every object region of 30 pixels or more, largest first (for scenes of several
    objects; :func:`analyse` reads the largest one)."""
    img = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    bg_rgb = np.median(np.concatenate([img[:2], img[-2:]], axis=0).reshape(-1, 3), axis=0)
    labels, count = ndimage.label(np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > 60)
    found = []
    for label in range(1, count + 1):
        mask = labels == label
        if mask.sum() >= 30:  # each region read alone, the rest painted over with the background
            found.append(analyse(Image.fromarray(np.where(mask[..., None], img, bg_rgb).astype(np.uint8))))
    return nearest_color(bg_rgb), sorted(found, key=lambda a: -a.area)


def score_pair(image: Image.Image, pair: tuple[Scene, Scene]) -> dict[str, bool]:
    """Both objects right (colour and place; "shapes" also the shape), and the background."""
    background, found = analyse_objects(image)
    placed = [any(a.color == s.color and a.position == s.position for a in found) for s in pair]
    shaped = [
        any(a.color == s.color and a.position == s.position and a.shape == s.shape for a in found)
        for s in pair
    ]
    return {"background": background == pair[0].background, "both": all(placed), "shapes": all(shaped)}


def edge_excess(image: Image.Image, band: float = 0.2) -> float:
    """How far the image's outer band (``band`` of its width at the left and right, of its height at the top
    and bottom) strays from plain background: the 99.5th percentile of the pixels' RGB distance to the
    band's median colour (0 to 441).

    For a scene whose objects sit in the center cell the band is pure background, so anything there is an
    artifact: the lines and specks a model draws along the right and bottom edges when run at a latent grid
    it never saw. Clean renders score under 10; those artifacts, 100 and more.
    """
    img = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = img.shape[:2]
    bx, by = max(1, round(w * band)), max(1, round(h * band))
    edge = np.ones((h, w), dtype=bool)
    edge[by : h - by, bx : w - bx] = False
    pixels = img[edge]
    dist = np.sqrt(((pixels - np.median(pixels, axis=0)) ** 2).sum(-1))
    return float(np.percentile(dist, 99.5))


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
