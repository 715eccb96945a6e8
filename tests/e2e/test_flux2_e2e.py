"""FLUX.2, fill and expand through a real server with workers (the tiny FLUX.1 pipeline standing in): the
vendor's official Python client (``blackforest``, unmodified, in its own virtualenv) runs fill and expand
as it ships and a FLUX.2 route through its model registry; the images come back at the vendor's sizes with
the kept pixels unchanged, the credits charged are the published prices, and a task's ``webhook_secret``
signs its delivery to a real receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Api, ServerProcess, http_server
from tests.e2e.test_vendor_blackforest import blackforest_python, fetch

# The client's own generate() and polling; FLUX.2 is added to its model registry (a dict it exposes per
# client) with the vendor's FLUX.2 fields, since blackforest 0.1.3 predates FLUX.2.
CLIENT_SCRIPT = r"""
import json, sys
from typing import Optional
from pydantic import BaseModel
from blackforest import BFLClient
from blackforest.types.general.client_config import ClientConfig

class Flux2Inputs(BaseModel):
    prompt: str
    input_image: Optional[str] = None
    input_image_2: Optional[str] = None
    input_image_3: Optional[str] = None
    input_image_4: Optional[str] = None
    input_image_5: Optional[str] = None
    input_image_6: Optional[str] = None
    input_image_7: Optional[str] = None
    input_image_8: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    output_format: Optional[str] = None

base_url, key, inputs_path = sys.argv[1:4]
inputs = json.load(open(inputs_path))
client = BFLClient(api_key=key, base_url=base_url)
client.model_input_registry = {**client.model_input_registry, "flux-2-pro": Flux2Inputs}
config = ClientConfig(sync=True, polling_interval=0.1, max_retries=1200)
results = {name: client.generate(model, body, config).result for name, (model, body) in inputs.items()}
print("RESULT " + json.dumps(results))
"""


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient(size: tuple[int, int]) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    return Image.fromarray(np.stack([*np.meshgrid(x, y), np.full((size[1], size[0]), 90, np.uint8)], -1))


def test_official_client_runs_fill_expand_and_flux2(server: ServerProcess, tmp_path: Path) -> None:
    python = blackforest_python()
    key = server.create_key(credits="100")["key"]
    source = gradient((256, 256))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    refs = {
        ("input_image" if i == 1 else f"input_image_{i}"): b64(Image.new("RGB", (320, 240), (i * 25, 0, 0)))
        for i in range(1, 9)
    }
    inputs = {
        "fill": ["flux-pro-1.0-fill", {"image": b64(source), "mask": b64(mask), "prompt": "a red square",
                                       "seed": 3, "steps": 15, "output_format": "png"}],
        "expand": ["flux-pro-1.0-expand", {"image": b64(source), "top": 32, "left": 16, "seed": 4,
                                           "steps": 15, "output_format": "png"}],
        "flux2": ["flux-2-pro", {"prompt": "the eight of them", "seed": 5, "output_format": "png", **refs}],
    }  # fmt: skip
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    run = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT, server.base_url, key, str(tmp_path / "inputs.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])

    filled = fetch(results["fill"]["sample"])
    kept = np.asarray(mask) == 0
    assert filled.size == (256, 256) and (pixels(filled)[kept] == pixels(source)[kept]).all()
    assert np.abs(pixels(filled)[~kept] - pixels(source)[~kept]).mean() > 5
    expanded = fetch(results["expand"]["sample"])
    assert expanded.size == (272, 288) and (pixels(expanded)[32:, 16:] == pixels(source)).all()
    flux2 = fetch(results["flux2"]["sample"])
    assert flux2.size == (320, 240) and results["flux2"]["seed"] == 5  # the first reference's size
    credits = httpx.get(f"{server.base_url}/v1/credits", headers={"x-key": key}).json()["credits"]
    assert credits == 100 - 5 - 5 - 3  # fill, expand, FLUX.2 [pro] under one megapixel with its inputs


class Hooks:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.arrived = threading.Event()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hooks.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
                hooks.arrived.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        return Handler


@pytest.fixture
def hooks() -> Iterator[tuple[Hooks, str]]:
    receiver = Hooks()
    with http_server(receiver.handler()) as origin:
        yield receiver, origin


def test_flux2_jobs_in_both_dialects_and_a_signed_webhook(api: Api, hooks: tuple[Hooks, str]) -> None:
    receiver, origin = hooks
    reference = b64(gradient((200, 120)))
    vendor = httpx.post(
        f"{api.base_url}/v1/flux-2-klein-4b",
        json={
            "prompt": "x",
            "input_image": reference,
            "webhook_url": f"{origin}/h",
            "webhook_secret": "s3cret",
        },
        headers={"x-key": api.key},
    )
    assert vendor.status_code == 200, vendor.text
    assert {"cost", "input_mp", "output_mp"} <= set(vendor.json())
    flex = api.wait(api.job("flux-2-flex", {"prompt": "y", "width": 256, "height": 320, "steps": "3"}))
    assert flex["status"] == "SUCCESS", flex
    assert api.image(flex).size == (256, 320) and flex["data"]["quota"] == "5"
    assert receiver.arrived.wait(60), "no webhook"
    body, headers = receiver.received[0]
    assert json.loads(body)["status"] == "Ready" and json.loads(body)["id"] == vendor.json()["id"]
    assert headers["x-webhook-secret"] == "s3cret"
    assert headers["x-bfl-signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    result = httpx.get(
        f"{api.base_url}/v1/get_result", params={"id": vendor.json()["id"]}, headers={"x-key": api.key}
    )
    assert fetch(result.json()["result"]["sample"]).size == (192, 112)  # 200x120 down to steps of 16
