"""Limits for a server that strangers can call: what a request may cost before the app does any work.

Two layers:

- :class:`RequestGuard`, an ASGI middleware in front of every route. It caps each body by route (submit
  routes take images, everything else a small JSON), checks a submit route's key from its headers before
  reading any of the body (401 in the reseller's shape, 403 in the vendor's; the verified key is left in
  the scope for the route, ``api/auth.verify``), and refuses a submit body with more JSON separators than
  any real request has before it is parsed on the event loop.
- :class:`AccessLog`, one line a request (uvicorn's own access log is off: it formats each line with
  more work than the request path should pay).
- :func:`http_protocol`, uvicorn's httptools protocol (the C parser) with what it lacks: a bound on the
  request head, a deadline for the headers and one for a body that stops arriving (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fluxserve.accounts.keys import KeyStore
from fluxserve.api.auth import BAD_BEARER, NO_BEARER, bearer_token, replicate_token, verify
from fluxserve.api.errors import (
    OPENAI_PREFIX,
    VENDOR_PREFIX,
    database_unavailable,
    error_response,
    openai_error,
)
from fluxserve.core.models import MODELS
from fluxserve.core.numbers import ascii_int
from fluxserve.core.pricing import format_credits
from fluxserve.jobs.outage import database_away

NATIVE_SUBMIT = frozenset({"/flux/generate", "/flux/edits"})  # the reseller's own format
RESELLER_SUBMIT = frozenset(f"/bfl/v1/{name}" for name in MODELS) | NATIVE_SUBMIT
OPENAI_SUBMIT = frozenset({"/v1/images/generations", "/v1/images/edits"})
VENDOR_SUBMIT = frozenset(f"/v1/{name}" for name in MODELS) | OPENAI_SUBMIT
REPLICATE_SUBMIT = frozenset(
    f"/v1/models/black-forest-labs/{spec.replicate}/predictions" for spec in MODELS.values() if spec.replicate
) | {"/v1/predictions", "/v1/files"}


CLOSE = {"connection": "close"}


def refusal(path: str, status: int, message: str) -> JSONResponse:
    """An early answer in the path's dialect; the connection is closed after it (the body is unread)."""
    return error_response(path, status, message, CLOSE)


