"""The reader that rewrites prompts into the bundled model's phrasing (engines/phrasing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fluxserve.engines.phrasing import PHRASING_FILE, Phrasing, phrasing_of, read, read_prompt
from fluxserve.engines.registry import BUNDLED_WEIGHTS

pytestmark = pytest.mark.skipif(not (BUNDLED_WEIGHTS / PHRASING_FILE).exists(), reason="no bundled weights")


@pytest.fixture(scope="module")
def shipped() -> Phrasing:
    phrasing = phrasing_of(BUNDLED_WEIGHTS)
    assert phrasing is not None
    return phrasing


@pytest.mark.parametrize(
    ("prompt", "read_as"),
    [
        # README's OpenAI example: no background named, so the default one
        ("a small blue heart on the right", "a small blue heart on the right on a white background"),
        # the object's colour said after the background's, which the model alone mixes up
        (
            "On a blue background, a large yellow circle at the top left.",
            "a large yellow circle in the top left corner on a blue background",
        ),
        (
            "the star is red and tiny, top middle; pink background",
            "a small red star at the top on a pink background",
        ),
        (
            "draw a huge green square in the lower-right corner against orange",
            "a large green square in the bottom right corner on a orange background",
        ),
        (
            "background: light blue; a little black heart, bottom",
            "a small black heart at the bottom on a light blue background",
        ),
        (
            "the background is yellow and a big purple star sits at the left",
            "a large purple star on the left on a yellow background",
        ),
        # synonyms, and capitals
        (
            "Crimson dot in the centre against a violet backdrop",
            "a red circle in the center on a purple background",
        ),
        # a white object on the default white background would vanish: black behind it
        ("a white triangle", "a white triangle in the center on a black background"),
    ],
)
def test_prompts_in_other_word_orders_read_as_the_models_phrasing(
    shipped: Phrasing, prompt: str, read_as: str
) -> None:
    assert read(prompt, shipped) == read_as


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle on the left and a blue square on the right",  # two objects: not one the reader names
        "a star on a blue background",  # no colour for the object
        "a red and green star",  # two colours for one object
        "a small large red star",
        "a red star at the top and at the bottom",
        "a star that is not red",
        "a red star on red",  # the object would vanish into its background
        "a purple giraffe in the center",  # no shape the model knows
        "",
    ],
)
def test_what_the_reader_cannot_be_sure_of_is_left_as_sent(shipped: Phrasing, prompt: str) -> None:
    assert read(prompt, shipped) is None


def test_words_the_model_does_not_know_are_left_out(shipped: Phrasing) -> None:
    assert read("a cinematic photo of a red star, 4k, trending", shipped) == (
        "a red star in the center on a white background"
    )


def test_a_long_hostile_prompt_is_read_in_one_pass(shipped: Phrasing) -> None:
    """Every colour of a long prompt looks around itself; that look stops at the nearest words."""
    padded = "red " + "a " * 20_000 + "on " * 20_000 + "star"
    assert read(padded, shipped) == "a red star in the center on a white background"
    assert read("blue " * 5_000 + "star", shipped) == "a blue star in the center on a white background"


def test_a_folder_without_a_phrasing_gets_prompts_as_sent(tmp_path: Path) -> None:
    assert read_prompt(tmp_path, "a red star on a blue background") is None


def test_a_phrasing_without_every_place_is_refused(tmp_path: Path) -> None:
    data = json.loads((BUNDLED_WEIGHTS / PHRASING_FILE).read_text())
    del data["places"]["top left"]
    (tmp_path / PHRASING_FILE).write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="places lacks \\['top left'\\]"):
        phrasing_of(tmp_path)
