"""Prompt words a model does not know, for models with a closed vocabulary.

The bundled model was trained on captions of one shape on a plain background, so it knows some fifty words;
given others it silently draws something else. A model folder that ships a ``vocabulary.txt`` (one word a
line, ``#`` comments) declares such a vocabulary, and a job whose prompt has words outside it gets a note
saying which. Folders without one (real FLUX weights) are never second-guessed.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from fluxserve.core.notes import NOTE, UNKNOWN_WORDS

VOCABULARY_FILE = "vocabulary.txt"
_WORD = re.compile(r"\b[^\W\d_]+\b")  # whole words of letters ("4k" and "v2" are not words)


@cache
def known_words(weights: Path) -> frozenset[str] | None:
    """The words of the model at ``weights`` (lower case), or None when it does not declare them."""
    path = weights / VOCABULARY_FILE
    if not path.is_file():
        return None
    lines = (line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def unknown_words(prompt: str, known: frozenset[str]) -> list[str]:
    """The prompt's words outside ``known``, each once, in prompt order."""
    return list(dict.fromkeys(word for word in _WORD.findall(prompt.lower()) if word not in known))


def vocabulary_note(weights: Path, prompt: str, understood: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Details for a job whose prompt has words the model does not know, other than those ``understood``
    before it (by the reader, engines/phrasing.py); empty otherwise."""
    known = known_words(weights)
    unknown = [] if known is None else unknown_words(prompt, known | understood)
    if not unknown:
        return {}
    listed = ", ".join(repr(word) for word in unknown)
    return {
        UNKNOWN_WORDS: unknown,
        NOTE: f"This model does not know the words {listed} and drew without them; it knows shapes, "
        "colours, places and backgrounds (the README lists its words).",
    }
