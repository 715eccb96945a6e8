"""Response headers every answer needs. A ``Retry-After`` on every 429 and 503, whichever part refused
(the cause's own value when it set one, else ``FLUXSERVE_RETRY_AFTER_SECONDS``), so clients back off
rather than hammer. ``nosniff`` on every response; and on every HTML page (the playground, /docs, /redoc)
a Content-Security-Policy, a framing ban and a Referrer-Policy, so a page holding a key cannot be framed
to steal a click on Generate, run a script from elsewhere, or leak its URL to an image host.

The pages' scripts are files from this server; the one inline script (Swagger UI's start-up) is allowed by
its SHA-256, computed from the page as it is sent, so no ``'unsafe-inline'`` is needed for scripts. Styles
keep ``'unsafe-inline'``: ReDoc and Swagger UI inject theirs. Images may come from anywhere (a result URL
can be an S3 presigned URL on another host); requests from the page (``connect-src``) only go here.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
POLICY = (
    "default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
    "img-src * data: blob:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def content_security_policy(page: bytes) -> str:
    """The policy for ``page``: its inline scripts allowed by hash, nothing else inline."""
    digests = (hashlib.sha256(script).digest() for script in _INLINE_SCRIPT.findall(page))
    return POLICY.format(
        hashes="".join(f" 'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)
    )


BUSY = frozenset({429, 503})


class ResponseHeaders:
    """ASGI middleware adding the headers above; an HTML body is held until its end to hash its scripts
    (the pages are a few kilobytes)."""

    def __init__(self, app: ASGIApp, retry_after_seconds: int) -> None:
        self.app = app
        self.retry_after = str(retry_after_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        page: list[bytes] = []

        async def secured(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if message["status"] in BUSY and "retry-after" not in headers:
                    headers["Retry-After"] = self.retry_after
                if headers.get("content-type", "").startswith("text/html"):
                    start = message  # sent with the body, once the policy can name its scripts
                    return
            elif message["type"] == "http.response.body" and start is not None:
                page.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(page)
                headers = MutableHeaders(scope=start)
                headers["Content-Security-Policy"] = content_security_policy(body)
                headers.update(PAGE_HEADERS)
                await send(start)
                message = {"type": "http.response.body", "body": body}
            await send(message)

        await self.app(scope, receive, secured)
