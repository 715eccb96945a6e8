"""Issue 20's second hardening round, in process (the app without workers on a real SQLite database):
numbers a client sends, security headers on HTML pages, words in refusals."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from fluxserve.api.deps import Services
from fluxserve.api.events import EventId
from fluxserve.api.limits import RequestGuard
from fluxserve.app import create_app
from fluxserve.core.numbers import ascii_int
from fluxserve.jobs.reports import recent_jobs
from fluxserve.jobs.store import IDEMPOTENCY_HEADER
from fluxserve.settings import Settings
from fluxserve.storage.signing import UrlSigner
from tests.conftest import png_base64

HOSTILE_NUMBERS = ["²", "1²", "٣", "1" * 13, "1" * 5000, "", " 1", "1 ", "+1", "-1", "0x1", "1_0", "1.0"]
MAX_INPUT = 256 * 1024  # the route's body limit is then 4 base64 images of it plus 1 MiB: about 2.4 MiB
IDS = [text if len(text) < 20 else f"{len(text)} digits" for text in HOSTILE_NUMBERS]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Services]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("round2"),
        workers=0,
        max_input_bytes=MAX_INPUT,
        openai_wait_seconds=0.1,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.services


@pytest.fixture
def client(app_client: tuple[TestClient, Services]) -> TestClient:
    return app_client[0]


@pytest.fixture
def key(app_client: tuple[TestClient, Services]) -> str:
    services = app_client[1]
    return services.keys.create(f"k{services.keys.count()}", Decimal(100)).key


@pytest.mark.parametrize("text", HOSTILE_NUMBERS, ids=IDS)
def test_only_short_ascii_digit_strings_are_numbers(text: str) -> None:
    assert ascii_int(text, 12) is None
    assert EventId.parse(f"1.1.{text}") is None or text != text.strip()  # the header may have spaces
    assert not UrlSigner("secret", 60).verify("a.png", text, "sig")


def test_numbers_within_their_length_are_read() -> None:
    assert ascii_int("007", 3) == 7 and ascii_int("1" * 12, 12) == int("1" * 12)
    assert EventId.parse(" 1.2.3 ") == EventId(1, 2, 3)


@pytest.mark.parametrize(
    "expires", ["²", "٣٣٣٣٣٣٣٣٣٣", "9" * 5000], ids=["superscript", "arabic", "5000 digits"]
)
def test_a_hostile_expires_is_a_403_not_a_500(client: TestClient, expires: str) -> None:
    response = client.get("/files/results/x.png", params={"expires": expires, "signature": "x"})
    assert response.status_code == 403 and "signature" in response.text


@pytest.mark.parametrize("ratio", ["١٦:٩", "16:٩"])
def test_an_aspect_ratio_in_other_digits_is_refused_naming_the_field(
    client: TestClient, key: str, ratio: str
) -> None:
    response = client.post(
        "/bfl/v1/flux-kontext-pro", json={"prompt": "p", "aspect_ratio": ratio}, headers={"TT-API-KEY": key}
    )
    assert response.status_code in (400, 422) and "aspect_ratio" in response.text


# -- uploads ----------------------------------------------------------------------------------------------


def funded(app_client: tuple[TestClient, Services], credits: str) -> str:
    services = app_client[1]
    return services.keys.create(f"k{services.keys.count()}", Decimal(credits)).key


UPLOAD_ROUTES = [
    ("/flux/edits", "TT-API-KEY", {"prompt": "p", "mode": "flux-kontext-pro"}),
    ("/v1/images/edits", "Authorization", {"prompt": "p", "model": "flux-kontext-pro"}),
]


def auth(header: str, key: str) -> dict[str, str]:
    return {header: f"Bearer {key}" if header == "Authorization" else key}


@pytest.mark.parametrize(("path", "header", "form"), UPLOAD_ROUTES)
def test_an_upload_over_the_input_limit_is_refused_naming_the_image(
    app_client: tuple[TestClient, Services], path: str, header: str, form: dict[str, str]
) -> None:
    client, key = app_client[0], funded(app_client, "100")
    files = [("image", ("big.png", b"x" * (MAX_INPUT + 1), "image/png"))]
    response = client.post(path, data=form, files=files, headers=auth(header, key))
    assert response.status_code == 400, response.text
    assert f"image: file 1 is {MAX_INPUT + 1} bytes; at most {MAX_INPUT} are accepted" in response.text


@pytest.mark.parametrize(("path", "header", "form"), UPLOAD_ROUTES)
def test_a_multipart_body_over_the_route_limit_is_a_413_in_the_routes_dialect(
    app_client: tuple[TestClient, Services], path: str, header: str, form: dict[str, str]
) -> None:
    """Sent in chunks without a Content-Length: the guard counts the stream as it passes to the app."""
    client, key = app_client[0], funded(app_client, "100")
    files = [("image", ("big.png", b"x" * 3 * 1024 * 1024, "image/png"))]
    encoded = httpx.Request("POST", "http://x", data=form, files=files)
    body = encoded.read()
    chunks = (body[start : start + 65536] for start in range(0, len(body), 65536))
    headers = {**auth(header, key), "content-type": encoded.headers["content-type"]}
    response = client.post(path, content=chunks, headers=headers)
    assert response.status_code == 413 and "body: more than this route's 2 MiB limit" in response.text
    assert ("error" in response.json()) is (header == "Authorization")


@pytest.mark.parametrize(("path", "header", "form"), UPLOAD_ROUTES)
def test_an_upload_from_a_key_without_credits_is_a_402_before_its_body_is_read(
    app_client: tuple[TestClient, Services], path: str, header: str, form: dict[str, str]
) -> None:
    """Called as the server calls the app: the body's channel is never read."""
    key = funded(app_client, "0")
    app = app_client[0].app
    raw_headers = [(name.lower().encode(), value.encode()) for name, value in auth(header, key).items()]
    raw_headers.append((b"content-type", b"multipart/form-data; boundary=x"))
    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": raw_headers, "http_version": "1.1", "scheme": "http", "root_path": "",
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app,
    }  # fmt: skip
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        raise AssertionError("the body was read")

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 402
    body = json.loads(b"".join(m.get("body", b"") for m in sent))  # type: ignore[misc]
    assert "Not enough credits: this key has 0" in json.dumps(body) and "upload was not read" in json.dumps(
        body
    )


