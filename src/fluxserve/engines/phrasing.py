"""Prompts rewritten into a closed-vocabulary model's own phrasing before it reads them.

The bundled model is small: it draws a described scene reliably only when the words come in an order it was
trained on ("a small red star at the top on a blue background"), and it confuses the object's colour with the
background's in others ("on a blue background, a small red star at the top"). Its scenes have a handful of
attributes, so the server reads a prompt into them (one shape with its colour and size, a place on a 3x3
grid, a background) and hands the model the same scene in its own phrasing. A model folder declares that
phrasing in ``phrasing.json`` (written by ``training/export.py`` from the tables its captions came from);
folders without one (real FLUX weights) get prompts exactly as sent.

A scene of two or three objects ("a red circle on the left and a blue square on the right") is cut into
one clause per object at commas, semicolons, "and", "with", "beside" and "next to" ("to the left of" puts
the next object on the right), and at "above", "on top of", "below", "under", "beneath" and "underneath"
(the two objects in the top and bottom rows); each object becomes its own prompt, on the scene's one
background, with the place it was given (or a free one), and the engine draws them one object at a time
(:mod:`fluxserve.engines.flux.regions`), as the model was trained: one object per image.

A prompt the reader cannot take apart with certainty is left as sent: no shape or more than three, no colour
or several for an object, two sizes, two rows or two columns for one object, two objects in one place, a
negation. Words outside the model's vocabulary are skipped here and reported by
:mod:`fluxserve.engines.vocabulary`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from itertools import islice
from pathlib import Path

from pydantic import BaseModel, model_validator

PHRASING_FILE = "phrasing.json"

# English words that say where on the grid, which are the same for any scene model with a 3x3 layout.
ROWS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
COLUMNS = {"left": "left", "right": "right"}
BACKGROUND = "background"
BACKGROUND_VERBS = frozenset({"is", "of", "in", "to", ":"})  # "the background is blue", "background: blue"
GROUND_PREPOSITIONS = frozenset({"on", "against", "over"})  # "on blue", "against a plain blue"
FILLERS = frozenset({"a", "the", "plain"})
JOINS = frozenset({",", ";", ".", "and", "with", "beside"})  # where a scene of several objects is cut
NEXT_TO = ["next", "to"]  # a join too
OPPOSITE = {"left": "right", "right": "left"}  # "X to the left of Y": Y is on the right
# "X above Y": X in the top row, Y in the bottom one. Read before synonyms (the model reads "above" as "at").
ABOVE, BELOW = ("top", "bottom"), ("bottom", "top")
VERTICAL = {"above": ABOVE, "below": BELOW, "under": BELOW, "beneath": BELOW, "underneath": BELOW}
ON_TOP_OF = ["on", "top", "of"]  # "above"; "the top of the picture" is a place
READER_WORDS = JOINS | VERTICAL.keys() | {"next", "to", "of"}  # the reader's words, known to the model or not
MAX_OBJECTS = 3
GRID = 3  # rows and columns of the places
ROW_INDEX = {"top": 0, "bottom": GRID - 1}  # any other place is in the middle row or column
COLUMN_INDEX = {"left": 0, "right": GRID - 1}
NEGATIONS = frozenset({"not", "no", "without", "never", "nor"})
_TOKEN = re.compile(r"[^\W\d_]+|[,;:.!?]")


class Phrasing(BaseModel, frozen=True):
    """A model's world (its colours, shapes, sizes and places) and the phrasing it reads best."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: dict[str, str]  # a size word -> the size it names
    synonyms: dict[str, str]  # a word -> the trained word it stands for
    places: dict[str, str]  # a place ("top left", "center") -> its phrase in the template
    default_place: str
    default_background: str
    background_behind_default: str  # the background of an object whose colour is the default background
    sized: str  # template with {size} {color} {shape} {where} {bg}
    unsized: str  # the same without {size}

    @model_validator(mode="after")
    def _every_place(self) -> Phrasing:
        missing = [place for place in self.grid() if place not in self.places]
        if missing:
            raise ValueError(f"places lacks {missing}")
        return self

    def write(self, shape: str, color: str, place: str, background: str, size: str | None = None) -> str:
        """A scene in this phrasing (the sized template when a size is given)."""
        values = {"color": color, "shape": shape, "where": self.places[place], "bg": background}
        return self.sized.format(size=size, **values) if size else self.unsized.format(**values)

    def grid(self) -> list[str]:
        """Every place the reader can name: a row and a column, either alone, or the default place."""
        rows, columns = sorted(set(ROWS.values())), sorted(set(COLUMNS.values()))
        return [f"{r} {c}" for r in rows for c in columns] + rows + columns + [self.default_place]


