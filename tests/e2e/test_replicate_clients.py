"""Replicate's predictions API, driven by the real ``replicate`` Python package pointed at a fluxserve on
loopback (``base_url``): ``run`` with images back, a Kontext edit whose local file the client uploads
through ``/v1/files``, an async prediction with ``wait()``, a cancel, signed webhooks, listing, and each
refusal in Replicate's own shape."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError
from replicate.pagination import paginate
from standardwebhooks import Webhook

from tests.conftest import ServerProcess, http_server, png_base64

DEV = "black-forest-labs/flux-dev"


def _client(server: ServerProcess, key: str) -> replicate.Client:
    return replicate.Client(api_token=key, base_url=server.base_url, timeout=120)


def _bytes(output: Any) -> bytes:
    """An output's file: a FileOutput (https and data URLs) reads itself; over plain http the client
    hands back the URL, which is fetched here."""
    return output.read() if hasattr(output, "read") else httpx.get(str(output), timeout=30).content


def _credits(server: ServerProcess, key: str) -> float:
    """The key's balance, as the vendor surface's /v1/credits reads it."""
    return float(
        httpx.get(f"{server.base_url}/v1/credits", headers={"x-key": key}, timeout=30).json()["credits"]
    )


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> dict[str, Any]:
    return server.create_key("replicate", "1000")


@pytest.fixture(scope="module")
def client(server: ServerProcess, key: dict[str, Any]) -> replicate.Client:
    return _client(server, key["key"])


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """No workers: predictions stay queued (for cancel and the waits that end unfinished)."""
    process = ServerProcess(tmp_path_factory.mktemp("replicate-idle"), models_dir)
    process.start("--no-workers")
    yield process
    process.stop()


def test_run_flux_dev_returns_num_outputs_images_of_the_aspect_and_megapixels(
    client: replicate.Client, server: ServerProcess, key: dict[str, Any]
) -> None:
    before = _credits(server, key["key"])
    output = client.run(
        DEV,
        input={"prompt": "a red circle", "num_outputs": 2, "num_inference_steps": 2, "aspect_ratio": "16:9",
               "megapixels": "0.25", "seed": 7, "go_fast": False, "not_an_input": 1},
    )  # fmt: skip
    assert isinstance(output, list) and len(output) == 2
    images = [Image.open(io.BytesIO(_bytes(item))) for item in output]
    assert [image.size for image in images] == [(672, 384), (672, 384)]  # 16:9 at 0.25 MP, steps of 32
    assert {image.format for image in images} == {"PNG"}  # webp, the default, is written as PNG
    assert before - _credits(server, key["key"]) == 5.0  # two flux-dev images of 2.5


def test_kontext_edit_uploads_the_local_file_and_follows_its_shape(
    client: replicate.Client, tmp_path: Path
) -> None:
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(source)
    with source.open("rb") as handle:
        output = client.run(
            "black-forest-labs/flux-kontext-pro", input={"prompt": "make it blue", "input_image": handle}
        )
    assert not isinstance(output, list)  # one URL, as the model's output schema says
    assert Image.open(io.BytesIO(_bytes(output))).size == (1184, 880)  # Kontext's size for 4:3
    uploaded = client.files.list()
    assert any(item.name == "photo.png" and item.size == source.stat().st_size for item in uploaded)


def test_async_prediction_by_version_waits_and_reports_the_object(client: replicate.Client) -> None:
    model = client.models.get("black-forest-labs/flux-1.1-pro")
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert schema["Input"]["properties"]["safety_tolerance"]["maximum"] == 6
    assert schema["Output"] == {"title": "Output", "type": "string", "format": "uri"}
    prediction = client.predictions.create(
        version=model.latest_version.id, input={"prompt": "a green square", "aspect_ratio": "custom",
                                                "width": 300, "height": 260}
    )  # fmt: skip
    assert (
        prediction.status in ("starting", "processing")
        and prediction.model == "black-forest-labs/flux-1.1-pro"
    )
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.error is None
    assert Image.open(io.BytesIO(_bytes(prediction.output))).size == (288, 256)  # custom, rounded to 32
    assert prediction.metrics is not None and prediction.metrics["predict_time"] > 0
    assert prediction.urls is not None and prediction.urls["cancel"].endswith(f"/{prediction.id}/cancel")
    assert prediction.input == {
        "prompt": "a green square",
        "aspect_ratio": "custom",
        "width": 300,
        "height": 260,
    }
    assert prediction.started_at is not None and prediction.completed_at is not None


def test_listing_is_the_keys_own_newest_first_with_a_cursor(server: ServerProcess) -> None:
    mine = _client(server, server.create_key(credits="100")["key"])
    made = [
        mine.models.predictions.create(model=DEV, input={"prompt": f"n{index}", "num_inference_steps": 1})
        for index in range(3)
    ]
    listed = [prediction.id for page in paginate(mine.predictions.list) for prediction in page]
    assert listed == [prediction.id for prediction in reversed(made)]
    other = _client(server, server.create_key(credits="100")["key"])
    assert other.predictions.list().results == []


def test_cancel_ends_its_jobs_and_refunds_them(idle: ServerProcess) -> None:
    key = idle.create_key(credits="20")
    client = _client(idle, key["key"])
    prediction = client.models.predictions.create(model=DEV, input={"prompt": "never", "num_outputs": 3})
    assert prediction.status == "starting" and _credits(idle, key["key"]) == 12.5
    prediction.cancel()
    prediction.reload()
    assert prediction.status == "canceled" and prediction.output is None
    assert _credits(idle, key["key"]) == 20


def test_prefer_wait_that_ends_first_answers_starting_so_clients_poll(idle: ServerProcess) -> None:
    key = idle.create_key(credits="20")["key"]
    started = time.monotonic()
    response = httpx.post(
        f"{idle.base_url}/v1/models/{DEV}/predictions",
        headers={"Authorization": f"Token {key}", "Prefer": "wait=1"},
        json={"input": {"prompt": "held"}},
        timeout=30,
    )
    assert response.status_code == 201 and time.monotonic() - started >= 1
    assert response.json()["status"] == "starting" and response.json()["output"] is None


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append(({name.lower(): value for name, value in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhooks_start_and_completed_once_each_signed_with_the_keys_secret(
    client: replicate.Client,
) -> None:
    _Receiver.received = []
    with http_server(_Receiver) as url:
        prediction = client.models.predictions.create(
            model=DEV, input={"prompt": "hook", "num_outputs": 2, "num_inference_steps": 1},
            webhook=f"{url}/hook?customId=1", webhook_events_filter=["start", "completed"],
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while len(_Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # an output webhook, were one wrongly sent, arrives by now
    secret = client.webhooks.default.secret().key
    bodies = [Webhook(secret).verify(body, headers) for headers, body in _Receiver.received]
    assert [body["id"] for body in bodies] == [prediction.id, prediction.id]
    assert len({headers["webhook-id"] for headers, _ in _Receiver.received}) == 2
    assert bodies[-1]["status"] == "succeeded" and len(bodies[-1]["output"]) == 2


def test_default_webhook_sends_each_output_and_the_end(client: replicate.Client) -> None:
    _Receiver.received = []
    with http_server(_Receiver) as url:
        client.models.predictions.create(
            model=DEV, input={"prompt": "hook", "num_outputs": 2, "num_inference_steps": 1}, webhook=url
        )
        deadline = time.monotonic() + 120
        while len(_Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
    assert len(_Receiver.received) == 2  # no start: output for the first image, completed for the last
    assert json.loads(_Receiver.received[-1][1])["status"] == "succeeded"


def _problem(call: Any) -> ReplicateError:
    with pytest.raises(ReplicateError) as caught:
        call()
    return caught.value


def test_refusals_in_replicates_shape(server: ServerProcess, client: replicate.Client) -> None:
    assert _problem(lambda: _client(server, "r8_wrong").models.get(DEV)).status == 401
    refused = _problem(lambda: _client(server, "r8_wrong").models.predictions.create(model=DEV, input={}))
    assert refused.status == 401
    assert _problem(lambda: client.models.get("black-forest-labs/flux-nope")).status == 404
    missing = _problem(
        lambda: client.models.predictions.create(model="someone/flux-dev", input={"prompt": "x"})
    )
    assert missing.status == 404 and "black-forest-labs/flux-dev" in (missing.detail or "")
    assert _problem(lambda: client.predictions.get("nosuchprediction")).status == 404


def test_invalid_input_is_422_naming_each_field(server: ServerProcess, key: dict[str, Any]) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/models/{DEV}/predictions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"input": {"num_outputs": 5, "guidance": 11, "aspect_ratio": "7:5"}},
        timeout=30,
    )
    body = response.json()
    assert response.status_code == 422 and body["status"] == 422 and body["title"]
    fields = {item["field"]: item for item in body["invalid_fields"]}
    assert set(fields) == {"prompt", "num_outputs", "guidance", "aspect_ratio"}
    assert fields["prompt"]["type"] == "required" and "num_outputs" in body["detail"]
    # A range of this server's narrower than Replicate's is refused by the Replicate name too
    narrower = httpx.post(
        f"{server.base_url}/v1/models/{DEV}/predictions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"input": {"prompt": "x", "guidance": 8}},
        timeout=30,
    ).json()
    assert [item["field"] for item in narrower["invalid_fields"]] == ["guidance"]
    assert httpx.post(
        f"{server.base_url}/v1/predictions", headers={"Authorization": f"Bearer {key['key']}"},
        json={"input": {"prompt": "x"}}, timeout=30,
    ).json()["invalid_fields"][0]["field"] == "version"  # fmt: skip


def test_another_keys_prediction_and_file_are_not_found(
    server: ServerProcess, client: replicate.Client
) -> None:
    prediction = client.models.predictions.create(
        model=DEV, input={"prompt": "mine", "num_inference_steps": 1}
    )
    uploaded = client.files.create(io.BytesIO(b"\x89PNG not really"), filename="x.png")
    other = _client(server, server.create_key(credits="100")["key"])
    assert _problem(lambda: other.predictions.get(prediction.id)).status == 404
    assert _problem(lambda: other.predictions.cancel(prediction.id)).status == 404
    assert _problem(lambda: other.files.get(uploaded.id)).status == 404
    using = _problem(
        lambda: other.models.predictions.create(
            model="black-forest-labs/flux-kontext-pro",
            input={"prompt": "x", "input_image": uploaded.urls["get"]},
        )
    )
    assert using.status == 422 and "input_image" in (using.detail or "")
    assert client.files.delete(uploaded.id) and _problem(lambda: client.files.get(uploaded.id)).status == 404


def test_not_enough_credits_for_all_outputs_writes_none(server: ServerProcess) -> None:
    key = server.create_key(credits="3")
    client = _client(server, key["key"])
    refused = _problem(
        lambda: client.models.predictions.create(model=DEV, input={"prompt": "x", "num_outputs": 2})
    )
    assert refused.status == 402 and "2 x flux-dev costs 5" in (refused.detail or "")
    assert client.predictions.list().results == [] and _credits(server, key["key"]) == 3


def test_a_failed_job_fails_the_run(client: replicate.Client, server: ServerProcess) -> None:
    with pytest.raises(ModelError):
        client.run(DEV, input={"prompt": "x", "image": f"{server.base_url}/files/nope.png"})


def test_data_uri_input_and_token_auth(server: ServerProcess, key: dict[str, Any]) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        headers={"Authorization": f"Token {key['key']}", "Prefer": "wait"},
        json={"input": {"prompt": "edit", "input_image": f"data:image/png;base64,{png_base64((48, 64))}"}},
        timeout=120,
    )
    body = response.json()
    assert response.status_code == 201 and body["status"] == "succeeded", body
    assert "not kept" in body["input"]["input_image"]
    assert Image.open(io.BytesIO(httpx.get(body["output"], timeout=30).content)).size == (880, 1184)


def test_stream_sends_each_output_then_done(client: replicate.Client, key: dict[str, Any]) -> None:
    prediction = client.models.predictions.create(
        model=DEV, input={"prompt": "streamed", "num_outputs": 2, "num_inference_steps": 1}
    )
    assert prediction.urls is not None
    events: list[tuple[str, str]] = []
    headers = {"Authorization": f"Bearer {key['key']}"}
    with httpx.stream("GET", prediction.urls["stream"], headers=headers, timeout=120) as response:
        assert response.status_code == 200
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((event, line.removeprefix("data:").strip()))
    assert [name for name, _ in events] == ["output", "output", "done"]
    assert all(httpx.get(url, timeout=30).status_code == 200 for name, url in events if name == "output")


JS = Path(__file__).parent / "js"


def test_the_javascript_client_and_the_ai_sdk_provider(server: ServerProcess) -> None:
    if shutil.which("node") is None or not (JS / "node_modules").is_dir():
        missing = "needs node and `npm ci` in tests/e2e/js (Replicate JS client, AI SDK provider)"
        if os.environ.get("FLUXSERVE_REQUIRE_NODE") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    key = server.create_key(credits="100")["key"]
    done = subprocess.run(
        ["node", str(JS / "replicate_clients.mjs"), server.base_url, key],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = [Image.open(io.BytesIO(httpx.get(url, timeout=30).content)).size for url in result["output"]]
    assert sizes == [(512, 512), (512, 512)]
    (image,) = result["images"]
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (1344, 768)  # 16:9 near 1 MP, by 32s


def test_run_by_owner_name_and_version_reads_the_version(client: replicate.Client) -> None:
    version = client.models.get(DEV).latest_version
    assert version is not None
    output = client.run(f"{DEV}:{version.id}", input={"prompt": "pinned", "num_inference_steps": 1})
    assert isinstance(output, list) and len(output) == 1
    stale = _problem(lambda: client.run(f"{DEV}:{'0' * 64}", input={"prompt": "x"}))
    assert stale.status == 404