def test_a_multipart_body_reaches_the_app_as_it_arrives_never_held_whole() -> None:
    """The app has each chunk before the next is read from the client (a buffered body would show none)."""
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    seen_by_app: list[bytes] = []
    seen_when_read: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            event = await receive()
            seen_by_app.append(event["body"])
            more = event["more_body"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        seen_when_read.append(len(seen_by_app))
        body = chunks[len(seen_when_read) - 1]
        return {"type": "http.request", "body": body, "more_body": len(seen_when_read) < len(chunks)}

    async def send(message: Message) -> None:
        pass

    guard = RequestGuard(app, lambda raw: None, 10_000, 10_000, 100)
    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    asyncio.run(
        guard({"type": "http", "method": "POST", "path": "/upload", "headers": headers}, receive, send)
    )
    assert seen_by_app == chunks and seen_when_read == [0, 1, 2]


# -- security headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/playground/", "/docs", "/redoc"])
def test_every_html_page_has_a_policy_and_cannot_be_framed(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    script_src = next(part for part in policy.split("; ") if part.startswith("script-src"))
    assert "'unsafe-inline'" not in script_src
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_the_docs_inline_script_is_allowed_by_its_hash_and_no_other(client: TestClient) -> None:
    page = client.get("/docs")
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    script_src = next(
        part for part in page.headers["content-security-policy"].split("; ") if part.startswith("script-src")
    )
    assert script_src == f"script-src 'self' 'sha256-{digest}'"


def test_json_answers_say_nosniff_without_a_page_policy(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in response.headers


# -- words ------------------------------------------------------------------------------------------------


def test_every_402_gives_the_flux2_price_of_the_request_not_the_first_megapixels(
    app_client: tuple[TestClient, Services],
) -> None:
    """flux-2-max is 7 credits for the first megapixel and 3 for each further one: 1440x1440 (2.07 MP,
    billed 2) costs 10 and 2048x2048 (4.19 MP, billed 4) 16. A 402 said 7 for both."""
    client, key = app_client[0], funded(app_client, "9")
    openai = client.post(
        "/v1/images/generations",
        json={"prompt": "p", "model": "flux-2-max", "size": "1440x1440", "n": 2},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert openai.status_code == 402 and openai.json()["error"]["message"].endswith("2 x flux-2-max costs 20")
    body = {"prompt": "p", "width": 1440, "height": 1440}
    reseller = client.post("/bfl/v1/flux-2-max", json=body, headers={"TT-API-KEY": key})
    assert reseller.status_code == 402 and reseller.json()["message"].endswith("flux-2-max costs 10")
    vendor = client.post(
        "/v1/flux-2-max", json={**body, "width": 2048, "height": 2048}, headers={"x-key": key}
    )
    assert vendor.status_code == 402 and "flux-2-max costs 16 credits and this key has 9" in vendor.text
    broke = funded(app_client, "1")
    exact = client.post("/bfl/v1/flux-2-max", json=body, headers={"TT-API-KEY": broke})
    assert exact.status_code == 402 and exact.json()["message"].endswith("flux-2-max costs 10")
    # With an image to decode, refused before it is looked at: the lowest price, said so.
    edit = {**body, "input_image": png_base64()}
    lowest = client.post("/bfl/v1/flux-2-max", json=edit, headers={"TT-API-KEY": broke})
    assert "costs at least 7 (7 for the first megapixel + 3 for each further one)" in lowest.text


@pytest.mark.parametrize(
    ("path", "shape", "listed", "unlisted"),
    [
        ("/bfl/v1/no-such-model", "message", "flux-kontext-pro", "flux-2-klein-4b"),  # the reseller's models
        ("/v1/no-such-model", "detail", "flux-2-klein-4b", "credits"),
    ],
)
def test_an_unknown_model_is_a_404_listing_the_dialects_models(
    client: TestClient, key: str, path: str, shape: str, listed: str, unlisted: str
) -> None:
    response = client.post(path, json={"prompt": "p"}, headers={"TT-API-KEY": key, "x-key": key})
    assert response.status_code == 404
    message = response.json()[shape]
    assert message.startswith("model: 'no-such-model' is not a model this server has; models: ")
    assert listed in message.split(", ") or f"models: {listed}" in message
    assert unlisted not in message


@pytest.mark.parametrize(("path", "header", "form"), UPLOAD_ROUTES)
def test_both_edit_routes_trim_spaces_around_their_choice_fields(
    app_client: tuple[TestClient, Services], path: str, header: str, form: dict[str, str]
) -> None:
    client, key = app_client[0], funded(app_client, "100")
    padded = {name: value if name == "prompt" else f" {value} " for name, value in form.items()}
    if header == "Authorization":
        padded |= {"size": " 1024x1024 ", "response_format": " url "}
    files = [("image", ("a.png", base64.b64decode(png_base64()), "image/png"))]
    response = client.post(path, data=padded, files=files, headers=auth(header, key))
    accepted = 504 if header == "Authorization" else 200  # OpenAI's wait ends (no workers here); jobs stand
    assert response.status_code == accepted, response.text


# -- back-pressure ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Services]]:
    """Operator caps on: 3 submits a minute per key, 2 active jobs per key, 1 held image request, 6 jobs
    waiting in all."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("strict"), workers=0, key_requests_per_minute=3, max_active_jobs=2,
        max_held_requests=1, openai_wait_seconds=30, retry_after_seconds=7, max_queued_jobs=6,
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.services


def test_a_keys_request_rate_is_capped_with_a_retry_after(strict: tuple[TestClient, Services]) -> None:
    client, key = strict[0], funded(strict, "100")
    answers = [
        client.post("/bfl/v1/flux-dev", json={"prompt": "p"}, headers={"TT-API-KEY": key}) for _ in range(4)
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 429, 429]  # the 3rd: 2 active jobs
    assert answers[2].headers["retry-after"] == "7"  # a limit that knows no better: the operator's default
    assert "Too many requests: this server takes 3 a minute per key" in answers[3].text
    assert 1 <= int(answers[3].headers["retry-after"]) <= 60  # until the key's minute is over
    other = funded(strict, "100")  # another key's minute is its own
    assert (
        client.post("/bfl/v1/flux-dev", json={"prompt": "p"}, headers={"TT-API-KEY": other}).status_code
        == 200
    )


def test_held_image_requests_are_capped_per_process_across_keys(strict: tuple[TestClient, Services]) -> None:
    client, services = strict
    first, second = funded(strict, "100"), funded(strict, "100")
    owner, other = services.keys.authenticate(first), services.keys.authenticate(second)
    assert owner is not None and other is not None
    options = client.app.state.openai_images  # type: ignore[attr-defined]
    body = {"prompt": "p", "model": "flux-dev"}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            client.post, "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {first}"}
        )
        deadline = time.monotonic() + 60
        while (
            not recent_jobs(services.keys.database, key_id=owner.id, limit=1) and time.monotonic() < deadline
        ):
            time.sleep(0.01)  # until the first request has made its job and waits for it
        refused = client.post(
            "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {second}"}
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "server_busy"
        assert recent_jobs(services.keys.database, key_id=other.id, limit=1) == []  # refused before a job
        (job,) = recent_jobs(services.keys.database, key_id=owner.id, limit=1)
        services.jobs.cancel(job.id, owner.id)  # the held request ends (its job failed to finish)
        assert held.result().status_code == 500
    assert options.held.held == 0


def test_the_whole_queue_is_capped_with_a_503_in_each_dialect(strict: tuple[TestClient, Services]) -> None:
    client, services = strict
    for _ in range(6 - services.jobs.waiting()):  # fresh keys: no per-key cap is reached first
        submitted = client.post(
            "/bfl/v1/flux-dev", json={"prompt": "p"}, headers={"TT-API-KEY": funded(strict, "9")}
        )
        assert submitted.status_code == 200, submitted.text
    reseller = client.post(
        "/bfl/v1/flux-dev", json={"prompt": "p"}, headers={"TT-API-KEY": funded(strict, "9")}
    )
    assert reseller.status_code == 503 and reseller.headers["retry-after"] == "7"
    assert reseller.json()["message"] == "Server busy: the queue is full (6 jobs wait); retry shortly"
    body = {"prompt": "p", "model": "flux-dev"}
    openai = client.post(
        "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {funded(strict, '9')}"}
    )
    assert openai.status_code == 503 and openai.json()["error"]["message"].startswith(
        "Server busy: the queue"
    )
    assert services.jobs.waiting() == 6


# -- the README's guarantees, in the fast tier -----------------------------------------------------------


def test_keys_are_stored_as_hashes_never_as_text(app_client: tuple[TestClient, Services]) -> None:
    services = app_client[1]
    raw = services.keys.create("stored-hashed", Decimal(1)).key
    database = Path(services.keys.database.url.database or "")
    services.keys.database.dispose()  # the write-ahead log folded into the file, too
    stored = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
    assert raw.encode() not in stored and raw[10:].encode() not in stored
    assert services.keys.authenticate(raw) is not None


def test_a_submit_body_over_the_cap_is_refused_declared_or_streamed(client: TestClient, key: str) -> None:
    cap = 4 * MAX_INPUT * 4 // 3 + 1024 * 1024  # app.max_body_size: four base64 images and the rest
    body = json.dumps({"prompt": "p", "input_image": "A" * cap}).encode()
    declared = client.post("/bfl/v1/flux-kontext-pro", content=body, headers={"TT-API-KEY": key})
    chunks = (body[start : start + 65536] for start in range(0, len(body), 65536))
    streamed = client.post("/bfl/v1/flux-kontext-pro", content=chunks, headers={"TT-API-KEY": key})
    for response in (declared, streamed):
        assert response.status_code == 413 and "body:" in response.json()["message"], response.text


@pytest.mark.parametrize(("path", "header", "job_id"), [
    ("/bfl/v1/flux-dev", "TT-API-KEY", lambda body: body["data"]["jobId"]),
    ("/v1/flux-dev", "x-key", lambda body: body["id"]),
])  # fmt: skip
def test_a_repeat_with_the_same_idempotency_key_is_charged_once(
    app_client: tuple[TestClient, Services], path: str, header: str, job_id: Any
) -> None:
    client, services = app_client
    key = funded(app_client, "10")
    headers = {header: key, IDEMPOTENCY_HEADER: "once"}
    first, repeat = (client.post(path, json={"prompt": "p"}, headers=headers) for _ in range(2))
    assert first.status_code == repeat.status_code == 200
    assert job_id(first.json()) == job_id(repeat.json())
    verified = services.keys.authenticate(key)
    found = None if verified is None else services.keys.get(verified.id)  # the balance now, not the cache's
    assert found is not None and found.credits == Decimal("7.5")  # flux-dev's 2.5, once
