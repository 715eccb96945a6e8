"""The vendor dialect on a real ``fluxserve serve`` process: submit, poll the absolute polling_url,
download the sample; the same jobs through the reseller dialect."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from fluxserve.core.sizes import ultra_size
from tests.conftest import Api, ServerProcess


class VendorClient:
    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"x-key": key}, timeout=30)

    def submit(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(f"/v1/{model}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, polling_url: str, timeout: float = 120) -> dict[str, Any]:
        """Poll the URL exactly as the submit returned it, as the vendor's clients do."""
        deadline = time.monotonic() + timeout
        seen: list[float] = []
        while time.monotonic() < deadline:
            body = self.http.get(polling_url).json()
            if body["status"] != "Pending":
                body["seen_progress"] = seen
                return body
            seen.append(body["progress"])
            time.sleep(0.05)
        raise AssertionError(f"{polling_url} still Pending")


def download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)  # signed URL: no key needed
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.create_key("vendor-dialect")["key"]


def test_vendor_job_end_to_end_with_the_vendors_defaults(server: ServerProcess, key: str) -> None:
    client = VendorClient(server.base_url, key)
    task = client.submit("flux-dev", {"prompt": "a small red star", "steps": 2, "seed": 4})
    assert task["polling_url"].startswith(f"{server.base_url}/v1/get_result?id=")
    body = client.wait(task["polling_url"])
    assert body["status"] == "Ready", body
    assert all(0 <= value <= 1 for value in body["seen_progress"])
    result = body["result"]
    assert (result["prompt"], result["seed"]) == ("a small red star", 4)
    image = download(result["sample"])
    assert (image.format, image.size) == ("JPEG", (1024, 768))  # the vendor's defaults, not the reseller's


def test_ultra_defaults_to_16_9_jpeg(server: ServerProcess, key: str) -> None:
    client = VendorClient(server.base_url, key)
    body = client.wait(client.submit("flux-pro-1.1-ultra", {"prompt": "wide"})["polling_url"])
    assert body["status"] == "Ready", body
    image = download(body["result"]["sample"])
    assert (image.format, image.size) == ("JPEG", ultra_size(16 / 9))


def test_a_job_is_fetchable_in_the_other_dialect(server: ServerProcess, key: str) -> None:
    vendor, reseller = VendorClient(server.base_url, key), Api(server.base_url, key)
    task = vendor.submit("flux-pro-1.1", {"prompt": "from the vendor side", "width": 256, "height": 256})
    fetched = reseller.wait(task["id"])
    assert fetched["status"] == "SUCCESS", fetched
    assert fetched["data"]["size"] == "256x256" and fetched["data"]["quota"] == "4"
    assert reseller.image(fetched).format == "JPEG"
    job_id = reseller.job(
        "flux-dev", {"prompt": "from the reseller side", "width": 256, "height": 256, "steps": 1}
    )
    body = vendor.wait(f"{server.base_url}/v1/get_result?id={job_id}")
    assert body["status"] == "Ready" and body["result"]["prompt"] == "from the reseller side"
    assert download(body["result"]["sample"]).format == "PNG"  # the reseller's default
