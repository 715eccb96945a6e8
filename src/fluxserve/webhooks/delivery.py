"""Durable webhook delivery from the outbox (``db/outbox.py``), retried on a backoff schedule kept in the
database.

A dispatcher (any number, in any API process) leases due rows, POSTs the job's result as its dialect
renders it, signed with the key's secret, and records the outcome. Targets are reached
through the SSRF guard, with a timeout, concurrently: a slow or dead target holds up nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import Engine

from fluxserve.db import outbox
from fluxserve.db.connection import utcnow
from fluxserve.errors import FetchError
from fluxserve.safety.fetch import NetworkPolicy, send
from fluxserve.webhooks.signing import signed_headers

log = logging.getLogger("fluxserve.webhooks")

DEFAULT_BACKOFF = (5.0, 30.0, 120.0, 300.0, 900.0)


class WebhookDispatcher:
    def __init__(
        self,
        database: Engine,
        payload_for: Callable[[str], dict[str, Any] | None],
        *,
        policy: NetworkPolicy,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        timeout: float = 10.0,
        poll_seconds: float = 0.5,
        concurrency: int = 8,
    ) -> None:
        self._database = database
        self._payload_for = payload_for
        self._policy = policy
        self._backoff = list(backoff)
        self._timeout = timeout
        self._poll = poll_seconds
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient() as client:
            while not stop.is_set():
                try:
                    free = self._concurrency - len(self._in_flight)
                    for delivery in await asyncio.to_thread(self._lease, free) if free else []:
                        task = asyncio.create_task(self._attempt(client, delivery))
                        self._in_flight.add(task)
                        task.add_done_callback(self._in_flight.discard)
                except Exception:
                    log.exception("webhook dispatcher poll failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._poll)
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _lease(self, limit: int) -> list[dict[str, Any]]:
        until = utcnow() + timedelta(seconds=self._timeout + 30)
        with self._database.begin() as conn:
            return outbox.lease(conn, limit, until)

    async def _attempt(self, client: httpx.AsyncClient, delivery: dict[str, Any]) -> None:
        attempt = delivery["attempts"] + 1
        status_code: int | None = None
        error: str | None = None
        async with self._slots:
            try:
                payload = await asyncio.to_thread(self._payload_for, delivery["job_id"])
                if payload is None:
                    raise FetchError("job no longer exists")
                body = json.dumps(payload, separators=(",", ":"))
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": "fluxserve-webhooks",
                    **signed_headers(delivery["webhook_secret"], delivery["id"], utcnow(), body),
                }
                async with asyncio.timeout(self._timeout):
                    response = await send(
                        client, "POST", delivery["url"], self._policy,
                        content=body.encode(), headers=headers, timeout=self._timeout,
                    )  # fmt: skip
                    await response.aclose()
                status_code = response.status_code
                if not response.is_success:
                    error = f"HTTP {status_code}"
            except TimeoutError:
                error = f"timed out after {self._timeout:g} s"
            except FetchError as exc:
                error = str(exc)
            except Exception as exc:
                log.exception("webhook attempt crashed")
                error = type(exc).__name__
        await asyncio.to_thread(self._record, delivery, attempt, status_code, error)

    def _record(
        self, delivery: dict[str, Any], attempt: int, status_code: int | None, error: str | None
    ) -> None:
        retry_at = None
        if error is not None and attempt <= len(self._backoff):
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