@cache
def phrasing_of(weights: Path) -> Phrasing | None:
    """The phrasing the model at ``weights`` declares, or None (its prompts are never rewritten)."""
    path = weights / PHRASING_FILE
    if not path.is_file():
        return None
    return Phrasing.model_validate_json(path.read_text(encoding="utf-8"))


def words_of(prompt: str, phrasing: Phrasing) -> list[str]:
    """The prompt's words and punctuation, lower case, synonyms replaced, several-word colours joined."""
    tokens = [t if t in VERTICAL else phrasing.synonyms.get(t, t) for t in _TOKEN.findall(prompt.lower())]
    for color in (c for c in phrasing.colors if " " in c):
        parts = color.split()
        i = 0
        while i <= len(tokens) - len(parts):
            if tokens[i : i + len(parts)] == parts:
                tokens[i : i + len(parts)] = [color]
            i += 1
    return tokens


def _is_background(tokens: list[str], i: int, phrasing: Phrasing) -> bool:
    """Whether the colour at ``i`` is the background's: "blue background", "the background is blue",
    "on blue"; never a colour right before the object ("on a blue star")."""
    after = next((tokens[j] for j in range(i + 1, len(tokens)) if tokens[j] != "plain"), "")
    if after == BACKGROUND:
        return True
    if after in phrasing.shapes or after in phrasing.sizes or after in phrasing.colors:
        return False
    # the two words before it, nearest first, articles skipped
    before = list(islice((tokens[j] for j in range(i - 1, -1, -1) if tokens[j] not in FILLERS), 2))
    if before and before[0] in GROUND_PREPOSITIONS:
        return True
    return len(before) == 2 and before[0] in BACKGROUND_VERBS and before[1] == BACKGROUND


@dataclass(frozen=True)
class Part:
    """One object of a scene as the model is given it: alone on the scene's background, in its place."""

    prompt: str
    centre: tuple[float, float]  # the centre of its place, as fractions of the width and the height


@dataclass
class _Clause:
    """What a stretch of the prompt says: shapes, the object's colours, background colours, sizes, places."""

    shapes: list[str]
    colors: set[str]
    grounds: set[str]
    sizes: set[str]
    rows: set[str] = field(default_factory=set)
    columns: set[str] = field(default_factory=set)

    def says_where_or_size(self) -> bool:
        return bool(self.sizes or self.rows or self.columns)

    def takes(self, other: _Clause) -> bool:
        """Whether this object has none of the size and place words ``other`` says apart from any object."""
        pairs = ((self.sizes, other.sizes), (self.rows, other.rows), (self.columns, other.columns))
        return not any(mine and theirs for mine, theirs in pairs)

    def merge(self, other: _Clause) -> None:
        self.sizes |= other.sizes
        self.rows |= other.rows
        self.columns |= other.columns

    def place(self) -> str | None:
        if len(self.rows) > 1 or len(self.columns) > 1:
            raise _Unsure
        return " ".join([*self.rows, *self.columns]) or None


class _Unsure(Exception):
    """The prompt says something the reader cannot be sure of."""


def _clause(tokens: list[str], phrasing: Phrasing) -> _Clause:
    colors = [(t, _is_background(tokens, i, phrasing)) for i, t in enumerate(tokens) if t in phrasing.colors]
    return _Clause(
        shapes=[t for t in tokens if t in phrasing.shapes],
        colors={c for c, ground in colors if not ground},
        grounds={c for c, ground in colors if ground},
        sizes={phrasing.sizes[t] for t in tokens if t in phrasing.sizes},
        rows={ROWS[t] for t in tokens if t in ROWS},
        columns={COLUMNS[t] for t in tokens if t in COLUMNS},
    )


def _clauses(tokens: list[str]) -> list[list[str]]:
    """The prompt cut at its joining words and punctuation, empty stretches dropped. "next to" joins too;
    "left of" / "right of" puts the opposite column on the object after it, and "above" / "on top of" /
    "below" the opposite row."""
    out: list[list[str]] = [[]]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if tokens[i : i + 2] == NEXT_TO:
            out.append([])
            i += 1
        elif tokens[i : i + 3] == ON_TOP_OF or token in VERTICAL:
            (row, other), said = (VERTICAL[token], 1) if token in VERTICAL else (ABOVE, len(ON_TOP_OF))
            out[-1].append(row)
            out.append([other])
            i += said - 1
        elif token in OPPOSITE and tokens[i + 1 : i + 2] == ["of"]:
            out[-1].append(token)
            out.append([OPPOSITE[token]])
            i += 1
        elif token in JOINS:
            out.append([])
        else:
            out[-1].append(token)
        i += 1
    return [each for each in out if each]


