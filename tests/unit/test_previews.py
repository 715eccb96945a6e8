"""Live previews: the tiny FLUX pipeline's latents decoded between steps, and the worker writing them to the
job's row (a real SQLite store) at most as often as it is told, never failing a job for one."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.job import JobStatus
from fluxserve.core.notes import PREVIEW, preview_of
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.preview import PREVIEW_SIDE, latent_grid
from fluxserve.engines.tiny import build_tiny_flux
from fluxserve.surfaces.reseller import render_job
from fluxserve.surfaces.vendor import render_result
from tests.support.engine_fixtures import request
from tests.unit import test_worker_inprocess
from tests.unit.test_worker_inprocess import Scripted, World, run_one

world = test_worker_inprocess.world
blobs = test_worker_inprocess.blobs


class Links:
    def result_url(self, key: str | None) -> str | None:
        return None if key is None else f"https://files.example/{key}"

    def queue_position(self, job_id: str) -> int | None:
        return None


def jpeg(data_uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert data_uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_uri.removeprefix(prefix))))
    assert image.format == "JPEG"
    return image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny")


def test_the_latent_grid_follows_the_aspect_whatever_the_snapped_size() -> None:
    assert latent_grid(16 * 24, 384, 256) == (16, 24)
    assert latent_grid(16 * 24, 256, 384) == (24, 16)
    assert latent_grid(64, 128, 128) == (8, 8)
    assert latent_grid(7, 100, 100) == (1, 7)  # a prime: one row (no better factor pair)


@pytest.mark.parametrize(("width", "height"), [(128, 64), (1024, 512)])
def test_the_tiny_pipeline_offers_a_small_preview_each_step(tiny: Path, width: int, height: int) -> None:
    engine = DiffusersFluxEngine(tiny, ModelEntry(weights=str(tiny), max_pixels=1024 * 512))
    offered: list[tuple[float, Image.Image]] = []
    hooks = EngineHooks(preview=lambda fraction, draw: offered.append((fraction, draw())))
    result = engine.generate(request("flux-dev", width=width, height=height, steps=3), hooks)
    assert [fraction for fraction, _ in offered] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for _, image in offered:
        assert image.mode == "RGB" and max(image.size) <= PREVIEW_SIDE
        assert image.width == 2 * image.height  # the generation's aspect
    assert result.image.size == (width, height)


def test_previews_are_never_decoded_unless_asked(tiny: Path) -> None:
    """The engine hands over a function: nothing is decoded when the worker does not call it (off)."""
    engine = DiffusersFluxEngine(tiny, ModelEntry(weights=str(tiny)))
    offered: list[Callable[[], Image.Image]] = []
    engine.generate(
        request("flux-dev", steps=2), EngineHooks(preview=lambda fraction, draw: offered.append(draw))
    )
    assert len(offered) == 2  # offered each step, drawn by nobody


def painting(
    during: Callable[[], None] | None = None, draw: Callable[[], Image.Image] | None = None
) -> Scripted:
    """An engine that offers a preview at each of 4 steps and calls ``during`` after the second."""

    def behave(engine_request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        for step in range(1, 5):
            hooks.step(step / 4, draw or (lambda: Image.new("RGB", (64, 32), (200, 30, 30))))
            if step == 2 and during is not None:
                during()
        image = Image.new("RGB", (engine_request.width, engine_request.height), (10, 200, 30))
        return EngineResult(image=image, prompt=engine_request.prompt, seed=engine_request.seed)

    return Scripted(behave)


def test_the_worker_writes_a_preview_to_the_running_job_and_drops_it_at_the_end(world: World) -> None:
    job = world.submit(world.key("10"))
    seen: dict[str, Any] = {}

    def look() -> None:
        running = world.stores.submissions.get(job.id)
        assert running is not None
        seen["job"] = running

    done = run_one(world, world.worker(painting(look), previews_every=0.0))
    running = seen["job"]
    preview = preview_of(running.details)
    assert preview is not None and preview["progress"] == 0.5 and running.progress == 0.5
    assert jpeg(preview["image"]).size == (64, 32)
    assert render_job(running, Links())["data"]["previewUrl"] == preview["image"]
    assert render_result(running, running.id, Links()).preview == {
        "sample": preview["image"],
        "progress": 0.5,
    }
    assert done.status is JobStatus.SUCCEEDED and PREVIEW not in done.details
    assert "previewUrl" not in render_job(done, Links())["data"]


def test_previews_are_written_at_most_every_interval_and_not_at_all_when_off(world: World) -> None:
    drawn: list[int] = []

    def draw() -> Image.Image:
        drawn.append(1)
        return Image.new("RGB", (8, 8))

    world.submit(world.key("10"))
    run_one(world, world.worker(painting(draw=draw), previews_every=3600.0))
    assert len(drawn) == 1  # the first step's, then none within the hour
    world.submit(world.key("10"))
    run_one(world, world.worker(painting(draw=draw)))  # previews off (the default)
    assert len(drawn) == 1


def test_a_slow_preview_waits_twenty_times_its_drawing_before_the_next(world: World) -> None:
    """Where decoding is slow (full-size FLUX on a CPU), previews keep to about 1/20 of the job's time."""
    drawn: list[float] = []

    def slow() -> Image.Image:
        drawn.append(time.monotonic())
        time.sleep(0.05)  # the next is due a second later: the 4 steps are done by then
        return Image.new("RGB", (8, 8))

    world.submit(world.key("10"))
    run_one(world, world.worker(painting(draw=slow), previews_every=0.0))
    assert len(drawn) == 1


