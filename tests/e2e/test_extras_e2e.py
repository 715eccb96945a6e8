"""Real ``fluxserve serve`` processes on the tiny pipeline: live previews while a job runs, WebP output,
flux-schnell in the reseller's own format, every mode of ``/flux/generate`` and ``/flux/edits``, and the
vendor's erase tool."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest
from PIL import Image

from tests.conftest import Api, ServerProcess, catalog_env, png_base64
from tests.e2e.test_vendor_server import VendorClient

# The reseller's documented modes (its /flux/generate reference and its own-format page, whose /flux/edits
# lists flux1-schnell too).
GENERATE_MODES = [
    "flux1-dev", "flux1-schnell", "flux1-pro", "flux-kontext-pro", "flux-kontext-max",
    "flux-2-pro", "flux-2-flex", "flux-2-max",
]  # fmt: skip
EDITS_MODES = [*GENERATE_MODES, "flux-2-klein-4b", "flux-2-klein-9b"]


def details_of(server: ServerProcess, job_id: str) -> dict[str, Any]:
    """What the engine recorded about a job (its operator details: steps, pipeline...)."""
    with sqlite3.connect(server.data_dir / "fluxserve.db") as conn:
        (details,) = conn.execute("SELECT details FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return dict(json.loads(details))


def fetched(server: ServerProcess, url: str) -> tuple[str, Image.Image]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response.headers["content-type"], image


def jpeg(data_uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert data_uri.startswith(prefix), data_uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_uri.removeprefix(prefix))))
    image.load()
    assert image.format == "JPEG"
    return image


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return str(server.create_key("extras", credits="1000")["key"])


def test_webp_output_is_really_webp_on_the_reseller_and_on_the_route_the_vendor_lists_it(
    server: ServerProcess, key: str
) -> None:
    api = Api(server.base_url, key)
    done = api.wait(api.job("flux-dev", {"prompt": "a cat", "output_format": "webp", "steps": "2"}))
    assert done["status"] == "SUCCESS", done
    content_type, image = fetched(server, done["data"]["imageUrl"])
    assert (content_type, image.format, image.size) == ("image/webp", "WEBP", (1024, 768))
    vendor = VendorClient(server.base_url, key)
    task = vendor.submit("flux-2-klein-9b-preview", {"prompt": "a cat", "output_format": "webp"})
    ready = vendor.wait(task["polling_url"])
    assert ready["status"] == "Ready", ready
    content_type, image = fetched(server, ready["result"]["sample"])
    assert (content_type, image.format) == ("image/webp", "WEBP")
    refused = vendor.http.post("/v1/flux-2-klein-4b", json={"prompt": "x", "output_format": "webp"})
    assert refused.status_code == 422 and "webp only on the routes" in refused.text


def test_schnell_runs_its_four_steps_from_generate_and_edits(server: ServerProcess, key: str) -> None:
    api = Api(server.base_url, key)
    made = api.http.post("/flux/generate", json={"prompt": "a fox", "mode": "flux1-schnell"})
    assert made.status_code == 200, made.text
    job_id = made.json()["data"]["jobId"]
    done = api.wait(job_id)
    assert done["status"] == "SUCCESS" and done["data"]["mode"] == "flux-schnell", done
    assert details_of(server, job_id)["steps"] == 4  # the catalog's: schnell's route has no steps field
    upload = {"image": ("in.png", base64.b64decode(png_base64((64, 64))), "image/png")}
    edited = api.http.post("/flux/edits", data={"prompt": "night", "mode": "flux1-schnell"}, files=upload)
    assert edited.status_code == 200, edited.text
    edit_id = edited.json()["data"]["jobId"]
    assert api.wait(edit_id)["status"] == "SUCCESS"
    assert details_of(server, edit_id)["pipeline"] == "img2img"  # the upload is its image prompt
    assert api.submit("flux-schnell", {"prompt": "x"}).status_code == 404  # no route of its own


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_every_generate_mode_the_reseller_lists_makes_an_image(
    server: ServerProcess, key: str, mode: str
) -> None:
    api = Api(server.base_url, key)
    made = api.http.post(
        "/flux/generate", json={"prompt": "a red circle", "mode": mode, "aspect_ratio": "1:1"}
    )
    assert made.status_code == 200, made.text
    assert api.wait(made.json()["data"]["jobId"])["status"] == "SUCCESS"


@pytest.mark.parametrize("mode", EDITS_MODES)
def test_every_edits_mode_the_reseller_lists_edits_an_upload(
    server: ServerProcess, key: str, mode: str
) -> None:
    api = Api(server.base_url, key)
    upload = {"image": ("in.png", base64.b64decode(png_base64((64, 64))), "image/png")}
    made = api.http.post("/flux/edits", data={"prompt": "make it blue", "mode": mode}, files=upload)
    assert made.status_code == 200, made.text
    assert api.wait(made.json()["data"]["jobId"])["status"] == "SUCCESS"


def test_erase_repaints_only_the_dilated_mask(server: ServerProcess, key: str) -> None:
    source = Image.new("RGB", (96, 64), (200, 30, 30))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 24, 50, 34))  # a 10x10 square
    encode = {}
    for name, image in (("image", source), ("mask", mask)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encode[name] = base64.b64encode(buffer.getvalue()).decode()
    vendor = VendorClient(server.base_url, key)
    task = vendor.submit("flux-tools/erase-v1", {**encode, "dilate_pixels": 6})
    ready = vendor.wait(task["polling_url"])
    assert ready["status"] == "Ready", ready
    _, erased = fetched(server, ready["result"]["sample"])
    assert erased.size == (96, 64)
    grown = (34, 18, 56, 40)  # the square and 6 pixels around it
    outside = Image.new("L", (96, 64), 255)
    outside.paste(0, grown)
    changed = Image.composite(erased.convert("RGB"), source, outside)
    assert changed.tobytes() == source.tobytes()  # every pixel outside the grown mask is the input's
    ring = [(x, y) for x in range(34, 56) for y in range(18, 40) if not (40 <= x < 50 and 24 <= y < 34)]
    assert any(erased.getpixel(point) != (200, 30, 30) for point in ring)  # the dilation was painted too
    assert sum(erased.getpixel((x, y)) != (200, 30, 30) for x in range(40, 50) for y in range(24, 34)) > 50


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """Previews on, after every step; flux-dev at up to 512x512 on the tiny pipeline, so that a job of 50
    steps runs for seconds."""
    data_dir = tmp_path_factory.mktemp("previews")
    catalog = data_dir.parent / f"{data_dir.name}-catalog.toml"
    catalog.write_text('[models."flux-dev"]\nmax_pixels = 262144\n')
    env = {**catalog_env(catalog), "FLUXSERVE_PREVIEWS": "true", "FLUXSERVE_PREVIEWS_INTERVAL_SECONDS": "0"}
    server = ServerProcess(data_dir, models_dir, env)
    server.start()
    yield server
    server.stop()


def test_a_running_job_shows_live_previews_in_the_stream_fetch_and_get_result(
    preview_server: ServerProcess,
) -> None:
    key = str(preview_server.create_key("previews", credits="100")["key"])
    api = Api(preview_server.base_url, key)
    job_id = api.job("flux-dev", {"prompt": "a cat", "width": 512, "height": 512, "steps": 50})
    previews: list[dict[str, Any]] = []
    kinds: list[str] = []
    running: dict[str, Any] = {}
    vendor: dict[str, Any] = {}
    with httpx.Client(base_url=preview_server.base_url, timeout=120) as client:
        headers = {"TT-API-KEY": key}
        with httpx_sse.connect_sse(
            client, "GET", "/flux/events", params={"jobId": job_id}, headers=headers
        ) as s:
            for event in s.iter_sse():
                if not event.data:
                    continue
                kinds.append(event.event)
                if event.event == "preview":
                    previews.append(event.json())
                    if len(previews) == 1:  # while it runs: fetch and get_result show one too
                        running = api.fetch(job_id)
                        answer = client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key})
                        vendor = answer.json()
    assert kinds[-1] == "result" and previews, kinds
    for preview in previews:
        image = jpeg(preview["image"])
        assert image.size == (256, 256) and 0 < preview["progress"] <= 1
    assert [p["progress"] for p in previews] == sorted(p["progress"] for p in previews)
    if running["status"] == "ON_QUEUE":  # not finished between the event and the fetch
        jpeg(running["data"]["previewUrl"])
        jpeg(vendor["preview"]["sample"])
    done = api.fetch(job_id)
    assert done["status"] == "SUCCESS" and "previewUrl" not in done["data"]
    assert "preview" not in details_of(preview_server, job_id)