def _objects(tokens: list[str], phrasing: Phrasing) -> tuple[list[_Clause], set[str]]:
    """The objects the prompt names and its background colours. One shape: the whole prompt describes it.
    Several: one clause each; a clause with no shape is the background ("on a blue background") or a place
    or size said apart ("on the left, a red circle"), which goes to the object before it when that one has
    none of those words yet, else to the one after."""
    count = sum(t in phrasing.shapes for t in tokens)
    if count == 1:
        whole = _clause(tokens, phrasing)
        return [whole], whole.grounds
    if not 1 < count <= MAX_OBJECTS:
        raise _Unsure
    clauses = [_clause(each, phrasing) for each in _clauses(tokens)]
    objects = [c for c in clauses if c.shapes]
    if len(objects) != count:  # two shapes in one clause: which words are whose is not sure
        raise _Unsure
    for i, clause in enumerate(clauses):
        if clause.shapes or not clause.says_where_or_size():
            continue
        before = next((c for c in reversed(clauses[:i]) if c.shapes and c.takes(clause)), None)
        after = next((c for c in clauses[i + 1 :] if c.shapes), None)
        target = before or after
        if target is None:
            raise _Unsure
        target.merge(clause)
    if any(c.colors for c in clauses if not c.shapes):  # a colour with no object and not the background
        raise _Unsure
    return objects, set().union(*(c.grounds for c in clauses))


def _background(grounds: set[str], colors: set[str], phrasing: Phrasing) -> str:
    """The one background named, or the default one that is none of the objects' colours."""
    if len(grounds) > 1:
        raise _Unsure
    choices = list(grounds) or [phrasing.default_background, phrasing.background_behind_default]
    background = next((c for c in choices if c not in colors), None)
    if background is None:  # the named background is an object's colour, or both defaults are
        raise _Unsure
    return background


def _places(named: list[str | None], phrasing: Phrasing) -> list[str]:
    """Each object's place: as named; when none is named, spread along the middle row; else a free one."""
    if len(named) > 1 and not any(named):
        named = ["left", "right"] if len(named) == 2 else ["left", phrasing.default_place, "right"]
    free = iter(p for p in [phrasing.default_place, *phrasing.grid()] if p not in named)
    places = [place or next(free) for place in named]
    if len(set(places)) != len(places):  # two objects in one place
        raise _Unsure
    return places


def _centre(place: str) -> tuple[float, float]:
    words = place.split()
    row = next((ROW_INDEX[w] for w in words if w in ROW_INDEX), GRID // 2)
    column = next((COLUMN_INDEX[w] for w in words if w in COLUMN_INDEX), GRID // 2)
    return (column + 0.5) / GRID, (row + 0.5) / GRID


def read_scene(prompt: str, phrasing: Phrasing) -> tuple[Part, ...] | None:
    """The prompt's objects in the model's phrasing, or None when the reader cannot be sure what it
    describes."""
    tokens = words_of(prompt, phrasing)
    if NEGATIONS.intersection(tokens):
        return None
    try:
        objects, grounds = _objects(tokens, phrasing)
        if any(len(o.colors) != 1 or len(o.sizes) > 1 for o in objects):
            raise _Unsure
        colors = {c for o in objects for c in o.colors}
        background = _background(grounds, colors, phrasing)
        places = _places([o.place() for o in objects], phrasing)
    except _Unsure:
        return None
    return tuple(
        Part(
            phrasing.write(o.shapes[0], next(iter(o.colors)), place, background, next(iter(o.sizes), None)),
            _centre(place),
        )
        for o, place in zip(objects, places, strict=True)
    )


def said(parts: tuple[Part, ...]) -> str:
    """What the model was given, in one line (``details["read_as"]``)."""
    return "; ".join(part.prompt for part in parts)


def read(prompt: str, phrasing: Phrasing) -> str | None:
    """The prompt in the model's phrasing, or None when the reader cannot be sure what it describes."""
    parts = read_scene(prompt, phrasing)
    return None if parts is None else said(parts)


def read_prompt(weights: Path, prompt: str) -> tuple[Part, ...] | None:
    """``prompt``'s objects in the phrasing of the model at ``weights``; None when it declares none or the
    prompt cannot be read with certainty (the model then gets the prompt as sent)."""
    phrasing = phrasing_of(weights)
    return None if phrasing is None else read_scene(prompt, phrasing)