def test_a_preview_that_fails_does_not_fail_the_job_and_a_failed_job_keeps_no_preview(world: World) -> None:
    def broken() -> Image.Image:
        raise RuntimeError("decoder fell over")

    world.submit(world.key("10"))
    done = run_one(world, world.worker(painting(draw=broken), previews_every=0.0))
    assert done.status is JobStatus.SUCCEEDED

    def crash() -> None:
        raise ValueError("engine broke after a preview")

    world.submit(world.key("10"))
    failed = run_one(world, world.worker(painting(crash), previews_every=0.0))
    assert failed.status is JobStatus.FAILED and PREVIEW not in failed.details


def test_a_fill_preview_shows_the_whole_canvas(tiny: Path) -> None:
    """The stand-in fill (FLUX.1 weights) offers the text-to-image previews of the canvas it paints."""
    from fluxserve.engines.standin import StandInEngine

    engine = StandInEngine(DiffusersFluxEngine(tiny, ModelEntry(weights=str(tiny))))
    image, mask = Image.new("RGB", (64, 64), (0, 0, 255)), Image.new("L", (64, 64), 255)
    fill = request(
        "flux-pro-1.0-fill", steps=2, images=[NamedImage("image", image), NamedImage("mask", mask)]
    )
    offered: list[Image.Image] = []
    engine.generate(fill, EngineHooks(preview=lambda fraction, draw: offered.append(draw())))
    assert len(offered) == 2 and offered[0].size == (64, 64)


@pytest.mark.parametrize("route", ["kontext", "img2img"])
def test_kontext_and_img2img_previews_show_the_generation_not_the_reference(tiny: Path, route: str) -> None:
    engine = DiffusersFluxEngine(tiny, ModelEntry(weights=str(tiny)))
    reference = Image.new("RGB", (64, 32), (0, 0, 255))
    if route == "kontext":
        edit = request("flux-kontext-pro", width=128, height=64, steps=2, images=[reference])
    else:
        edit = request("flux-dev", width=128, height=64, steps=4, image_prompt=reference)
    offered: list[Image.Image] = []
    result = engine.generate(edit, EngineHooks(preview=lambda fraction, draw: offered.append(draw())))
    assert result.details["pipeline"] == route
    assert offered and all(image.size == (128, 64) for image in offered)
