"""A server that strangers can call: error lists, head and body limits, timeouts, the key before the body.

Every test talks to a real ``fluxserve serve`` on loopback, most over a raw socket, so that what the
server does with a half-sent request is what is observed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.api.vendor import vendor_errors
from fluxserve.core.fields import error_messages
from tests.conftest import ServerProcess

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
ENV = {
    "FLUXSERVE_HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "FLUXSERVE_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
}


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[ServerProcess, str]]:
    """An API-only server with short header and body timeouts, and one valid key."""
    process = ServerProcess(tmp_path_factory.mktemp("hardening"), models_dir, ENV)
    key = process.create_key("hardening")["key"]
    process.start("--no-workers")
    yield process, key
    process.stop()


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_response(sock: socket.socket, deadline: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, headers, body) from a raw socket."""
    sock.settimeout(deadline)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        body += chunk
    return status, headers, body


def _closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> tuple[bool, bytes]:
    """Read until EOF (sending ``dribble`` every 0.3 s meanwhile); True if the server closed in time."""
    sock.settimeout(0.3)
    deadline = time.monotonic() + seconds
    received = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if dribble:
                try:
                    sock.sendall(dribble)
                except OSError:
                    return True, received
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def _healthz_ok(server: ServerProcess) -> bool:
    return httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200


# --- error lists: capped, linear, and the event loop stays free --------------------------------------


def test_twenty_thousand_unknown_fields_are_ignored_while_healthz_answers(
    guarded: tuple[ServerProcess, str],
) -> None:
    server, key = guarded
    # Invalid (no prompt, a bad width), so that no job is made; the unknown fields are ignored.
    body = {"width": 100, **{f"extra_{index}": index for index in range(20_000)}}
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    answers: list[int | str] = []  # checked here: an assert in the poller's thread would be swallowed
    done = threading.Event()

    def poll_healthz() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            while not done.is_set():
                start = time.monotonic()
                try:
                    answers.append(client.get("/healthz").status_code)
                except httpx.HTTPError as error:
                    answers.append(repr(error))
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll_healthz)
    poller.start()
    try:
        for _ in range(3):  # a few in a row, so the poller sees the server while it works on them
            response = httpx.post(
                f"{server.base_url}/bfl/v1/flux-dev",
                content=payload,
                headers={"TT-API-KEY": key, "Content-Type": "application/json"},
                timeout=60,
            )
            assert response.status_code == 400, response.text
    finally:
        done.set()
        poller.join()
    assert answers and set(answers) == {200}, answers
    envelope = response.json()
    assert envelope["status"] == "FAILED" and envelope["data"] is None
    assert envelope["message"].split("; ") == [
        "prompt: is required",
        "width: must be a multiple of 32 between 256 and 1440",
    ]
    assert latencies, "healthz was never answered while the big requests were in flight"
    assert max(latencies) < 1.0, f"healthz waited {max(latencies):.2f} s"


def test_two_hundred_thousand_fields_are_refused_before_parsing_in_both_dialects(
    guarded: tuple[ServerProcess, str],
) -> None:
    server, key = guarded
    payload = json.dumps({"prompt": "x", **{f"k{index}": index for index in range(200_000)}}).encode()
    reseller = httpx.post(
        f"{server.base_url}/bfl/v1/flux-dev",
        content=payload,
        headers={"TT-API-KEY": key, "Content-Type": "application/json"},
        timeout=60,
    )
    assert reseller.status_code == 400, reseller.text
    assert reseller.json()["message"].startswith("body: at most 50000 JSON separators")
    vendor = httpx.post(
        f"{server.base_url}/v1/flux-dev",
        content=payload,
        headers={"x-key": key, "Content-Type": "application/json"},
        timeout=60,
    )
    assert vendor.status_code == 422, vendor.text
    assert vendor.json()["detail"].startswith("body: at most 50000 JSON separators")
    assert _healthz_ok(server)


def test_reseller_error_list_is_capped() -> None:
    errors: list[dict[str, Any]] = [
        {"loc": ("body", f"field_{index}"), "msg": "bad", "type": "value_error"} for index in range(5000)
    ]
    lines = error_messages(errors + errors)  # duplicates count once
    assert lines[:20] == [f"field_{index}: bad" for index in range(20)]
    assert lines[20:] == ["... and 4980 more"]


