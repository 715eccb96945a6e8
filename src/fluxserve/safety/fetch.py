"""SSRF-guarded HTTP for URL image inputs and webhook targets.

Every hop's host is resolved first and refused if any address is loopback, private, link-local,
CGNAT, multicast, reserved or unspecified (IPv4, IPv6, and IPv4 mapped into IPv6), unless it lies
in a network the operator allowed. The connection then goes to the vetted address itself, with the
original Host header and TLS server name, so a DNS answer that changes in between cannot redirect it.

A URL is checked before anything is resolved (:func:`url_problem`): an odd form that parsers read
differently (a numeric host other than a dotted quad such as ``0177.0.0.1`` or ``2130706433``, an IPv6
zone, several ``@``, a backslash, whitespace or control characters, a bad port or host name) is refused
with a message saying why, and any error httpx raises for a URL or a request is a :class:`FetchError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from fluxserve.errors import AddressRefused, FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def parse_networks(value: str) -> list[IPNetwork]:
    """``"127.0.0.0/8, 10.1.0.0/16"`` -> networks; ValueError naming the bad entry."""
    networks: list[IPNetwork] = []
    for item in value.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError as error:
                raise ValueError(
                    f"FLUXSERVE_ALLOWED_PRIVATE_NETWORKS: {item.strip()!r} is not a CIDR"
                ) from error
    return networks


@dataclass(frozen=True)
class NetworkPolicy:
    allowed_private: Sequence[IPNetwork] = field(default_factory=tuple)

    def refusal(self, address: IPAddress) -> str | None:
        """Why this address may not be reached, or None when it may."""
        if any(address in network for network in self.allowed_private):
            return None
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if mapped is not None:
            return self.refusal(mapped)
        if address.is_loopback:
            return "a loopback address"
        if address.is_link_local:
            return "a link-local or metadata address"
        if address.is_multicast:
            return "a multicast address"
        if address.is_unspecified or address.is_reserved:
            return "a reserved address"
        if address.is_private or not address.is_global:
            return "a private address"
        return None


def url_problem(url: str) -> str | None:
    """Why ``url`` can never be fetched, or None when it is a well-formed http(s) URL.

    Only the form is judged here; where the host resolves to is :func:`vet`'s business.
    """
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        return "contains whitespace or control characters (percent-encode them)"
    if "\\" in url:
        return "contains a backslash"
    try:
        parts = urlsplit(url)
    except ValueError as error:
        return f"not a valid URL ({error})"
    if parts.scheme.lower() not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.netloc:
        return "there is no host"
    if parts.netloc.count("@") > 1:
        return "more than one '@' before the host (ambiguous user info)"
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        literal = host[1 : host.find("]")] if "]" in host else host[1:]
        if "%" in literal:
            return "an IPv6 zone identifier (%...) is not allowed"
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return f"the host [{literal}] is not a valid IPv6 address"
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number from 1 to 65535"
    if port == 0:
        return "the port is not a number from 1 to 65535"
    name = parts.hostname or ""
    if not name:
        return "there is no host"
    if ":" in name:
        return None  # an IPv6 literal, checked above
    return host_problem(name)


def host_problem(name: str) -> str | None:
    """Why a (non-IPv6) host name can never be fetched, or None."""
    if "%" in name:
        return f"the host {name[:100]!r} is percent-encoded"
    labels = name.rstrip(".").split(".")
    if _NUMBER.match(labels[-1]):
        # Read as an IPv4 address by browsers and by the C library (inet_aton): only the dotted quad
        # of four decimal numbers means the same everywhere.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return (
                f"the host {name[:100]!r} is a number in a non-standard form (write an IPv4 address as four "
                "decimal numbers, e.g. 192.0.2.1)"
            )
        return None
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return f"the host {name[:100]!r} is not a valid international domain name"
    ascii_name = ascii_name.lower().rstrip(".")
    if len(ascii_name) > 253 or not all(_LABEL.match(label) for label in ascii_name.split(".")):
        return f"the host {name[:100]!r} is not a valid host name"
    return None


def parse_url(url: str) -> httpx.URL:
    """``url`` as httpx reads it, or a FetchError saying why it cannot be fetched."""
    url = url.strip()
    problem = url_problem(url)
    if problem is not None:
        raise FetchError(f"not a usable http(s) URL: {problem}")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError, ValueError) as error:
        raise FetchError(f"not a usable http(s) URL: {error}") from None
    _check_scheme(parsed)
    return parsed


async def vet(host: str, port: int, policy: NetworkPolicy) -> str:
    """Resolve ``host`` and return an address to connect to, or raise FetchError."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as error:
        raise FetchError(f"cannot resolve host {host[:100]!r}") from error
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise FetchError(f"cannot resolve host {host[:100]!r}")
    for address in addresses:
        reason = policy.refusal(address)
        if reason is not None:
            raise AddressRefused(f"URL resolves to {reason} ({address}); not allowed")
    return str(addresses[0])


