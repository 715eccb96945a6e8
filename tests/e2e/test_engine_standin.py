"""FLUX.1 weights standing in for the FLUX.2, fill and expand routes (engines/standin.py), on the tiny
FLUX.1 pipeline: references reach the image, fill changes only the masked pixels, expand keeps the image in
place and paints the margins; and the registry hands these routes the stand-in for FLUX.1 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxserve.core.catalog import load_catalog
from fluxserve.engines.base import NamedImage
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.registry import EngineRegistry
from fluxserve.engines.standin import StandInEngine
from fluxserve.errors import EngineError
from tests.conftest import TINY_CATALOG
from tests.support.engine_fixtures import Recorder, entry, gradient, request, solid, tiny_weights


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> StandInEngine:
    flux = FluxModel(tiny_weights(models_dir))
    return StandInEngine(DiffusersFluxEngine(flux.weights, entry(steps=2), flux))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_flux2_references_change_the_output(engine: StandInEngine) -> None:
    plain = engine.generate(request("flux-2-pro", width=64, height=48), Recorder().hooks)
    assert plain.image.size == (64, 48) and plain.details["stand_in"] == "flux-pro-1.1"
    refs = [solid("red", (32, 32)), gradient((48, 32))]
    one = engine.generate(request("flux-2-klein-4b", width=64, height=48, images=refs), Recorder().hooks)
    assert one.details["stand_in"] == "flux-kontext-pro" and one.details["references"] == 2
    other = engine.generate(
        request("flux-2-klein-4b", width=64, height=48, images=[refs[0], solid("blue", (48, 32))]),
        Recorder().hooks,
    )
    assert np.abs(pixels(one.image) - pixels(other.image)).sum() > 0
    eight = [solid(color, (16, 16)) for color in ("red", "blue", "green", "white") * 2]
    many = engine.generate(request("flux-2-pro", width=64, height=64, images=eight), Recorder().hooks)
    assert many.details["references"] == 8


def test_fill_repaints_only_the_masked_area(engine: StandInEngine) -> None:
    source = gradient((64, 48))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    fields = {"width": 64, "height": 48, "images": [NamedImage("image", source), NamedImage("mask", mask)]}
    result = engine.generate(request("flux-pro-1.0-fill", **fields), Recorder().hooks)
    out, kept = pixels(result.image), np.asarray(mask) == 0
    assert result.image.size == (64, 48) and result.details["kept"] == "unmasked"
    assert (out[kept] == pixels(source)[kept]).all()
    assert np.abs(out[~kept] - pixels(source)[~kept]).mean() > 10


def test_fill_follows_the_alpha_channel_and_refuses_a_bad_mask(engine: StandInEngine) -> None:
    source = gradient((32, 32)).convert("RGBA")
    source.putalpha(Image.new("L", (32, 32), 255))
    opaque = request("flux-pro-1.0-fill", width=32, height=32, images=[NamedImage("image", source)])
    with pytest.raises(EngineError, match="mask: is required unless image has transparent areas"):
        engine.generate(opaque, Recorder().hooks)
    alpha = Image.new("L", (32, 32), 255)
    alpha.paste(0, (0, 0, 16, 32))  # the left half transparent: repaint it
    source.putalpha(alpha)
    result = engine.generate(
        request("flux-pro-1.0-fill", width=32, height=32, images=[NamedImage("image", source)]),
        Recorder().hooks,
    )
    assert (pixels(result.image)[:, 16:] == pixels(source)[:, 16:]).all()
    wrong = [NamedImage("image", gradient((32, 32))), NamedImage("mask", Image.new("L", (16, 16), 255))]
    with pytest.raises(EngineError, match=r"mask: must be the size of image \(32x32\), not 16x16"):
        engine.generate(request("flux-pro-1.0-fill", width=32, height=32, images=wrong), Recorder().hooks)


def test_expand_keeps_the_image_in_place_and_paints_the_margins(engine: StandInEngine) -> None:
    source = gradient((48, 32))
    fields = {
        "width": 48 + 16,
        "height": 32 + 8,
        "left": 16,
        "top": 8,
        "images": [NamedImage("image", source)],
    }
    result = engine.generate(request("flux-pro-1.0-expand", **fields), Recorder().hooks)
    out = pixels(result.image)
    assert result.image.size == (64, 40)
    assert (out[8:40, 16:64] == pixels(source)).all()
    assert out[:8].std() > 0 or out[:, :16].std() > 0  # the margins are painted, not left blank


def test_the_registry_serves_the_new_routes_on_flux1_weights_with_the_stand_in(models_dir: Path) -> None:
    registry = EngineRegistry(load_catalog([TINY_CATALOG]), models_dir)
    for model in ("flux-2-pro", "flux-2-klein-9b", "flux-pro-1.0-fill", "flux-pro-1.0-expand"):
        assert isinstance(registry.get(model), StandInEngine)
    assert isinstance(registry.get("flux-dev"), DiffusersFluxEngine)
