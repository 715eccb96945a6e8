"""A Replicate prediction's webhooks, written into the outbox (``db/outbox.py``) by the job transactions that
cause them, as a job's own completion webhook is: the claim that starts a prediction's first job writes its
``start`` delivery, the finish of each of its jobs an ``output`` delivery, and the finish of its last job
the ``completed`` one. A crash therefore loses none, and none is written twice.

A delivery names the job whose change caused it; its body is the whole prediction as it stands when it is
sent (Replicate's webhooks carry the prediction object too).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, update

from fluxserve.db import outbox
from fluxserve.db.connection import utcnow
from fluxserve.db.tables import predictions

START, OUTPUT, LOGS, COMPLETED = "start", "output", "logs", "completed"
EVENTS = (START, OUTPUT, LOGS, COMPLETED)
DEFAULT_EVENTS = (OUTPUT, COMPLETED)  # Replicate without a filter: each new output, and the end
_P = predictions.c


def wanted(events: str | None, event: str) -> bool:
    """Whether a prediction's ``webhook_events`` (comma-separated, None: the default) asks for ``event``."""
    return event in (events.split(",") if events else DEFAULT_EVENTS)


def started(conn: Connection, first_jobs: Mapping[str, str]) -> None:
    """Jobs of these predictions (prediction id -> a claimed job's id) were claimed: for each prediction
    not started before, mark it started and write its ``start`` delivery. Call it inside the claim."""
    if not first_jobs:
        return
    rows = conn.execute(
        update(predictions)
        .where(_P.id.in_(list(first_jobs)), _P.started_at.is_(None))
        .values(started_at=utcnow())
        .returning(_P.id, _P.key_id, _P.webhook, _P.webhook_events)
    ).all()
    for row in rows:
        if row.webhook and wanted(row.webhook_events, START):
            outbox.enqueue(conn, first_jobs[row.id], row.key_id, row.webhook)


def ended(conn: Connection, prediction_id: str, job_id: str, succeeded: bool) -> None:
    """One of the prediction's jobs ended: count it (the row's update also serialises concurrent finishes
    of one prediction) and write its ``output`` delivery when it made an image, or the ``completed`` one
    when it was the last. Call it inside the finish."""
    row = conn.execute(
        update(predictions)
        .where(_P.id == prediction_id)
        .values(ended=_P.ended + 1)
        .returning(_P.key_id, _P.webhook, _P.webhook_events, _P.ended, _P.outputs)
    ).first()
    if row is None or not row.webhook:
        return
    event = COMPLETED if row.ended >= row.outputs else OUTPUT if succeeded else None
    if event is not None and wanted(row.webhook_events, event):
        outbox.enqueue(conn, job_id, row.key_id, row.webhook)