def _size(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count >= 1024 * 1024 else f"{count // 1024} KiB"


class KeyRate:
    """Submits per key per minute in this process (a fixed window per key): an operator's cap on how fast
    one key may submit, off unless ``FLUXSERVE_KEY_REQUESTS_PER_MINUTE`` is set."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def wait(self, key_id: str) -> int:
        """0 when the key may submit now (and it is counted), else the whole seconds until it may."""
        now = self._clock()
        start, count = self._windows.get(key_id, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= self.per_minute:
            return max(1, math.ceil(start + 60 - now))
        if len(self._windows) > 100_000:  # bounded: windows that have ended go
            self._windows = {key: window for key, window in self._windows.items() if now - window[0] < 60}
        self._windows[key_id] = (start, count + 1)
        return 0


class HeldRequests:
    """Requests this process holds open while their jobs run (the OpenAI images routes' wait), across
    keys: beyond ``limit`` a request is refused before it submits anything. Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def acquire(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        self.held -= 1


class RequestGuard:
    """Per-route body caps, the key before the body, and a bound on a submit body's JSON structure.

    A submit's key is verified here (:func:`verify`: the cache, else the database in a thread), so that a
    request without a valid key is cheap; the route takes the answer from the scope instead of asking again.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        submit_max_bytes: int,
        other_max_bytes: int,
        max_separators: int,
        rate: KeyRate | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.submit_max_bytes = submit_max_bytes
        self.other_max_bytes = other_max_bytes
        self.max_separators = max_separators
        self.rate = rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        submit = scope["method"] == "POST" and (
            path in RESELLER_SUBMIT or path in VENDOR_SUBMIT or path in REPLICATE_SUBMIT
        )
        limit = self.submit_max_bytes if submit else self.other_max_bytes
        headers = Headers(scope=scope)
        declared = ascii_int(headers.get("content-length", ""), 19)  # the body counted below decides
        if declared is not None and declared > limit:
            message = f"body: {declared} bytes is over this route's {_size(limit)} limit"
            await refusal(path, 413, message)(scope, receive, send)
            return
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        if submit and (problem := await self._key_check(scope, path, headers, multipart)) is not None:
            await problem(scope, receive, send)
            return
        if multipart:  # uploads stream through, counted; the form parser spools each file to disk
            await self._stream(path, limit, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            event = await receive()
            if event["type"] != "http.request":  # the client went away
                return
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > limit:
                text = f"body: more than this route's {_size(limit)} limit"
                await refusal(path, 413, text)(scope, receive, send)
                return
            chunks.append(chunk)
            more = event.get("more_body", False)
        body = b"".join(chunks)
        if submit:
            # A separator count is a C loop over the bytes; parsing and validating a body with a million
            # fields would hold the event loop (and the GIL, even in a thread) for seconds. Multipart
            # bodies (image uploads) are binary: their forms have a few fields.
            separators = body.count(b",") + body.count(b":")
            if separators > self.max_separators:
                vendor = path.startswith(VENDOR_PREFIX) and not path.startswith(OPENAI_PREFIX)
                status = 422 if vendor else 400
                text = (
                    f"body: at most {self.max_separators} JSON separators (',' and ':') are accepted, "
                    f"this body has {separators}; a request has a few dozen fields"
                )
                await refusal(path, status, text)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)

    async def _stream(self, path: str, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a multipart body to the app as it arrives, never held whole (a 100 MB upload once cost
        the process 5 times that), and answer 413 instead of the app once it passes ``limit``."""
        size = 0
        over = False

        async def counted() -> Message:
            nonlocal size, over
            event = await receive()
            if event["type"] == "http.request":
                size += len(event.get("body", b""))
                if size > limit:
                    over = True
                    raise _BodyTooLarge
            return event

        async def unless_over(message: Message) -> None:
            if not over:  # the app's answer to a body cut short (a parse error) is replaced by the 413
                await send(message)

        with suppress(_BodyTooLarge):
            await self.app(scope, counted, unless_over)
        if over:
            await refusal(path, 413, f"body: more than this route's {_size(limit)} limit")(
                scope, receive, send
            )

    async def _key_check(
        self, scope: Scope, path: str, headers: Headers, upload: bool
    ) -> JSONResponse | None:
        """:meth:`_key_problem`, or a 503 when the database is away: out here, before the app's exception
        handlers, an error would reset the connection after a 500."""
        try:
            return await self._key_problem(scope, path, headers, upload)
        except Exception as error:
            if not database_away(error):
                raise
            return database_unavailable(path, error)

    async def _key_problem(
        self, scope: Scope, path: str, headers: Headers, upload: bool
    ) -> JSONResponse | None:
        """The submit's key refused from its headers alone: missing or unknown (401; the vendor's 403),
        or, for an upload, a balance below the cheapest price on the route (402), before any body is read."""
        openai, vendor = path.startswith(OPENAI_PREFIX), path.startswith(VENDOR_PREFIX)
        replicate = path in REPLICATE_SUBMIT  # Bearer or Token (api/replicate.py)
        if openai or replicate:
            raw = (replicate_token if replicate else bearer_token)(headers.get("authorization"))
        else:
            raw = headers.get("x-key" if vendor else "tt-api-key")
        key = await verify(scope, self.keys, raw) if raw else None
        if key is None and replicate:
            return refusal(path, 401, "You did not pass a valid authentication token (Bearer or Token)")
        if key is None and openai:
            message = BAD_BEARER if raw else NO_BEARER
            return openai_error(401, message, code="invalid_api_key", headers=CLOSE)
        if key is None and vendor:
            if not raw:
                return refusal(
                    path, 403, "Not authenticated - x-key header is missing; send your API key in it"
                )
            return refusal(
                path, 403, "Not authenticated - Invalid Authentication: x-key is not a valid API key"
            )
        if key is None:
            reason = "is not a valid API key" if raw else "header is missing; send your API key in it"
            return refusal(path, 401, f"TT-API-KEY {reason}")
        if self.rate is not None and (wait := self.rate.wait(key.id)):
            message = f"Too many requests: this server takes {self.rate.per_minute} a minute per key"
            later = {**CLOSE, "Retry-After": str(wait)}
            if openai:
                return openai_error(429, message, code="rate_limit_exceeded", headers=later)
            return error_response(path, 429, message, later)
        model = MODELS.get(path.rsplit("/", 1)[-1])  # the edit routes name it in the form: any model's
        cheapest = model.price if model else min(spec.price for spec in MODELS.values())
        if upload and key.credits is not None and key.credits < cheapest:
            message = (
                f"Not enough credits: this key has {format_credits(key.credits)} and the cheapest model on "
                f"this route costs {format_credits(cheapest)}; the upload was not read"
            )
            if openai:
                return openai_error(402, message, code="insufficient_quota", headers=CLOSE)
            return refusal(path, 402, message)
        return None


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` when a streamed body passes its route's limit."""


access_log = logging.getLogger("fluxserve.access")


class AccessLog:
    """One log line per request, when it ends: method, path with query (redacted by the log's formatter),
    status (0: no response was sent) and milliseconds; nothing at all when INFO is off for
    ``fluxserve.access``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            query = scope.get("query_string", b"")
            path = scope["path"] + ("?" + query.decode("latin-1") if query else "")
            elapsed = round((time.perf_counter() - start) * 1000, 1)
            access_log.info("%s %s %d", scope["method"], path, status, extra={"ms": elapsed})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; then the real channel (to see a disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


HEADER_TOO_LARGE = b"Request line and headers are larger than this server accepts."


def http_protocol(
    max_header_bytes: int, header_timeout: float, body_timeout: float
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol (the C parser) with the limits it lacks.

    - The request head (request line and headers) is at most ``max_header_bytes``, whether it arrives in
      one write or in many: httptools has no limit of its own, so the bytes are counted here and a larger
      head is answered 431 and its connection closed.
    - A request's headers must be complete within ``header_timeout`` seconds of the connection's opening
      (or of the previous response), and a body that stops arriving for ``body_timeout`` seconds is
      dropped (slowloris): uvicorn itself only times out idle keep-alive connections between requests.
    """

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        header_timer: asyncio.TimerHandle | None = None
        body_timer: asyncio.TimerHandle | None = None
        in_head = True  # reading a request's head (or waiting for one)
        head_bytes = 0  # bytes received while in the head, this request
        head_too_large = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.in_head:
                self.head_bytes += len(data)
            super().data_received(data)
            if self.transport.is_closing():
                self._cancel_timers()
            elif self.in_head and self.head_bytes > max_header_bytes:  # a head still not complete
                self.head_too_large = True
                self.send_400_response("")
            elif self.body_timer is not None:  # more of the body came: its deadline moves on
                self._arm_body_timer()

        def on_headers_complete(self) -> None:
            # The head came whole, possibly in one write with a body: measure what the parser saw.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > max_header_bytes:
                self.head_too_large = True
                raise ValueError("request head too large")  # stops the parser: send_400_response answers
            self.in_head = False
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().on_headers_complete()
            self._arm_body_timer()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.in_head, self.head_bytes = True, 0
            if self.body_timer is not None:
                self.body_timer.cancel()
                self.body_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.in_head and self.header_timer is None:
                self._arm_header_timer()  # the next request's head is due within the timeout

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request the parser refused; 431 for a head over the limit."""
            if not self.head_too_large:
                super().send_400_response(msg)
                return
            self._cancel_timers()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(HEADER_TOO_LARGE), HEADER_TOO_LARGE)
            )
            self.transport.close()

        def _arm_header_timer(self) -> None:
            self.header_timer = self.loop.call_later(header_timeout, self._close)

        def _arm_body_timer(self) -> None:
            if self.body_timer is not None:
                self.body_timer.cancel()
            self.body_timer = self.loop.call_later(body_timeout, self._body_stalled)

        def _body_stalled(self) -> None:
            self.body_timer = None
            if self.flow.read_paused:  # the app is not reading yet: the client is not to blame
                self._arm_body_timer()
                return
            self._close()

        def _close(self) -> None:
            self._cancel_timers()
            if not self.transport.is_closing():
                self.transport.close()

        def _cancel_timers(self) -> None:
            for timer in (self.header_timer, self.body_timer):
                if timer is not None:
                    timer.cancel()
            self.header_timer = self.body_timer = None

    return GuardedHttpToolsProtocol
