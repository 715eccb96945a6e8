"""Odd and malformed URL forms as input images and webhook targets: each is refused at submit with a 400
naming the field, or fails the job (or the delivery) with a message naming the reason; never a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from fluxserve.core.fields import _http_url
from fluxserve.errors import FetchError
from fluxserve.safety.fetch import NetworkPolicy, fetch_bytes, parse_networks, send, url_problem
from fluxserve.safety.images import is_url
from tests.conftest import Api, http_server, png_base64

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))

# (URL, a fragment of the reason fetch.url_problem gives)
MALFORMED = [
    ("http://0177.0.0.1/x", "non-standard form"),  # octal
    ("http://2130706433/x", "non-standard form"),  # decimal
    ("http://0x7f.1/x", "non-standard form"),  # hex, short
    ("http://0x7f000001/x", "non-standard form"),
    ("http://127.1/x", "non-standard form"),
    ("https://0/x", "non-standard form"),
    ("http://1.2.3.4.5/x", "non-standard form"),
    ("http://[fe80::1%25eth0]/x", "zone"),
    ("http://[fe80::1%eth0]/x", "zone"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://[1::2::3]/x", "IPv6"),
    ("http:///x", "no host"),
    ("http://a@b@c/x", "more than one '@'"),
    ("http://exa mple.com/x", "whitespace"),
    ("http://example.com/a b", "whitespace"),
    ("http://example.com/\r\nX-Injected: 1", "control characters"),
    ("http://\x00x/", "control characters"),
    ("http://example.com\\@evil.example/x", "backslash"),
    ("http://" + "a" * 300 + ".com/x", "not a valid host name"),
    ("http://" + "a." * 200 + "com/x", "not a valid host name"),
    ("http://a..b/x", "not a valid host name"),
    ("http://-a-.com/x", "not a valid host name"),
    ("http://xn--/x", "not a valid host name"),
    ("http://%41.example/x", "percent-encoded"),
    ("http://example.com:99999/x", "port"),
    ("http://example.com:0/x", "port"),
    ("http://example.com:-1/x", "port"),
    ("http://example.com:abc/x", "port"),
    ("ftp://example.com/x", "scheme"),
    ("http://example.com/" + "a" * 9000, "longer than"),
]
# Well-formed: accepted by the field validator and taken as URLs by is_url.
WELL_FORMED = [
    "http://127.0.0.1:8000/x.png",
    "https://example.com/a/b.png?x=1",
    "HTTP://EXAMPLE.COM/x",
    "https://bücher.example/x",
    "http://[::1]:8080/x",
    "http://[::ffff:127.0.0.1]/x",
    "http://user:pw@example.com/x",
    "http://192.0.2.1/x",
]


@pytest.mark.parametrize(("url", "reason"), MALFORMED)
def test_malformed_forms_are_named_and_never_fetched(url: str, reason: str) -> None:
    problem = url_problem(url)
    assert problem is not None and reason in problem, problem
    assert not is_url(url)
    with pytest.raises(FetchError, match="not a usable http\\(s\\) URL"):
        asyncio.run(fetch_bytes(url, LOOPBACK, 1000, timeout=2))

    async def post() -> None:
        async with httpx.AsyncClient() as client:
            await send(client, "POST", url, LOOPBACK, content=b"{}", timeout=2)

    with pytest.raises(FetchError, match="not a usable http\\(s\\) URL"):
        asyncio.run(post())


@pytest.mark.parametrize(("url", "reason"), [(url, reason) for url, reason in MALFORMED if len(url) <= 2083])
def test_the_webhook_field_refuses_what_can_never_be_fetched(url: str, reason: str) -> None:
    with pytest.raises(ValueError):
        _http_url(url)


@pytest.mark.parametrize("url", WELL_FORMED)
def test_well_formed_urls_pass_every_check(url: str) -> None:
    assert url_problem(url) is None
    assert is_url(url) and is_url(f"  {url}\n")
    assert _http_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://☃.net/x",  # IDNA 2003 says yes (the field), IDNA 2008 no (httpx)
        "http://xn--abc-.example/x",
        "https://bücher.example/x",  # fine, but does not resolve here
        " http://127.0.0.1:9/x ",
        "http://user:pw@127.0.0.1:9/x",
        "http://[::ffff:127.0.0.1]:9/x",
        "http://localhost:9/x",
    ],
)
def test_fetch_errors_are_fetch_errors(url: str) -> None:
    """Forms that pass the syntax checks but cannot be fetched here still end as a FetchError."""
    with pytest.raises(FetchError):
        asyncio.run(fetch_bytes(url, LOOPBACK, 1000, timeout=2))


class _Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        targets = {
            "/octal": "http://0177.0.0.1/x",
            "/broken": "http://[::1",
            "/zone": "http://[fe80::1%25eth0]/x",
            "/space": "http://exa mple.com/",
            "/ftp": "ftp://example.com/x",
        }
        self.send_response(302)
        self.send_header("Location", targets.get(self.path, "/octal"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def redirector() -> Iterator[str]:
    with http_server(_Redirects) as url:
        yield url


@pytest.mark.parametrize("path", ["/octal", "/broken", "/zone", "/space", "/ftp"])
def test_a_redirect_to_a_malformed_url_is_a_clear_fetch_error(redirector: str, path: str) -> None:
    with pytest.raises(FetchError, match="redirected to an unusable URL"):
        asyncio.run(fetch_bytes(f"{redirector}{path}", LOOPBACK, 1000, timeout=5))


# -- end to end: a real server --------------------------------------------------------------------------


def _refused_or_failed_clearly(api: Api, field: str, model: str, body: dict[str, Any]) -> str:
    """The 400 message, or the failed job's message; asserts it names the field and is no crash."""
    response = api.submit(model, body)
    if response.status_code == 400:
        message = response.json()["message"]
    else:
        assert response.status_code == 200, response.text
        result = api.wait(response.json()["data"]["jobId"], timeout=60)
        assert result["status"] == "FAILED", result
        message = result["message"]
    assert message.startswith(f"{field}:"), message
    assert "Internal error" not in message, message
    return message


