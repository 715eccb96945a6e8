"""One request path for both dialects: image field names survive to errors and the relay, and each
dialect renders its own jobs, webhooks included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Api, ServerProcess, catalog_env, png_base64
from tests.e2e.test_relay_e2e import KEY_ENV, catalog
from tests.e2e.test_webhooks_e2e import Receiver
from tests.support.fake_vendor import FAKE_KEY, FakeVendor

RED, BLUE = png_base64((64, 48), (200, 30, 30)), png_base64((32, 32), (20, 30, 200))


@pytest.fixture(scope="module")
def relayed(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[ServerProcess, FakeVendor]]:
    with FakeVendor() as vendor:
        data_dir = tmp_path_factory.mktemp("dialects")
        catalog_file = data_dir.parent / f"{data_dir.name}-catalog.toml"
        catalog_file.write_text(catalog(vendor.base_url))
        server = ServerProcess(data_dir, models_dir, {**catalog_env(catalog_file), KEY_ENV: FAKE_KEY})
        server.start()
        yield server, vendor
        server.stop()


def _vendor_submit(server: ServerProcess, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/flux-kontext-max", json=body, headers={"x-key": key}, timeout=30)


@pytest.mark.parametrize("dialect", ["reseller", "vendor"])
def test_input_image_and_input_image_3_keep_their_names_to_the_relay(
    relayed: tuple[ServerProcess, FakeVendor], dialect: str
) -> None:
    server, vendor = relayed
    key = server.create_key(f"names-{dialect}")["key"]
    body = {"prompt": f"two references ({dialect})", "input_image": RED, "input_image_3": BLUE, "seed": 4}
    submits = len(vendor.seen.submits)
    if dialect == "reseller":
        client = Api(server.base_url, key)
        assert client.wait(client.job("flux-kontext-max", body))["status"] == "SUCCESS"
    else:
        response = _vendor_submit(server, key, body)
        assert response.status_code == 200, response.text
        polling = httpx.get(response.json()["polling_url"], headers={"x-key": key}, timeout=30)
        Api(server.base_url, key).wait(polling.json()["id"])
    sent = [payload for _, payload, _ in vendor.seen.submits[submits:]]
    assert len(sent) == 1
    assert {"input_image", "input_image_3"} <= set(sent[0]) and "input_image_2" not in sent[0]


@pytest.mark.parametrize("dialect", ["reseller", "vendor"])
def test_errors_name_the_third_image_field(relayed: tuple[ServerProcess, FakeVendor], dialect: str) -> None:
    server, _ = relayed
    key = server.create_key(f"errors-{dialect}")["key"]
    body = {"prompt": "bad third", "input_image": RED, "input_image_3": "bm90IGFuIGltYWdl"}  # "not an image"
    if dialect == "reseller":
        response = Api(server.base_url, key).submit("flux-kontext-max", body)
        assert response.status_code == 400
        assert response.json()["message"].startswith("input_image_3: ")
    else:
        response = _vendor_submit(server, key, body)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "input_image_3"]
    # A URL that cannot be fetched fails the job with the field's name, not "input_image_2".
    body["input_image_3"] = f"{server.base_url}/files/nothing-here.png"
    client = Api(server.base_url, key)
    if dialect == "reseller":
        job_id = client.job("flux-kontext-max", body)
    else:
        job_id = _vendor_submit(server, key, body).json()["id"]
    failed = client.wait(job_id)
    assert failed["status"] == "FAILED" and failed["message"].startswith("input_image_3: "), failed


def test_vendor_dialect_webhooks_carry_the_vendor_result(server: ServerProcess) -> None:
    receiver = Receiver()
    try:
        key = server.create_key("vendor-hook")["key"]
        body = {"prompt": "hooked", "width": 256, "height": 256, "steps": 1, "webhook_url": receiver.url}
        response = httpx.post(f"{server.base_url}/v1/flux-dev", json=body, headers={"x-key": key}, timeout=30)
        assert response.status_code == 200, response.text
        task = response.json()["id"]
        receiver.wait(1, timeout=120)
        delivered = json.loads(receiver.requests[0][1])
        polled = httpx.get(
            f"{server.base_url}/v1/get_result", params={"id": task}, headers={"x-key": key}
        ).json()
        assert delivered["id"] == task and delivered["status"] == "Ready"
        assert set(delivered) == set(polled) and delivered["result"]["seed"] == polled["result"]["seed"]
        assert "data" not in delivered  # not the reseller's envelope
        assert httpx.get(delivered["result"]["sample"], timeout=30).status_code == 200
    finally:
        receiver.close()
