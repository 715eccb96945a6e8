"""A real ``fluxserve serve`` whose catalog mixes engines: flux-kontext-max relayed to a fake vendor on
loopback, flux-dev local. Jobs go in through both dialects and come out of our own storage."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Api, ServerProcess, catalog_env, png_base64
from tests.support.fake_vendor import FAKE_KEY, FakeVendor, _color

KEY_ENV = "FLUXSERVE_TEST_UPSTREAM_KEY"


RELAYED = ("flux-kontext-max", "flux-tools/erase-v1", "flux-2-klein-9b-preview", "flux-pro-finetuned")


def catalog(base_url: str) -> str:
    return "".join(
        f"""
[models."{model}"]
engine = "relay"

[models."{model}".options]
base_url = "{base_url}"
api_key_env = "{KEY_ENV}"
poll_interval = 0.05
poll_max_interval = 0.2
retry_wait = 0.05
not_found_grace = 0.5
"""
        for model in RELAYED
    )


@pytest.fixture(scope="module")
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(result_ttl=1.0) as fake:
        yield fake


@pytest.fixture(scope="module")
def relay_server(
    vendor: FakeVendor, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("relay")
    catalog_file = data_dir.parent / f"{data_dir.name}-catalog.toml"
    catalog_file.write_text(catalog(vendor.base_url))
    env = {**catalog_env(catalog_file), KEY_ENV: FAKE_KEY}
    server = ServerProcess(data_dir, models_dir, env)
    server.start()
    yield server
    server.stop()
    assert FAKE_KEY not in server.log_path.read_text()  # the upstream key is never logged


@pytest.fixture(scope="module")
def key(relay_server: ServerProcess) -> str:
    return relay_server.create_key("relay-e2e", credits="200")["key"]


class Vendor:
    """Our server's vendor dialect."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"x-key": key}, timeout=30)

    def submit(self, model: str, body: dict[str, Any]) -> str:
        response = self.http.post(f"/v1/{model}", json=body)
        assert response.status_code == 200, response.text
        return response.json()["polling_url"]

    def wait(self, polling_url: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.http.get(polling_url).json()
            if body["status"] != "Pending":
                return body
            time.sleep(0.05)
        raise AssertionError(f"{polling_url} still Pending")

    def credits(self) -> float:
        return self.http.get("/v1/credits").json()["credits"]


def eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def image_at(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_relayed_and_local_models_in_one_catalog(
    relay_server: ServerProcess, key: str, vendor: FakeVendor
) -> None:
    client = Vendor(relay_server.base_url, key)
    polling_url = client.submit(
        "flux-kontext-max",
        {
            "prompt": "turn it into a watercolour",
            "input_image": png_base64((320, 240)),
            "seed": 21,
            "safety_tolerance": 6,
        },
    )
    body = client.wait(polling_url)
    assert body["status"] == "Ready", body

    # Forwarded upstream with the operator's key and every parameter (tolerance capped: an input image).
    model, payload, headers = vendor.seen.submits[-1]
    assert model == "flux-kontext-max" and headers["x-key"] == FAKE_KEY
    assert (payload["prompt"], payload["seed"], payload["safety_tolerance"]) == (
        "turn it into a watercolour",
        21,
        2,
    )
    with Image.open(io.BytesIO(base64.b64decode(payload["input_image"]))) as sent:
        assert sent.size == (320, 240)

    # The image is the vendor's, served from our storage: it outlives the vendor's expiring URL.
    ours = image_at(body["result"]["sample"])
    assert (ours.format, ours.size) == ("PNG", (1184, 880))  # the vendor's size for a 4:3 input
    assert ours.getpixel((0, 0)) == _color(21)
    upstream_id = next(reversed(vendor.tasks))
    eventually(lambda: httpx.get(vendor.sample_url(upstream_id)).status_code == 403)
    assert image_at(body["result"]["sample"]).tobytes() == ours.tobytes()

    # Same job in the reseller dialect.
    job_id = polling_url.rsplit("=", 1)[1]
    fetched = Api(relay_server.base_url, key).fetch(job_id)
    assert (
        fetched["status"] == "SUCCESS" and fetched["data"]["quota"] == "8" and fetched["data"]["seed"] == "21"
    )

    # The vendor's upsampled prompt and the seed it drew are what both dialects report.
    polling_url = client.submit(
        "flux-kontext-max", {"prompt": "a quiet harbour", "prompt_upsampling": True, "aspect_ratio": "1:1"}
    )
    body = client.wait(polling_url)
    assert body["result"]["prompt"] == "upsampled: a quiet harbour"
    upstream_seed = vendor.tasks[next(reversed(vendor.tasks))].seed
    assert body["result"]["seed"] == upstream_seed
    fetched = Api(relay_server.base_url, key).fetch(polling_url.rsplit("=", 1)[1])
    assert fetched["data"]["prompt"] == "upsampled: a quiet harbour"
    assert fetched["data"]["seed"] == str(upstream_seed)

    # flux-dev stays local: the vendor never hears of it.
    submits = len(vendor.seen.submits)
    local = client.wait(
        client.submit("flux-dev", {"prompt": "local", "width": 256, "height": 256, "steps": 1})
    )
    assert local["status"] == "Ready", local
    assert image_at(local["result"]["sample"]).size == (256, 256)
    assert len(vendor.seen.submits) == submits


def test_upstream_moderation_is_moderation_here_and_not_charged(
    relay_server: ServerProcess, key: str
) -> None:
    client = Vendor(relay_server.base_url, key)
    before = client.credits()
    body = client.wait(client.submit("flux-kontext-max", {"prompt": "[content-moderated] something"}))
    assert body["status"] == "Content Moderated", body
    assert body["details"] == {"Moderation Reasons": ["NSFW"]}
    job_id = body["id"]
    fetched = Api(relay_server.base_url, key).fetch(job_id)
    assert fetched["status"] == "FAILED" and fetched["message"].startswith("Content Moderated")
    assert fetched["data"]["quota"] == "0"
    assert client.credits() == before


def test_upstream_failures_end_the_job_with_their_reason(
    relay_server: ServerProcess, key: str, vendor: FakeVendor
) -> None:
    client = Vendor(relay_server.base_url, key)
    error = client.wait(client.submit("flux-kontext-max", {"prompt": "[error] x"}))
    assert error["status"] == "Error" and "GPU fell over" in error["details"]["error"]
    lost = client.wait(client.submit("flux-kontext-max", {"prompt": "[lost] x"}))
    assert lost["status"] == "Error" and "Task not found" in lost["details"]["error"]
    credits, vendor.credits = vendor.credits, vendor.credits * 0
    try:
        broke = client.wait(client.submit("flux-kontext-max", {"prompt": "x"}))
    finally:
        vendor.credits = credits
    assert broke["status"] == "Error" and "402" in broke["details"]["error"]
    assert "operator" in broke["details"]["error"] and FAKE_KEY not in broke["details"]["error"]


def test_upstream_429_keeps_the_job_running_until_the_vendor_takes_it(
    relay_server: ServerProcess, key: str, vendor: FakeVendor
) -> None:
    vendor.rate_limited, vendor.retry_after = 4, 0.3
    api = Api(relay_server.base_url, key)
    job_id = api.job("flux-kontext-max", {"prompt": "busy upstream"})
    eventually(lambda: vendor.rate_limited < 3)
    assert api.fetch(job_id)["status"] == "ON_QUEUE"
    assert api.wait(job_id, timeout=30)["status"] == "SUCCESS"
    assert vendor.rate_limited == 0


def test_cancel_stops_polling_upstream(relay_server: ServerProcess, key: str, vendor: FakeVendor) -> None:
    vendor.pending_polls = 1_000_000
    try:
        api = Api(relay_server.base_url, key)
        job_id = api.job("flux-kontext-max", {"prompt": "never ready"})
        eventually(
            lambda: any(task.polls >= 2 for task in vendor.tasks.values() if task.prompt == "never ready")
        )
        assert api.http.post("/flux/cancel", json={"jobId": job_id}).status_code == 200
        body = api.wait(job_id, timeout=30)
        # The worker records the cancel only once the engine's call has returned (the relay polls in that
        # call, on the worker's thread): from here no poll can come.
        assert body["status"] == "FAILED" and "Canceled" in body["message"]
        task = next(task for task in vendor.tasks.values() if task.prompt == "never ready")
        polls = task.polls
        vendor.pending_polls = 2
        assert api.wait(api.job("flux-kontext-max", {"prompt": "after"}), timeout=30)["status"] == "SUCCESS"
        assert task.polls == polls  # nor did one come while the worker ran a whole job after it
    finally:
        vendor.pending_polls = 2


def test_erase_and_webp_are_relayed_and_the_vendors_statuses_come_back(
    relay_server: ServerProcess, key: str, vendor: FakeVendor
) -> None:
    client = Vendor(relay_server.base_url, key)
    image, mask = png_base64((48, 32)), png_base64((48, 32), (255, 255, 255))
    erased = client.wait(
        client.submit("flux-tools/erase-v1", {"image": image, "mask": mask, "dilate_pixels": 3})
    )
    assert erased["status"] == "Ready", erased
    model, payload, _ = vendor.seen.submits[-1]
    assert model == "flux-tools/erase-v1" and payload["dilate_pixels"] == 3 and "prompt" not in payload
    assert image_at(erased["result"]["sample"]).size == (48, 32)
    webp = client.wait(
        client.submit("flux-2-klein-9b-preview", {"prompt": "a boat", "output_format": "webp"})
    )
    assert webp["status"] == "Ready", webp
    assert vendor.seen.submits[-1][1]["output_format"] == "webp"
    assert image_at(webp["result"]["sample"]).format == "WEBP"
    moderated = client.wait(client.submit("flux-2-klein-9b-preview", {"prompt": "[request-moderated] x"}))
    assert moderated["status"] == "Request Moderated"  # the vendor's statuses come back as they are


def test_a_relayed_finetuned_route_leaves_the_finetune_to_the_vendor(
    relay_server: ServerProcess, key: str, vendor: FakeVendor
) -> None:
    """The vendor's finetunes live on the vendor: a relayed finetuned route forwards ``finetune_id`` and
    ``finetune_strength`` (its default, 1.1) without looking the id up here."""
    client = Vendor(relay_server.base_url, key)
    done = client.wait(
        client.submit("flux-pro-finetuned", {"prompt": "a lighthouse", "finetune_id": "ft-on-vendor"})
    )
    assert done["status"] == "Ready", done
    model, payload, _ = vendor.seen.submits[-1]
    assert (model, payload["finetune_id"], payload["finetune_strength"]) == (
        "flux-pro-finetuned",
        "ft-on-vendor",
        1.1,
    )
    missing = client.http.post("/v1/flux-pro-finetuned", json={"prompt": "a lighthouse"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "finetune_id"]
