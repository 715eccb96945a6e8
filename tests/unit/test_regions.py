"""Scenes of several objects: each drawn alone and joined by place (engines/flux/regions.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.regions import join, nearest_centre
from fluxserve.engines.phrasing import PHRASING_FILE
from fluxserve.engines.registry import BUNDLED_WEIGHTS
from fluxserve.engines.vocabulary import known_words
from fluxserve.errors import JobCanceled
from tests.support.engine_fixtures import Recorder, entry, request, tiny_weights

LEFT, RIGHT, TOP_LEFT = (1 / 6, 0.5), (5 / 6, 0.5), (1 / 6, 1 / 6)


def test_every_patch_belongs_to_the_nearest_object() -> None:
    weights = nearest_centre([LEFT, RIGHT], tokens=64, width=128, height=128)
    assert weights.shape == (2, 64, 1)
    grid = weights[0, :, 0].reshape(8, 8)
    assert grid[:, :4].eq(1).all() and grid[:, 4:].eq(0).all()  # the left half is the left object's
    assert weights.sum(0).eq(1).all()  # one owner each
    # a wide generation: 4 rows of 12 patches, the places' centres as fractions of each side
    wide = nearest_centre([TOP_LEFT, RIGHT], tokens=48, width=192, height=64)[0, :, 0].reshape(4, 12)
    assert wide[0, 0] == 1 and wide[0, 6] == 1 and wide[:, 9:].eq(0).all()  # nearest, not the half


def test_joined_latents_take_each_patch_from_its_object_on_every_row() -> None:
    rows = torch.stack([torch.full((64, 4), 1.0), torch.full((64, 4), 2.0), torch.full((64, 4), 3.0)])
    joined = join(rows, [LEFT, (0.5, 0.5), RIGHT], 128, 128)
    assert joined.shape == rows.shape and torch.equal(joined[0], joined[2])
    grid = joined[0, :, 0].reshape(8, 8)
    assert grid[4, 0] == 1 and grid[4, 4] == 2 and grid[4, 7] == 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersFluxEngine:
    """The tiny model with the bundled model's phrasing, so that its prompts are read as the bundled
    model's are."""
    weights = tiny_weights(tmp_path_factory.mktemp("models"))
    shutil.copy(BUNDLED_WEIGHTS / PHRASING_FILE, weights / PHRASING_FILE)
    return DiffusersFluxEngine(weights, entry(steps=3, options={"true_cfg_scale": 2.0}))


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def bundled() -> DiffusersFluxEngine:
    """The bundled model as the shipped catalog runs it, at its native size."""
    return DiffusersFluxEngine(
        BUNDLED_WEIGHTS, entry(steps=20, options={"true_cfg_scale": 4.0, "native_size": 128})
    )


def test_a_scene_of_two_objects_is_each_objects_drawing_on_its_side(bundled: DiffusersFluxEngine) -> None:
    engine = bundled
    scene = request(
        "flux-dev",
        prompt="a red circle on the left and a blue square on the right",
        seed=5,
        width=128,
        height=128,
    )
    plan = engine.plan(scene)
    assert len(plan.parts) == 2 and plan.details["objects"] == 2
    assert engine.batch_key(plan) is None  # one batch row per object: it runs alone
    recorder = Recorder()
    joined = pixels(engine.generate(scene, recorder.hooks).image)
    assert len(recorder.fractions) == 20
    left, right = (
        pixels(
            engine.generate(
                request("flux-dev", prompt=part.prompt, seed=5, width=128, height=128), Recorder().hooks
            ).image
        )
        for part in plan.parts
    )
    assert not np.array_equal(left, right)
    # away from the seam, each side is its object's own drawing, not the other's
    for mine, other, side in ((left, right, np.s_[:, :48]), (right, left, np.s_[:, 80:])):
        assert np.abs(joined[side] - mine[side]).mean() < 0.2 * np.abs(joined[side] - other[side]).mean()


def test_a_canceled_scene_stops(engine: DiffusersFluxEngine) -> None:
    scene = request("flux-dev", prompt="a red circle at the top and a blue square at the bottom")
    recorder = Recorder(cancel_after=1)
    with pytest.raises(JobCanceled):
        engine.generate(scene, recorder.hooks)
    assert recorder.fractions == [1 / 3]


def test_the_joining_words_are_not_reported_unknown(engine: DiffusersFluxEngine) -> None:
    """ "and", "next to" and "beside" joined objects the reader understood; in a prompt it could not read,
    nobody did."""
    vocabulary = engine.model.weights / "vocabulary.txt"
    vocabulary.write_text("a\nred\nblue\ncircle\nsquare\non\nthe\nleft\nright\n")
    known_words.cache_clear()
    try:
        read = engine.plan(
            request("flux-dev", prompt="a red circle on the left and a blue square, cinematic")
        )
        assert read.details["unknown_words"] == ["cinematic"]
        beside = engine.plan(
            request("flux-dev", prompt="a red circle next to a blue square beside a red square")
        )
        assert beside.details["objects"] == 3 and "unknown_words" not in beside.details
        unread = engine.plan(
            request("flux-dev", prompt="a red circle and a blue square and a red circle and a blue square")
        )
        assert "read_as" not in unread.details and unread.details["unknown_words"] == ["and"]
    finally:
        vocabulary.unlink()
        known_words.cache_clear()
