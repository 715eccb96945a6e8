"""The reseller's own format, in process: ``POST /flux/generate`` (JSON) and ``POST /flux/edits``
(multipart), resolved through the model table into ordinary reseller jobs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxserve.api.deps import Services
from fluxserve.api.reseller_native import MODES
from fluxserve.app import create_app
from fluxserve.core.job import JobRecord
from fluxserve.settings import Settings
from tests.conftest import png_base64


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    return base64.b64decode(png_base64(size))


class Native:
    def __init__(self, client: TestClient, services: Services) -> None:
        self.client = client
        self.services = services
        self.headers = {"TT-API-KEY": services.keys.create("native", Decimal(1000)).key}

    def generate(self, body: dict[str, Any]) -> Any:
        return self.client.post("/flux/generate", json=body, headers=self.headers)

    def edits(self, fields: dict[str, str], images: list[bytes]) -> Any:
        files = [("image", (f"{index}.png", data, "image/png")) for index, data in enumerate(images)]
        return self.client.post("/flux/edits", data=fields, files=files, headers=self.headers)

    def job(self, response: Any) -> JobRecord:
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["jobId"] == data["job_id"]
        job = self.services.jobs.get(data["jobId"])
        assert job is not None
        return job


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Native]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("native"), workers=0))
    with TestClient(app) as client:
        yield Native(client, app.state.services)


@pytest.mark.parametrize(
    ("body", "model", "size"),
    [
        ({"prompt": "a cat", "mode": "flux1-dev"}, "flux-dev", (1024, 1024)),  # default 1:1
        ({"prompt": "a cat", "model": "flux1-dev", "size": "1024x1792"}, "flux-dev", (768, 1344)),
        ({"prompt": "a cat", "mode": "flux1-pro", "aspect_ratio": "21:9"}, "flux-pro", (1440, 608)),
        (
            {"prompt": "a cat", "mode": "flux-kontext-pro", "aspect_ratio": "16:9"},
            "flux-kontext-pro",
            (1392, 752),
        ),
        (
            {"prompt": "a cat", "mode": "flux-pro-1.1-ultra", "aspect_ratio": "1:1"},
            "flux-pro-1.1-ultra",
            (2048, 2048),
        ),
    ],
)
def test_generate_resolves_mode_and_size_through_the_table(
    native: Native, body: dict[str, Any], model: str, size: tuple[int, int]
) -> None:
    job = native.job(native.generate({**body, "unknown": "ignored"}))
    assert (job.model, job.width, job.height) == (model, *size)
    fetched = native.client.get("/flux/fetch", params={"jobId": job.id}, headers=native.headers).json()
    assert fetched["data"]["mode"] == model and fetched["status"] == "PENDING_QUEUE"


def test_every_mode_of_the_reseller_is_served() -> None:
    """Every mode the reseller documents for /flux/generate and /flux/edits (flux1-schnell included)."""
    documented = ["flux1-dev", "flux1-schnell", "flux1-pro", "flux-kontext-pro", "flux-kontext-max"]
    documented += ["flux-2-pro"]
    documented += ["flux-2-flex", "flux-2-max", "flux-2-klein-4b", "flux-2-klein-9b"]
    assert set(documented) <= set(MODES)


def test_generate_hook_url_becomes_the_webhook(native: Native) -> None:
    job = native.job(
        native.generate({"prompt": "x", "mode": "flux-2-pro", "hookUrl": "https://hooks.example.com/done"})
    )
    assert job.webhook_url == "https://hooks.example.com/done"
    assert job.model == "flux-2-pro"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"prompt": "a cat", "mode": "flux1-turbo"},
            "mode: 'flux1-turbo' is not a model this server has",
        ),
        ({"prompt": "a cat"}, "mode: is required"),
        ({"mode": "flux1-dev"}, "prompt: is required"),
        ({"prompt": "  ", "mode": "flux1-dev"}, "prompt: must be a non-empty string"),
        ({"prompt": "x", "mode": "flux1-dev", "hookUrl": "ftp://x"}, "hookUrl: must be an http(s) URL"),
        ({"prompt": "x", "mode": "flux1-dev", "aspect_ratio": "30:1"}, "aspect_ratio: must be 'W:H'"),
        ({"prompt": "x", "mode": "flux1-dev", "size": "512x512"}, "size: "),
    ],
)
def test_generate_refusals_name_the_request_field(
    native: Native, body: dict[str, Any], expected: str
) -> None:
    response = native.generate(body)
    assert response.status_code == 400, response.text
    envelope = response.json()
    assert envelope["status"] == "FAILED" and envelope["data"] is None
    assert expected in envelope["message"], envelope["message"]


def test_edits_puts_each_upload_in_a_reference_slot(native: Native) -> None:
    job = native.job(
        native.edits({"prompt": "make it blue", "mode": "flux-kontext-pro"}, [_png(), _png((32, 32))])
    )
    assert [image["field"] for image in job.params["input_images"]] == ["input_image", "input_image_2"]
    assert (job.width, job.height) == (1184, 880)  # the first image's 4:3, snapped to Kontext's sizes
    stored = native.services.blobs.get(job.params["input_images"][1]["ref"].removeprefix("blob:"))
    assert Image.open(io.BytesIO(stored)).size == (32, 32)


def test_edits_on_a_flux1_model_is_an_image_prompt(native: Native) -> None:
    job = native.job(
        native.edits({"prompt": "like this", "mode": "flux1-dev", "aspect_ratio": "1:1"}, [_png()])
    )
    assert job.params["image_prompt"].startswith("blob:") and (job.width, job.height) == (1024, 1024)


@pytest.mark.parametrize(
    ("fields", "images", "expected"),
    [
        ({"prompt": "x", "mode": "flux1-dev"}, [_png(), _png()], "image: flux1-dev takes at most 1 image(s)"),
        ({"prompt": "x", "mode": "flux1-dev"}, [b"not an image"], "image: not a decodable image"),
        ({"prompt": "x", "mode": "flux1-dev"}, [], "image: is required"),
        ({"prompt": "x", "mode": "nope"}, [_png()], "mode: 'nope' is not a model this server has"),
        ({"mode": "flux-kontext-pro"}, [_png()], "prompt: is required"),
    ],
)
def test_edits_refusals_name_the_request_field(
    native: Native, fields: dict[str, str], images: list[bytes], expected: str
) -> None:
    response = native.edits(fields, images)
    assert response.status_code == 400, response.text
    assert expected in response.json()["message"], response.json()["message"]


def test_native_routes_need_the_key(native: Native) -> None:
    response = native.client.post("/flux/generate", json={"prompt": "x", "mode": "flux1-dev"})
    assert response.status_code == 401
    assert response.json()["message"].startswith("TT-API-KEY")


def test_an_idempotency_key_makes_one_job(native: Native) -> None:
    body = {"prompt": "once", "mode": "flux1-dev"}
    headers = {**native.headers, "Idempotency-Key": "native-once"}
    first = native.client.post("/flux/generate", json=body, headers=headers)
    again = native.client.post("/flux/generate", json=body, headers=headers)
    assert native.job(first).id == native.job(again).id
    other = native.client.post("/flux/generate", json={**body, "prompt": "twice"}, headers=headers)
    assert other.status_code == 422 and other.json()["message"].startswith("Idempotency-Key: ")
