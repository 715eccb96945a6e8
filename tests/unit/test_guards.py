"""The SSRF guard, the blob store's key rules and URL signatures, without a server."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from fluxserve.errors import AddressRefused, BlobNotFound, FetchError
from fluxserve.safety.fetch import NetworkPolicy, fetch_bytes, parse_networks
from fluxserve.storage.local import LocalBlobStore
from fluxserve.storage.signing import UrlSigner
from tests.conftest import http_server

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))
CLOSED = NetworkPolicy()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "::1", "fc00::1", "fe80::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert CLOSED.refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert CLOSED.refusal(ipaddress.ip_address(address)) is None


def test_operator_allowed_networks() -> None:
    assert LOOPBACK.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert LOOPBACK.refusal(ipaddress.ip_address("10.0.0.1")) is not None
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_networks("127.0.0.0/8, nonsense")


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/secret")
            self.end_headers()
            return
        if self.path.startswith("/hops/") and int(self.path.rsplit("/", 1)[1]) > 0:
            self.send_response(302)  # /hops/N redirects N times, then answers
            self.send_header("Location", f"/hops/{int(self.path.rsplit('/', 1)[1]) - 1}")
            self.end_headers()
            return
        body = b"x" * (5000 if self.path == "/big" else 10)
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    with http_server(_Handler) as url:
        yield url


def fetch(url: str, policy: NetworkPolicy, max_bytes: int = 1000) -> bytes:
    return asyncio.run(fetch_bytes(url, policy, max_bytes, timeout=5))


def test_fetch_from_allowed_loopback(origin: str) -> None:
    assert fetch(f"{origin}/ok", LOOPBACK) == b"x" * 10


def test_fetch_refuses_loopback_by_default(origin: str) -> None:
    with pytest.raises(FetchError, match="loopback address"):
        fetch(f"{origin}/ok", CLOSED)
    with pytest.raises(FetchError, match="loopback address"):
        fetch(f"http://localhost:{origin.rsplit(':', 1)[1]}/ok", CLOSED)


def test_fetch_limits_and_errors(origin: str) -> None:
    with pytest.raises(FetchError, match="limit"):
        fetch(f"{origin}/big", LOOPBACK, max_bytes=1000)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{origin}/missing", LOOPBACK)
    with pytest.raises(FetchError, match="private address"):
        fetch(f"{origin}/redirect-private", LOOPBACK)
    with pytest.raises(FetchError, match="http"):
        fetch("file:///etc/passwd", LOOPBACK)
    with pytest.raises(FetchError, match="link-local or metadata"):
        fetch("http://169.254.169.254/latest/meta-data/", LOOPBACK)


def test_three_redirects_are_followed_and_a_fourth_is_refused(origin: str) -> None:
    assert fetch(f"{origin}/hops/3", LOOPBACK) == b"x" * 10
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetch(f"{origin}/hops/4", LOOPBACK)


def _resolver(answers: list[list[str]], calls: list[str]) -> Any:
    """A getaddrinfo whose n-th call for a ``.example`` name answers ``answers[n]`` (others: the real one)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)  # a connect-time lookup passes bytes
        if not name.endswith(".example"):
            return real(host, port, *args, **kwargs)
        calls.append(name)
        addresses = answers[min(len(calls), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    return getaddrinfo


def test_the_vetted_address_is_the_one_connected_to(origin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a name that answers an allowed address once and a private one after is fetched from
    the address that was vetted, resolved once; never looked up again by the HTTP client."""
    calls: list[str] = []
    monkeypatch.setattr(socket, "getaddrinfo", _resolver([["127.0.0.1"], ["10.0.0.1"]], calls))
    port = origin.rsplit(":", 1)[1]
    assert fetch(f"http://rebind.example:{port}/ok", LOOPBACK) == b"x" * 10
    assert calls == ["rebind.example"]


def test_a_host_with_public_and_private_addresses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(socket, "getaddrinfo", _resolver([["93.184.216.34", "10.0.0.7"]], calls))
    with pytest.raises(AddressRefused, match=r"private address \(10\.0\.0\.7\)"):
        fetch("http://mixed.example/x", CLOSED)
    assert calls == ["mixed.example"]


def test_blob_store_round_trip_and_traversal(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    store.put("results/2026-11-24/a.png", b"png", "image/png")
    assert store.get("results/2026-11-24/a.png") == b"png"
    assert store.exists("results/2026-11-24/a.png")
    store.delete("results/2026-11-24/a.png")
    with pytest.raises(BlobNotFound):
        store.get("results/2026-11-24/a.png")
    for key in ("../escape", "/etc/passwd", "a/../../b", "a\\b", ""):
        with pytest.raises(ValueError):
            store.put(key, b"x", "text/plain")
        with pytest.raises(BlobNotFound):
            store.get(key)
    assert not (tmp_path / "escape").exists()


def test_url_signer() -> None:
    signer = UrlSigner("secret", ttl_seconds=60)
    path = signer.sign("results/a.png")
    expires = path.split("expires=")[1].split("&")[0]
    signature = path.split("signature=")[1]
    assert signer.verify("results/a.png", expires, signature)
    assert not signer.verify("results/b.png", expires, signature)
    assert not signer.verify("results/a.png", str(int(expires) + 1), signature)
    assert not UrlSigner("other", 60).verify("results/a.png", expires, signature)
    old = UrlSigner("secret", ttl_seconds=60).sign("results/a.png", now=0)
    assert not signer.verify("results/a.png", "60", old.split("signature=")[1])