def test_odd_input_image_urls_end_clearly(api: Api) -> None:
    outcomes: dict[str, str] = {}
    for url, _ in MALFORMED:
        outcomes[url] = _refused_or_failed_clearly(
            api, "input_image", "flux-kontext-pro", {"prompt": "p", "input_image": url}
        )
    # Forms that are URLs but not fetchable from here: the job fails naming the field and the reason.
    for url, reason in [
        ("http://☃.net/x", "http(s) URL"),  # refused at submit: httpx (IDNA 2008) cannot fetch it
        (" http://127.0.0.1:9/x ", "cannot connect"),
        ("http://user:pw@127.0.0.1:9/x", "cannot connect"),
        ("http://no-such-host.invalid/x", "cannot resolve"),
    ]:
        message = _refused_or_failed_clearly(
            api, "input_image", "flux-kontext-pro", {"prompt": "p", "input_image": url}
        )
        assert reason in message, (url, message)
    # The second image field too, and the refusals are the submit's 400.
    message = _refused_or_failed_clearly(
        api,
        "input_image_2",
        "flux-kontext-pro",
        {"prompt": "p", "input_image": png_base64(), "input_image_2": "http://0177.0.0.1/x"},
    )
    assert "input_image_2" in message
    assert (
        api.submit("flux-kontext-pro", {"prompt": "p", "input_image": "http://0x7f.1/x"}).status_code == 400
    )


def test_odd_webhook_urls_are_refused_at_submit(api: Api) -> None:
    for url, _ in MALFORMED:
        if len(url) > 2083:
            continue
        response = api.submit("flux-dev", {"prompt": "p", "steps": 1, "webhook_url": url})
        assert response.status_code == 400, (url, response.text)
        assert response.json()["message"].startswith("webhook_url:"), response.text
    vendor = httpx.post(
        f"{api.base_url}/v1/flux-dev",
        headers={"x-key": api.key},
        json={"prompt": "p", "webhook_url": "http://2130706433/hook"},
        timeout=30,
    )
    assert vendor.status_code == 422, vendor.text
    assert vendor.json()["detail"][0]["loc"][-1] == "webhook_url"
