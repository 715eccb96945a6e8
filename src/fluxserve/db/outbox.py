"""The webhook outbox: one row per delivery, written in the transaction that ends the job, so that no
notification is lost to a crash; dispatchers lease due rows and record each attempt's outcome."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from fluxserve.db.connection import utcnow
from fluxserve.db.tables import api_keys, webhook_deliveries

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_D = webhook_deliveries.c


def enqueue(conn: Connection, job_id: str, key_id: str, url: str) -> None:
    """Record a delivery, due now; call it inside the transaction that ends the job."""
    now = utcnow()
    conn.execute(
        insert(webhook_deliveries).values(
            id=str(uuid.uuid4()),
            job_id=job_id,
            key_id=key_id,
            url=url,
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def lease(
    conn: Connection,
    limit: int,
    until: datetime,
    *,
    skip_keys: Collection[str] = (),
    accept: Callable[[Mapping[str, Any]], bool] | None = None,
    scan: int | None = None,
) -> list[dict[str, Any]]:
    """Take up to ``limit`` due deliveries (with the key's signing secret) by moving their next attempt to
    ``until``: other dispatchers skip them, and a crashed dispatcher's lease simply runs out.

    Deliveries of ``skip_keys`` are not looked at; of the ``scan`` oldest due others (default ``limit``),
    those ``accept`` turns down stay due, so a dispatcher can keep its per-key and per-host caps without
    holding rows it cannot start."""
    due = (
        select(webhook_deliveries, api_keys.c.webhook_secret)
        .join(api_keys, api_keys.c.id == _D.key_id)
        .where(_D.status == PENDING, _D.next_attempt_at <= utcnow())
        .order_by(_D.next_attempt_at)
        .limit(max(limit, scan or 0))
    )
    if skip_keys:
        due = due.where(_D.key_id.not_in(list(skip_keys)))
    leased: list[dict[str, Any]] = []
    for mapping in conn.execute(due).mappings().all():
        if len(leased) >= limit:
            break
        row: dict[str, Any] = dict(mapping)
        if accept is not None and not accept(row):
            continue
        taken = conn.execute(
            update(webhook_deliveries)
            .where(_D.id == row["id"], _D.status == PENDING, _D.next_attempt_at == row["next_attempt_at"])
            .values(next_attempt_at=until)
        )
        if taken.rowcount == 1:
            leased.append(row)
    return leased


def defer(conn: Connection, delivery_ids: Collection[str], until: datetime) -> None:
    """Move pending deliveries' next attempt to ``until`` without counting an attempt (their target is
    being backed off)."""
    if delivery_ids:
        conn.execute(
            update(webhook_deliveries)
            .where(_D.id.in_(list(delivery_ids)), _D.status == PENDING, _D.next_attempt_at < until)
            .values(next_attempt_at=until)
        )


def record(
    conn: Connection,
    delivery_id: str,
    attempt: int,
    status_code: int | None,
    error: str | None,
    retry_at: datetime | None,
) -> str:
    """Record an attempt: delivered without an error, retried at ``retry_at``, or failed for good without
    one. Returns the delivery's new status."""
    values: dict[str, Any] = {"attempts": attempt, "last_status_code": status_code, "last_error": error}
    if error is None:
        values.update(status=DELIVERED, delivered_at=utcnow())
    elif retry_at is None:
        values.update(status=FAILED)
    else:
        values.update(next_attempt_at=retry_at)
    conn.execute(update(webhook_deliveries).where(_D.id == delivery_id).values(values))
    return str(values.get("status", PENDING))
