"""Durable webhook delivery from the outbox (``db/outbox.py``), retried on a backoff schedule kept in the
database.

A dispatcher (any number, in any API process) leases due rows (woken by the change feed when a job with a
webhook ends, and polling every ``poll_seconds`` for retries whose time comes), reads the job through the
store's :class:`~fluxserve.jobs.store.JobReads` role, POSTs it as its dialect renders it, signed with the
key's secret, and records the outcome. Targets are reached
through the SSRF guard, with a timeout, concurrently: a slow or dead target holds up nothing else.

Fairness, per dispatcher: at most ``per_key`` deliveries of one API key and ``per_host`` to one host are in
flight (rows over a cap stay due for the next poll, so a key whose targets never answer cannot take the
slots another key's webhooks need); a target (host and port) whose connections keep failing (timeouts,
refusals, ``PAUSE_AFTER`` in a row) is paused, its due deliveries moved past the pause without counting an
attempt. A refusal by the network policy (a private address) is final: failed after one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from fluxserve.core.job import JobRecord
from fluxserve.db import outbox
from fluxserve.db.connection import utcnow
from fluxserve.errors import AddressRefused, FetchError, UndeliverableWebhook
from fluxserve.jobs.store import JobReads
from fluxserve.safety.fetch import NetworkPolicy, send
from fluxserve.webhooks.signing import signed_headers, task_headers

log = logging.getLogger("fluxserve.webhooks")

DEFAULT_BACKOFF = (5.0, 30.0, 120.0, 300.0, 900.0)
PAUSE_AFTER = 3  # connection failures in a row that pause a target: backoff[0], doubling up to backoff[-1]


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _target(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    except ValueError:
        return ""


@dataclass(frozen=True)
class Payload:
    """What one delivery sends: the job as its dialect renders it, and the ``webhook_secret`` a vendor task
    was submitted with (it adds the vendor's own signature headers)."""

    body: dict[str, Any]
    task_secret: str | None = None


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Return when one of ``events`` is set, or after ``timeout``."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class WebhookDispatcher:
    def __init__(
        self,
        database: Engine,
        jobs: JobReads,
        payload_for: Callable[[JobRecord], Payload],
        *,
        policy: NetworkPolicy,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        timeout: float = 10.0,
        poll_seconds: float = 5.0,
        concurrency: int = 32,
        per_key: int = 4,
        per_host: int = 2,
    ) -> None:
        """``database`` holds the outbox (``db/outbox.py``); ``jobs`` reads a delivery's job (once an
        attempt), and ``payload_for`` renders it."""
        self._database = database
        self._jobs = jobs
        self._payload_for = payload_for
        self._policy = policy
        self._backoff = list(backoff)
        self._timeout = timeout
        self._poll = poll_seconds
        self._concurrency = concurrency
        self._per_key = per_key
        self._per_host = per_host
        self._in_flight: set[asyncio.Task[None]] = set()
        self._keys: Counter[str] = Counter()  # in flight per API key
        self._hosts: Counter[str] = Counter()  # in flight per target host
        self._failures: Counter[str] = Counter()  # connection failures in a row per target (host:port)
        self._paused: dict[str, datetime] = {}  # target -> until
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """A delivery is due now (a job with a webhook ended; called from any thread): lease at once
        rather than at the next poll, which stays only for retries whose time comes."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        async with httpx.AsyncClient() as client:
            while not stop.is_set():
                self._wake.clear()
                try:
                    free = self._concurrency - len(self._in_flight)
                    if free > 0:
                        leased = await asyncio.to_thread(
                            self._lease, free, Counter(self._keys), Counter(self._hosts), self._pauses()
                        )
                        for delivery in leased:
                            self._start(client, delivery)
                except Exception:
                    log.exception("webhook dispatcher poll failed")
                await _first(stop, self._wake, timeout=self._poll)
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _start(self, client: httpx.AsyncClient, delivery: dict[str, Any]) -> None:
        key, host = delivery["key_id"], _host(delivery["url"])
        self._keys[key] += 1
        self._hosts[host] += 1

        def done(task: asyncio.Task[None]) -> None:
            self._in_flight.discard(task)
            self._keys[key] -= 1
            self._hosts[host] -= 1
            for counter, name in ((self._keys, key), (self._hosts, host)):
                if counter[name] <= 0:
                    del counter[name]

        task = asyncio.create_task(self._attempt(client, delivery))
        self._in_flight.add(task)
        task.add_done_callback(done)

    def _pauses(self) -> dict[str, datetime]:
        now = utcnow()
        for target in [target for target, until in self._paused.items() if until <= now]:
            del self._paused[target]
        return dict(self._paused)

    def _lease(
        self, limit: int, keys: Counter[str], hosts: Counter[str], paused: Mapping[str, datetime]
    ) -> list[dict[str, Any]]:
        """Due deliveries within the caps (``keys`` and ``hosts``: what is in flight now); those of paused
        targets are deferred to the end of their pause."""
        until = utcnow() + timedelta(seconds=self._timeout + 30)
        deferred: dict[datetime, list[str]] = {}

        def accept(row: Mapping[str, Any]) -> bool:
            target = _target(row["url"])
            if target in paused:
                deferred.setdefault(paused[target], []).append(row["id"])
                return False
            key, host = row["key_id"], _host(row["url"])
            if keys[key] >= self._per_key or hosts[host] >= self._per_host:
                return False
            keys[key] += 1
            hosts[host] += 1
            return True

        full = {key for key, count in keys.items() if count >= self._per_key}
        with self._database.begin() as conn:
            leased = outbox.lease(conn, limit, until, skip_keys=full, accept=accept, scan=limit * 4 + 64)
            for paused_until, ids in deferred.items():
                outbox.defer(conn, ids, paused_until)
        return leased

    async def _attempt(self, client: httpx.AsyncClient, delivery: dict[str, Any]) -> None:
        attempt = delivery["attempts"] + 1
        status_code: int | None = None
        error: str | None = None
        final = False
        connected = False  # the target answered with HTTP (whatever the status)
        try:
            job = await asyncio.to_thread(self._jobs.get, delivery["job_id"])
            if job is None:
                raise UndeliverableWebhook("job no longer exists")
            payload = self._payload_for(job)
            body = json.dumps(payload.body, separators=(",", ":"))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "fluxserve-webhooks",
                **signed_headers(delivery["webhook_secret"], delivery["id"], utcnow(), body),
            }
            if payload.task_secret is not None:
                headers.update(task_headers(payload.task_secret, body))
            async with asyncio.timeout(self._timeout):
                response = await send(
                    client, "POST", delivery["url"], self._policy,
                    content=body.encode(), headers=headers, timeout=self._timeout,
                )  # fmt: skip
                await response.aclose()
            status_code = response.status_code
            connected = True
            if not response.is_success:
                error = f"HTTP {status_code}"
        except TimeoutError:
            error = f"timed out after {self._timeout:g} s"
        except (FetchError, UndeliverableWebhook) as exc:
            error = str(exc)
            final = isinstance(exc, AddressRefused | UndeliverableWebhook)  # a retry cannot change these
        except Exception as exc:
            log.exception("webhook attempt crashed")
            error = type(exc).__name__
        if not final:
            self._note(delivery["url"], connected)
        retry_at = await asyncio.to_thread(self._record, delivery, attempt, status_code, error, final)
        if retry_at is not None:  # this dispatcher wakes for its own retry; the poll catches the others'
            delay = (retry_at - utcnow()).total_seconds()
            asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake.set)

    def _note(self, url: str, connected: bool) -> None:
        """Count a target's connection failures in a row; pause it from the PAUSE_AFTER-th."""
        target = _target(url)
        if connected:
            self._failures.pop(target, None)
            return
        self._failures[target] += 1
        failures = self._failures[target]
        if failures >= PAUSE_AFTER:
            base = self._backoff[0] if self._backoff else DEFAULT_BACKOFF[0]
            longest = max(self._backoff, default=DEFAULT_BACKOFF[-1])
            seconds = min(base * 2 ** min(failures - PAUSE_AFTER, 20), max(base, longest))
            self._paused[target] = utcnow() + timedelta(seconds=seconds)

    def _record(
        self, delivery: dict[str, Any], attempt: int, status_code: int | None, error: str | None, final: bool
    ) -> datetime | None:
        """Write the attempt's outcome; when the next attempt is due, if there is one."""
        retry_at = None
        if error is not None and not final and attempt <= len(self._backoff):
            retry_at = utcnow() + timedelta(seconds=self._backoff[attempt - 1])
        with self._database.begin() as conn:
            outcome = outbox.record(conn, delivery["id"], attempt, status_code, error, retry_at)
        log.info(
            "webhook attempt",
            extra={
                "job_id": delivery["job_id"],
                "url": delivery["url"],
                "attempt": attempt,
                "status_code": status_code,
                "error": error,
                "outcome": outcome if outcome != outbox.PENDING else "retry",
            },
        )
        return retry_at
