"""The reader that rewrites prompts into the bundled model's phrasing (engines/phrasing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fluxserve.engines.phrasing import (
    PHRASING_FILE,
    Phrasing,
    phrasing_of,
    read,
    read_prompt,
    read_scene,
)
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


@pytest.mark.parametrize(
    ("prompt", "read_as"),
    [
        (
            "a red circle on the left and a blue square on the right",
            "a red circle on the left on a white background; "
            "a blue square on the right on a white background",
        ),
        # places before their objects, the background in a clause of its own
        (
            "at the top left a tiny green star, on the right a pink heart, on a black background",
            "a small green star in the top left corner on a black background; "
            "a pink heart on the right on a black background",
        ),
        (
            "blue background with a big yellow circle at the bottom and a red square at the top",
            "a large yellow circle at the bottom on a blue background; "
            "a red square at the top on a blue background",
        ),
        # a place said apart from its object: to the object before it, else the one after
        (
            "on the left, a red circle, and on the right, a blue square",
            "a red circle on the left on a white background; "
            "a blue square on the right on a white background",
        ),
        # no places named: spread along the middle row; a white object puts the scene on black
        (
            "a red circle, a white square and a blue triangle",
            "a red circle on the left on a black background; "
            "a white square in the center on a black background; "
            "a blue triangle on the right on a black background",
        ),
        # side by side: "next to", "beside", "to the left of" / "to the right of"
        (
            "a red circle next to a blue square",
            "a red circle on the left on a white background; "
            "a blue square on the right on a white background",
        ),
        (
            "a small yellow star beside a pink heart, on a black background",
            "a small yellow star on the left on a black background; "
            "a pink heart on the right on a black background",
        ),
        (
            "a green triangle to the right of an orange circle",
            "a green triangle on the right on a white background; "
            "a orange circle on the left on a white background",
        ),
        # one above the other: the top and bottom rows ("above" is read before it becomes the model's "at")
        (
            "a red circle above a blue square",
            "a red circle at the top on a white background; "
            "a blue square at the bottom on a white background",
        ),
        (
            "a green star on top of a purple heart, on a black background",
            "a green star at the top on a black background; "
            "a purple heart at the bottom on a black background",
        ),
        (
            "a yellow heart underneath a small pink circle on the right",
            "a yellow heart at the bottom on a white background; "
            "a small pink circle in the top right corner on a white background",
        ),
        # "the top of" is a place, not a join
        (
            "a red circle at the top of the picture and a blue square",
            "a red circle at the top on a white background; "
            "a blue square in the center on a white background",
        ),
        # one place named: the other takes the default place
        (
            "a red star at the top and a green heart",
            "a red star at the top on a white background; a green heart in the center on a white background",
        ),
    ],
)
def test_scenes_of_several_objects_read_as_one_prompt_per_object(
    shipped: Phrasing, prompt: str, read_as: str
) -> None:
    assert read(prompt, shipped) == read_as


def test_each_object_of_a_scene_keeps_the_centre_of_its_place(shipped: Phrasing) -> None:
    parts = read_scene("a red circle in the top left corner and a blue square at the bottom", shipped)
    assert parts is not None
    assert [part.centre for part in parts] == [(1 / 6, 1 / 6), (0.5, 5 / 6)]
    one = read_scene("a red circle", shipped)
    assert one is not None and [part.centre for part in one] == [(0.5, 0.5)]


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle and a blue square on the left and a green star on the right and a pink heart",  # four
        "a red circle inside a blue square",  # two shapes in one clause: whose words are whose
        "a red circle at the bottom above a blue square",  # above, yet at the bottom
        "a red circle above a blue square above a green star",  # the square in two rows
        "a red circle to the left of a blue square on the left",  # the square: left, and right of the circle
        "a red circle on the left and a blue square on the left",  # one place for two objects
        "a red circle at the top and a square at the bottom",  # an object with no colour
        "a red circle, and a blue square, on a green background, on a pink background",  # two backgrounds
        "a red circle, a blue square, on a red background",  # an object the colour of the background
        "a white circle and a black square",  # no default background is free
        "a red circle at the top left at the bottom, and a blue square",  # two rows for one object
        "a red circle and a blue square, purple",  # a colour with no object
    ],
)
def test_scenes_the_reader_cannot_be_sure_of_are_left_as_sent(shipped: Phrasing, prompt: str) -> None:
    assert read(prompt, shipped) is None


def test_words_the_model_does_not_know_are_left_out(shipped: Phrasing) -> None:
    assert read("a cinematic photo of a red star, 4k, trending", shipped) == (
        "a red star in the center on a white background"
    )


def test_a_long_hostile_prompt_is_read_in_one_pass(shipped: Phrasing) -> None:
    """Every colour of a long prompt looks around itself; that look stops at the nearest words."""
    padded = "red " + "a " * 20_000 + "on " * 20_000 + "star"
    assert read(padded, shipped) == "a red star in the center on a white background"
    assert read("red circle " + ", and " * 20_000 + "blue star", shipped) == (
        "a red circle on the left on a white background; a blue star on the right on a white background"
    )
    assert read("blue " * 5_000 + "star", shipped) == "a blue star in the center on a white background"


def test_a_folder_without_a_phrasing_gets_prompts_as_sent(tmp_path: Path) -> None:
    assert read_prompt(tmp_path, "a red star on a blue background") is None


def test_a_phrasing_without_every_place_is_refused(tmp_path: Path) -> None:
    data = json.loads((BUNDLED_WEIGHTS / PHRASING_FILE).read_text())
    del data["places"]["top left"]
    (tmp_path / PHRASING_FILE).write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="places lacks \\['top left'\\]"):
        phrasing_of(tmp_path)
