"""The Python client and ``fluxserve generate`` against a real ``fluxserve serve`` on loopback (the
session's shared server, tiny models), sync and async, both dialects; and against a small loopback stub
that follows the reseller's spec without an event route, for polling, retries and 5xx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from fluxserve.client import (
    AsyncClient,
    BadRequest,
    Client,
    Event,
    FluxserveError,
    InsufficientCredits,
    InvalidSignature,
    JobFailed,
    NotFound,
    RateLimited,
    Retries,
    ServerError,
    Unauthorized,
    verify_webhook,
)
from fluxserve.client.fluxserve import encode_image
from tests.conftest import ServerProcess, http_server

FAST = Retries(attempts=3, wait=0.01, max_wait=0.05)


def png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> dict[str, Any]:
    return server.create_key("client")


def test_sync_reseller_generate_streams_progress_and_returns_the_image(
    server: ServerProcess, key: dict[str, Any]
) -> None:
    events: list[Event] = []
    with Client(server.base_url, key["key"], retries=FAST) as client:
        made = client.generate(
            "flux-dev", "a red heart", seed=7, width=256, height=256, on_event=events.append
        )
    image = Image.open(io.BytesIO(made.image))
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert (made.seed, made.prompt, made.job.state) == (7, "a red heart", "succeeded")
    kinds = [event.kind for event in events]
    assert kinds[-1] == "result" and set(kinds) <= {"queued", "running", "result"}
    assert all(event.id for event in events)  # they came from the stream, not from polling
    progress = [event.progress for event in events if event.kind == "running"]
    assert progress == sorted(progress)


def test_async_vendor_generate_with_a_reference_image(server: ServerProcess, key: dict[str, Any]) -> None:
    async def run() -> Any:
        async with AsyncClient(server.base_url, key["key"], dialect="vendor", retries=FAST) as client:
            return await client.generate(
                "flux-kontext-pro", "make it blue", images=[Image.new("RGB", (64, 64), "red")], seed=3
            )

    made = asyncio.run(run())
    assert Image.open(io.BytesIO(made.image)).format == "PNG"
    assert (made.seed, made.job.state, made.job.raw["status"]) == (3, "succeeded", "Ready")


def test_reference_images_from_paths_bytes_pil_and_urls(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(png())
    encoded = encode_image(path)
    assert encode_image(str(path)) == encoded == encode_image(png())
    assert base64.b64decode(encode_image(Image.open(path))) == png()
    assert encode_image("https://example.com/a.png") == "https://example.com/a.png"
    with pytest.raises(TypeError, match="reference image"):
        encode_image(3.5)


def test_typed_errors_carry_the_servers_message(server: ServerProcess, key: dict[str, Any]) -> None:
    with Client(server.base_url, key["key"], retries=FAST) as client:
        with pytest.raises(BadRequest) as bad:
            client.submit("flux-dev", "x", width=100)
        assert bad.value.status_code == 400 and bad.value.message.startswith("width:")
        with pytest.raises(NotFound, match="no job"):
            client.fetch("no-such-job")
    with Client(server.base_url, "fs_wrong", retries=FAST) as client, pytest.raises(Unauthorized) as wrong:
        client.submit("flux-dev", "x")
    assert (wrong.value.status_code, wrong.value.message) == (401, "TT-API-KEY is not a valid API key")
    with Client(server.base_url, "fs_wrong", dialect="vendor", retries=FAST) as client:
        with pytest.raises(Unauthorized) as forbidden:
            client.submit("flux-dev", "x")
        assert forbidden.value.status_code == 403 and "x-key" in forbidden.value.message
    poor = server.create_key("poor", credits="0")["key"]
    with Client(server.base_url, poor, dialect="vendor", retries=FAST) as client:
        with pytest.raises(InsufficientCredits, match=r"Insufficient credits: flux-dev costs 2\.5"):
            client.submit("flux-dev", "x")
        with pytest.raises(BadRequest) as invalid:
            client.submit("flux-dev", "x", steps=1000)
        assert invalid.value.status_code == 422 and invalid.value.message.startswith("steps:")
        with pytest.raises(FluxserveError, match="no cancel"):
            client.cancel("any")


def test_cancel_ends_the_job_without_an_image(server: ServerProcess, key: dict[str, Any]) -> None:
    with Client(server.base_url, key["key"], retries=FAST) as client:
        job_id = client.submit("flux-dev", "slow", steps=50, width=256, height=256)
        assert client.cancel(job_id).id == job_id
        job = client.wait(job_id)
    assert (job.id, job.state, job.message, job.image_url) == (
        job_id,
        "failed",
        "Canceled by the client",
        None,
    )


def test_webhook_signature_helper_checks_a_real_delivery(server: ServerProcess) -> None:
    created = server.create_key("hooks")
    deliveries: list[tuple[bytes, dict[str, str]]] = []
    arrived = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            deliveries.append((body, dict(self.headers.items())))
            self.send_response(200)
            self.end_headers()
            arrived.set()

        def log_message(self, *_: object) -> None:
            pass

    with http_server(Receiver) as url, Client(server.base_url, created["key"], retries=FAST) as client:
        job_id = client.submit("flux-dev", "hooked", webhook_url=f"{url}/hook", width=256, height=256)
        assert arrived.wait(60)
    body, headers = deliveries[0]
    payload = verify_webhook(body, headers, created["webhook_secret"])
    assert payload["jobId"] == job_id and payload["status"] == "SUCCESS"
    with pytest.raises(InvalidSignature):
        verify_webhook(body.replace(b"SUCCESS", b"FAILED!"), headers, created["webhook_secret"])
    with pytest.raises(InvalidSignature):
        verify_webhook(body, headers, server.create_key("someone else")["webhook_secret"])


class Stub(BaseHTTPRequestHandler):
    """The reseller's contract without an event route: submit, then fetch (PENDING_QUEUE, ON_QUEUE,
    SUCCESS), and the image. ``script`` lists the status codes to answer first, per path."""

    script: ClassVar[dict[str, list[int]]] = {}
    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []
    fetches = 0
    outcome = "SUCCESS"

    def _answer(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        path = self.path.split("?")[0]
        Stub.seen.append((self.command, path, dict(self.headers.items())))
        if Stub.script.get(path):
            status = Stub.script[path].pop(0)
            self._answer(status, {"status": "FAILED", "message": f"scripted {status}", "data": None})
        elif path == "/bfl/v1/flux-dev":
            self._answer(200, {"status": "SUCCESS", "message": "", "data": {"jobId": "j1"}})
        elif path == "/flux/fetch":
            Stub.fetches += 1
            status = ["PENDING_QUEUE", "ON_QUEUE", Stub.outcome][min(Stub.fetches - 1, 2)]
            host = self.headers["Host"]
            url = f"http://{host}/image.png" if status == "SUCCESS" else None
            data = {"jobId": "j1", "prompt": "p", "seed": "11", "imageUrl": url}
            message = "Content Moderated: nudity" if status == "FAILED" else ""
            self._answer(200, {"status": status, "message": message, "jobId": "j1", "data": data})
        elif path == "/image.png":
            self._answer(200, png((10, 20, 30)), "image/png")
        else:
            self._answer(404, {"detail": "Not Found"})

    do_GET = do_POST = _handle

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    Stub.script, Stub.seen, Stub.fetches, Stub.outcome = {}, [], 0, "SUCCESS"
    with http_server(Stub) as url:
        yield url


def test_polls_without_an_event_route_and_retries_429_and_5xx(stub: str) -> None:
    Stub.script = {"/bfl/v1/flux-dev": [429, 503], "/flux/fetch": [502], "/image.png": [500]}
    events: list[Event] = []
    with Client(stub, "k", retries=FAST, poll_seconds=0.01) as client:
        made = client.generate("flux-dev", "p", on_event=events.append)
    assert (made.seed, made.image) == (11, png((10, 20, 30)))
    assert [event.kind for event in events] == ["queued", "running", "result"]
    submits = [headers for method, path, headers in Stub.seen if path == "/bfl/v1/flux-dev"]
    assert len(submits) == 3 and len({headers["Idempotency-Key"] for headers in submits}) == 1
    assert all(headers["TT-API-KEY"] == "k" for headers in submits)
    image_requests = [headers for _, path, headers in Stub.seen if path == "/image.png"]
    assert len(image_requests) == 2 and all("TT-API-KEY" not in headers for headers in image_requests)


def test_a_stream_refused_for_too_many_open_streams_falls_back_to_polling(stub: str) -> None:
    Stub.script = {"/flux/events": [429]}
    with Client(stub, "k", retries=FAST, poll_seconds=0.01) as client:
        assert client.generate("flux-dev", "p").seed == 11
    assert [path for _, path, _ in Stub.seen].count("/flux/events") == 1


def test_a_job_without_an_image_is_job_failed(stub: str) -> None:
    Stub.outcome = "FAILED"
    with Client(stub, "k", retries=FAST, poll_seconds=0.01) as client, pytest.raises(JobFailed) as failed:
        client.generate("flux-dev", "p")
    assert (failed.value.job.state, failed.value.job.message) == ("moderated", "Content Moderated: nudity")
    assert str(failed.value) == "job j1 moderated: Content Moderated: nudity"


def test_retries_give_up_with_the_typed_error(stub: str) -> None:
    Stub.script = {"/bfl/v1/flux-dev": [429, 429, 429], "/flux/fetch": [500, 500, 500]}

    async def run() -> None:
        async with AsyncClient(stub, "k", retries=FAST) as client:
            with pytest.raises(RateLimited, match="scripted 429"):
                await client.submit("flux-dev", "p")
            with pytest.raises(ServerError) as failed:
                await client.fetch("j1")
            assert failed.value.status_code == 500

    asyncio.run(run())
    assert [path for _, path, _ in Stub.seen] == ["/bfl/v1/flux-dev"] * 3 + ["/flux/fetch"] * 3


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxserve", "generate", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_generate_saves_the_image_and_errors_in_one_line(
    server: ServerProcess, key: dict[str, Any], tmp_path: Path
) -> None:
    reference = tmp_path / "ref.png"
    reference.write_bytes(png())
    out = tmp_path / "heart.png"
    # No --server: the local server from the settings, as `serve` would run it; the key from FLUXSERVE_KEY.
    local = {"FLUXSERVE_HOST": "127.0.0.1", "FLUXSERVE_PORT": str(server.port), "FLUXSERVE_KEY": key["key"]}
    args = ["--model", "flux-kontext-pro", "--seed", "7", "-o", str(out), "--image", str(reference)]
    done = run_cli("a red heart", *args, env=local)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"saved {re.escape(str(out))} \(seed 7, \d+x\d+, 4 credits\)\n", done.stdout)
    assert Image.open(out).format == "PNG"

    refused = run_cli("x", "--server", server.base_url, "--key", "fs_wrong", env={})
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.strip().splitlines()[-1] == "error: TT-API-KEY is not a valid API key"
    unreachable = run_cli("x", "--server", "http://127.0.0.1:9", "--key", "k", env={})
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().startswith("error: cannot reach http://127.0.0.1:9")


def test_cli_generate_reaches_a_vendor_only_model_with_its_size_and_other_fields(
    server: ServerProcess, key: dict[str, Any], tmp_path: Path
) -> None:
    """FLUX.2 klein has no /bfl/v1 route: the CLI asks the vendor's; the cost still shows (FLUX.2 is priced
    by megapixel: 1.4 credits for the first)."""
    out = tmp_path / "klein.jpg"
    args = [
        "-m",
        "flux-2-klein-4b",
        "--width",
        "256",
        "--height",
        "192",
        "-f",
        "output_format=png",
        "-o",
        str(out),
    ]
    done = run_cli("a red circle", *args, "--server", server.base_url, "--key", key["key"], env={})
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"saved {re.escape(str(out))} \(seed \d+, 256x192, 1.4 credits\)\n", done.stdout)
    assert Image.open(out).size == (256, 192) and Image.open(out).format == "PNG"  # the field was sent
    newest = json.loads(server.cli("jobs", "--status", "Ready", "--json", "--limit", "1"))
    assert newest["model"] == "flux-2-klein-4b"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "flux-3"], "unknown model 'flux-3': one of flux-2-pro, flux-2-max,"),
        (["--aspect-ratio", "16:9"], "flux-dev takes no 'aspect_ratio'; its fields: prompt, seed,"),
        (["-f", "stpes=2"], "flux-dev takes no 'stpes'; its fields:"),
        (["-f", "steps"], "'steps': expected NAME=VALUE"),
    ],
)
def test_cli_generate_names_a_wrong_model_or_field_before_sending(args: list[str], expected: str) -> None:
    refused = run_cli("x", *args, "--server", "http://127.0.0.1:9", "--key", "k", env={})
    assert (refused.returncode, refused.stdout) == (2, "")
    assert expected in " ".join(line.strip(" │") for line in refused.stderr.splitlines())


def test_cli_generate_says_when_the_server_refuses_a_field_value(
    server: ServerProcess, key: dict[str, Any]
) -> None:
    refused = run_cli("x", "-f", "steps=0", "--server", server.base_url, "--key", key["key"], env={})
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.strip().splitlines()[-1].startswith("error: steps:")


def test_a_job_submitted_to_one_api_replica_streams_from_another(
    server: ServerProcess, key: dict[str, Any], models_dir: Path
) -> None:
    replica = ServerProcess(server.data_dir, models_dir)  # same database and files, API only
    replica.start("--no-workers")
    events: list[Event] = []
    try:
        with Client(server.base_url, key["key"]) as first, Client(replica.base_url, key["key"]) as second:
            job_id = first.submit("flux-dev", "a replica", seed=5, width=256, height=256)
            job = second.wait(job_id, on_event=events.append)
            image = second.download(job.image_url or "")
    finally:
        replica.stop()
    assert (job.id, job.state, job.seed) == (job_id, "succeeded", 5)
    assert events[-1].kind == "result" and all(event.id for event in events)
    assert Image.open(io.BytesIO(image)).format == "PNG"


def test_the_client_imports_without_torch_or_the_server() -> None:
    heavy = "{'torch', 'PIL', 'fastapi', 'sqlalchemy'}"
    code = f"import sys, fluxserve.client; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