def _check_scheme(url: httpx.URL) -> None:
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchError(f"only http(s) URLs may be fetched, not {str(url)[:100]!r}")


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    policy: NetworkPolicy,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """Send one request to a vetted address, following up to three redirects, each vetted again.

    The response is streamed: read it with ``aiter_bytes`` and close it.
    """
    target = parse_url(url)
    for _ in range(MAX_REDIRECTS + 1):
        host = target.raw_host.decode("ascii")
        port = target.port or (443 if target.scheme == "https" else 80)
        address = await vet(host, port, policy)
        try:
            request = client.build_request(
                method,
                target.copy_with(host=address),
                content=content,
                headers={**(headers or {}), "Host": target.netloc.decode("ascii")},
                timeout=timeout,
                extensions={"sni_hostname": host},
            )
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeError, ValueError) as error:
            raise FetchError(f"not a usable http(s) URL: {type(error).__name__}: {error}") from None
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException as error:
            raise FetchError(f"timed out after {timeout:g} s") from error
        except httpx.UnsupportedProtocol as error:
            raise FetchError("only http(s) URLs may be fetched") from error
        except httpx.LocalProtocolError as error:
            raise FetchError(f"the request to {host} could not be made: {error}") from error
        except httpx.RemoteProtocolError as error:
            if "location header" in str(error):  # httpx reads a redirect's target even when not following
                raise FetchError(f"{host} redirected to an unusable URL: {error}") from error
            raise FetchError(f"{host} did not answer with valid HTTP: {error}") from error
        except httpx.HTTPError as error:
            raise FetchError(f"cannot connect to {host}: {type(error).__name__}") from error
        if not response.is_redirect or method != "GET":
            return response
        await response.aclose()
        try:
            joined = str(target.join(response.headers["location"]))
        except (httpx.InvalidURL, UnicodeError, ValueError) as error:
            raise FetchError(f"{host} redirected to an unusable URL: {error}") from None
        try:
            target = parse_url(joined)
        except FetchError as error:
            raise FetchError(f"{host} redirected to an unusable URL: {error}") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def fetch_bytes(url: str, policy: NetworkPolicy, max_bytes: int, timeout: float = 20.0) -> bytes:
    """GET ``url`` through the guard; at most ``max_bytes``, within ``timeout`` seconds overall."""
    host = parse_url(url).host
    async with httpx.AsyncClient() as client:
        try:
            async with asyncio.timeout(timeout):
                response = await send(client, "GET", url, policy, timeout=timeout)
                try:
                    if response.status_code != 200:
                        raise FetchError(f"HTTP {response.status_code} from {host}")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise FetchError(f"larger than the {max_bytes // (1024 * 1024)} MB limit")
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    await response.aclose()
        except TimeoutError as error:
            raise FetchError(f"timed out after {timeout:g} s") from error
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as error:
            raise FetchError(f"download failed: {type(error).__name__}") from error