def test_vendor_error_list_is_capped() -> None:
    errors: list[dict[str, Any]] = [
        {"loc": ("body", f"field_{index}"), "msg": "bad", "type": "value_error"} for index in range(5000)
    ]
    items = vendor_errors(errors + errors)  # duplicates count once
    assert [item["msg"] for item in items[:20]] == [f"field_{index}: bad" for index in range(20)]
    assert items[20:] == [{"loc": ["body"], "msg": "... and 4980 more", "type": "too_many_errors"}]


def test_valid_submits_still_pass_the_guard(guarded: tuple[ServerProcess, str]) -> None:
    server, key = guarded
    reseller = httpx.post(
        f"{server.base_url}/bfl/v1/flux-dev",
        json={"prompt": "a red circle", "seed": 1},
        headers={"TT-API-KEY": key},
        timeout=30,
    )
    assert reseller.status_code == 200, reseller.text
    vendor = httpx.post(
        f"{server.base_url}/v1/flux-dev", json={"prompt": "a red circle"}, headers={"x-key": key}, timeout=30
    )
    assert vendor.status_code == 200, vendor.text
    fetched = httpx.post(
        f"{server.base_url}/flux/fetch",
        json={"jobId": reseller.json()["data"]["jobId"]},
        headers={"TT-API-KEY": key},
        timeout=30,
    )
    assert fetched.status_code == 200 and fetched.json()["status"] == "PENDING_QUEUE", fetched.text


# --- the request head: size and time ----------------------------------------------------------------


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """An API-only server whose header timeout (a minute) cannot be what closes a connection in the head
    size tests: only the 16 KiB limit can."""
    env = {"FLUXSERVE_HTTP_HEADER_TIMEOUT_SECONDS": "60", "FLUXSERVE_HTTP_MAX_HEADER_BYTES": str(HEAD_LIMIT)}
    process = ServerProcess(tmp_path_factory.mktemp("patient"), models_dir, env)
    process.start("--no-workers")
    yield process
    process.stop()


HEAD_LIMIT = 16 * 1024
HEAD_START = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: "


def test_a_whole_head_over_the_limit_in_one_write_is_refused(patient: ServerProcess) -> None:
    with _connect(patient) as sock:
        sock.sendall(HEAD_START + b"a" * (64 * 1024) + b"\r\n\r\n")
        status, headers, _ = _read_response(sock)
        closed, _ = _closed_within(sock, 10)
    assert status == 431 and headers.get("connection") == "close"
    assert closed
    assert _healthz_ok(patient)


def test_a_head_over_the_limit_in_many_writes_is_refused(patient: ServerProcess) -> None:
    with _connect(patient) as sock:
        sock.sendall(HEAD_START)
        try:
            for _ in range(64):  # 1 MiB of one header, in 16 KiB writes, never finished
                sock.sendall(b"a" * 16384)
                time.sleep(0.01)
        except OSError:
            pass  # closed on us while we were still sending: refused
        closed, received = _closed_within(sock, 10)  # well before the minute's header timeout
    assert closed, "the server kept reading an endless header"
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]
    assert _healthz_ok(patient)


def test_a_head_under_the_limit_in_many_writes_is_answered(patient: ServerProcess) -> None:
    with _connect(patient) as sock:
        sock.sendall(HEAD_START)
        for _ in range(15):  # 15 KiB of header in 1 KiB writes: under the limit with the rest of the head
            sock.sendall(b"a" * 1024)
        sock.sendall(b"\r\n\r\n")
        status, _, body = _read_response(sock)
    assert status == 200, body


def test_a_connection_that_never_finishes_its_headers_is_closed(guarded: tuple[ServerProcess, str]) -> None:
    server, _ = guarded
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        closed, received = _closed_within(sock, HEADER_TIMEOUT + 8, dribble=b"X-Slow: 1\r\n")
        elapsed = time.monotonic() - start
    assert closed, "a slowloris connection was kept open"
    assert b"200 OK" not in received
    assert elapsed >= HEADER_TIMEOUT - 0.5  # closed by the header timeout, not at once
    assert _healthz_ok(server)


