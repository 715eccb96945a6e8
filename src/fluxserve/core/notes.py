"""What an engine tells the user about their job, shown in both dialects' results.

A job's ``details`` are mostly for operators (pipeline, batch, engine state); these keys are for the user
and are the only ones the fetch JSON and ``get_result`` show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOTE = "note"  # a sentence for the user
# A running job's live preview, while it has one: {"image": "data:image/jpeg;base64,...", "progress": p},
# written by its worker (worker/runner.py) and shown only while the job runs (surfaces/, api/events.py).
PREVIEW = "preview"
UNKNOWN_WORDS = "unknown_words"  # prompt words the model does not know
READ_AS = "read_as"  # the prompt as a closed-vocabulary model was given it (engines/phrasing.py)
PUBLIC = (NOTE, UNKNOWN_WORDS, READ_AS)


def public_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a job's details its user sees."""
    return {name: details[name] for name in PUBLIC if name in details}


def preview_of(details: Mapping[str, Any]) -> dict[str, Any] | None:
    """A job's live preview (``{"image": <data URI>, "progress": p}``), or None when it has none."""
    preview = details.get(PREVIEW)
    return preview if isinstance(preview, dict) and isinstance(preview.get("image"), str) else None
