"""SSRF-guarded HTTP for URL image inputs and webhook targets.

Every hop's host is resolved first and refused if any address is loopback, private, link-local,
CGNAT, multicast, reserved or unspecified (IPv4, IPv6, and IPv4 mapped into IPv6), unless it lies
in a network the operator allowed. The connection then goes to the vetted address itself, with the
original Host header and TLS server name, so a DNS answer that changes in between cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from fluxserve.errors import FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_REDIRECTS = 3


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


async def vet(host: str, port: int, policy: NetworkPolicy) -> str:
    """Resolve ``host`` and return an address to connect to, or raise FetchError."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise FetchError(f"cannot resolve host {host!r}") from error
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise FetchError(f"cannot resolve host {host!r}")
    for address in addresses:
        reason = policy.refusal(address)
        if reason is not None:
            raise FetchError(f"URL resolves to {reason} ({address}); not allowed")
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
    target = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        _check_scheme(target)
        port = target.port or (443 if target.scheme == "https" else 80)
        address = await vet(target.host, port, policy)
        request = client.build_request(
            method,
            target.copy_with(host=address),
            content=content,
            headers={**(headers or {}), "Host": target.netloc.decode("ascii")},
            timeout=timeout,
            extensions={"sni_hostname": target.host},
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException as error:
            raise FetchError(f"timed out after {timeout:g} s") from error
        except httpx.HTTPError as error:
            raise FetchError(f"cannot connect to {target.host}: {type(error).__name__}") from error
        if not response.is_redirect or method != "GET":
            return response
        await response.aclose()
        target = target.join(response.headers["location"])
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def fetch_bytes(url: str, policy: NetworkPolicy, max_bytes: int, timeout: float = 20.0) -> bytes:
    """GET ``url`` through the guard; at most ``max_bytes``, within ``timeout`` seconds overall."""
    async with httpx.AsyncClient() as client:
        try:
            async with asyncio.timeout(timeout):
                response = await send(client, "GET", url, policy, timeout=timeout)
                try:
                    if response.status_code != 200:
                        raise FetchError(f"HTTP {response.status_code} from {httpx.URL(url).host}")
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
        except httpx.HTTPError as error:
            raise FetchError(f"download failed: {type(error).__name__}") from error