def test_a_silent_connection_is_closed(guarded: tuple[ServerProcess, str]) -> None:
    server, _ = guarded
    with _connect(server) as sock:
        closed, received = _closed_within(sock, HEADER_TIMEOUT + 8)
    assert closed and received == b""


def test_a_body_that_stops_arriving_is_dropped(guarded: tuple[ServerProcess, str]) -> None:
    server, key = guarded
    with _connect(server) as sock:
        sock.sendall(
            b"POST /flux/cancel HTTP/1.1\r\nHost: test\r\nTT-API-KEY: " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"jobId": "'
        )
        closed, _ = _closed_within(sock, BODY_TIMEOUT + 8)
    assert closed, "a stalled body kept its connection"


# --- bodies: the key first, a cap per route ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key_header", "status"),
    [
        ("/bfl/v1/flux-dev", b"TT-API-KEY: fs_not_a_key\r\n", 401),
        ("/bfl/v1/flux-kontext-max", b"", 401),
        ("/v1/flux-dev", b"x-key: fs_not_a_key\r\n", 403),
        ("/v1/flux-pro-1.1", b"", 403),
    ],
)
def test_a_50_mb_body_with_a_bad_key_is_refused_before_it_is_read(
    guarded: tuple[ServerProcess, str], path: str, key_header: bytes, status: int
) -> None:
    server, _ = guarded
    total = 50 * 1024 * 1024
    sent = 64 * 1024
    with _connect(server) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n".encode()
            + key_header
            + f"Content-Length: {total}\r\n\r\n".encode()
            + b'{"prompt": "'
            + b"a" * (sent - 12)
        )
        # Only 64 KiB of the 50 MiB are sent: the answer can only come from the headers.
        code, headers, body = _read_response(sock)
    assert code == status, body
    assert headers.get("connection") == "close"
    answer = json.loads(body)
    if path.startswith("/v1/"):
        assert answer["detail"].startswith("Not authenticated")
    else:
        assert answer["status"] == "FAILED" and "TT-API-KEY" in answer["message"]


def test_a_declared_body_over_the_submit_cap_is_refused_unread(guarded: tuple[ServerProcess, str]) -> None:
    server, key = guarded
    with _connect(server) as sock:
        sock.sendall(
            b"POST /bfl/v1/flux-dev HTTP/1.1\r\nHost: test\r\nTT-API-KEY: " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n{"
        )
        code, _, body = _read_response(sock)
    assert code == 413
    assert json.loads(body)["message"].startswith("body: 200000000 bytes is over")


@pytest.mark.parametrize("path", ["/flux/fetch", "/flux/cancel"])
def test_fetch_and_cancel_bodies_over_the_small_cap_get_413(
    guarded: tuple[ServerProcess, str], path: str
) -> None:
    server, key = guarded
    padding = "x" * (100 * 1024)
    declared = httpx.post(
        f"{server.base_url}{path}",
        json={"jobId": "nope", "padding": padding},
        headers={"TT-API-KEY": key},
        timeout=30,
    )
    assert declared.status_code == 413, declared.text
    assert (
        declared.json()["message"]
        == f"body: {len(declared.request.content)} bytes is over this route's 64 KiB limit"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts what arrives
        yield b'{"jobId": "nope", "padding": "'
        for _ in range(10):
            yield b"x" * 10240
        yield b'"}'

    streamed = httpx.post(
        f"{server.base_url}{path}", content=chunks(), headers={"TT-API-KEY": key}, timeout=30
    )
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["message"] == "body: more than this route's 64 KiB limit"
    # A small body on the same route is still served.
    small = httpx.post(
        f"{server.base_url}{path}", json={"jobId": "nope"}, headers={"TT-API-KEY": key}, timeout=30
    )
    assert small.status_code == 404, small.text


def test_get_result_with_a_body_over_the_small_cap_gets_413(guarded: tuple[ServerProcess, str]) -> None:
    server, key = guarded
    response = httpx.request(
        "GET",
        f"{server.base_url}/v1/get_result",
        params={"id": "nope"},
        content=b"x" * (100 * 1024),
        headers={"x-key": key},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "body: 102400 bytes is over this route's 64 KiB limit"}
