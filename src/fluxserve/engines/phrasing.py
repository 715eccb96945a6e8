"""Prompts rewritten into a closed-vocabulary model's own phrasing before it reads them.

The bundled model is small: it draws a described scene reliably only when the words come in an order it was
trained on ("a small red star at the top on a blue background"), and it confuses the object's colour with the
background's in others ("on a blue background, a small red star at the top"). Its scenes have a handful of
attributes, so the server reads a prompt into them (one shape with its colour and size, a place on a 3x3
grid, a background) and hands the model the same scene in its own phrasing. A model folder declares that
phrasing in ``phrasing.json`` (written by ``training/export.py`` from the tables its captions came from);
folders without one (real FLUX weights) get prompts exactly as sent.

A prompt the reader cannot take apart with certainty is left as sent: no shape or several, no colour or
several for the object, two sizes, two rows or two columns, a negation. Words outside the model's vocabulary
are skipped here and reported by :mod:`fluxserve.engines.vocabulary`.
"""

from __future__ import annotations

import re
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
    tokens = [phrasing.synonyms.get(t, t) for t in _TOKEN.findall(prompt.lower())]
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


def read(prompt: str, phrasing: Phrasing) -> str | None:
    """The prompt in the model's phrasing, or None when the reader cannot be sure what it describes."""
    tokens = words_of(prompt, phrasing)
    if NEGATIONS.intersection(tokens):
        return None
    shapes = {t for t in tokens if t in phrasing.shapes}
    sizes = {phrasing.sizes[t] for t in tokens if t in phrasing.sizes}
    rows = {ROWS[t] for t in tokens if t in ROWS}
    columns = {COLUMNS[t] for t in tokens if t in COLUMNS}
    colors = [(t, _is_background(tokens, i, phrasing)) for i, t in enumerate(tokens) if t in phrasing.colors]
    objects = {c for c, ground in colors if not ground}
    grounds = {c for c, ground in colors if ground}
    if len(shapes) != 1 or len(objects) != 1 or len(grounds) > 1 or len(sizes) > 1:
        return None
    if len(rows) > 1 or len(columns) > 1:
        return None
    (shape,), (color,) = shapes, objects
    if grounds:
        (background,) = grounds
    elif color == phrasing.default_background:
        background = phrasing.background_behind_default
    else:
        background = phrasing.default_background
    if background == color:
        return None
    place = " ".join([*rows, *columns]) or phrasing.default_place
    return phrasing.write(shape, color, place, background, sizes.pop() if sizes else None)


def read_prompt(weights: Path, prompt: str) -> str | None:
    """``prompt`` in the phrasing of the model at ``weights``; None when it declares none or the prompt
    cannot be read with certainty (the model then gets the prompt as sent)."""
    phrasing = phrasing_of(weights)
    return None if phrasing is None else read(prompt, phrasing)
