"""The ``predictions`` table (Replicate's predictions, api/replicate.py): written at submit, read with the
prediction's jobs. Its webhooks are written by the job transactions (db/predictions.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from fluxserve.core.prediction import Prediction
from fluxserve.db.connection import as_utc, reconnecting, utcnow
from fluxserve.db.tables import jobs, predictions
from fluxserve.jobs.store import JobReads

_P = predictions.c


class PredictionStore:
    def __init__(self, database: Engine, jobs_store: JobReads) -> None:
        self._database = database
        self._reads = database.execution_options(isolation_level="AUTOCOMMIT")
        self._jobs = jobs_store

    @reconnecting
    def create(self, prediction: Prediction) -> Prediction:
        """Write the row before its jobs (they name it); :meth:`drop` takes it back when they are refused."""
        prediction.created_at = utcnow()
        with self._database.begin() as conn:
            conn.execute(
                insert(predictions).values(
                    id=prediction.id, key_id=prediction.key_id, model=prediction.model,
                    input=prediction.input, outputs=prediction.outputs, ended=0, webhook=prediction.webhook,
                    webhook_events=prediction.webhook_events, created_at=prediction.created_at,
                )
            )  # fmt: skip
        return prediction

    @reconnecting
    def drop(self, prediction_id: str) -> None:
        """Delete a prediction none of whose jobs was written (the submit was refused)."""
        with self._database.begin() as conn:
            conn.execute(delete(predictions).where(_P.id == prediction_id))

    def get(self, prediction_id: str, key_id: str | None = None) -> Prediction | None:
        """The prediction with its jobs; None when there is none (of this key, with ``key_id``)."""
        query = select(predictions).where(_P.id == prediction_id)
        if key_id is not None:
            query = query.where(_P.key_id == key_id)
        found = self._read(query)
        return found[0] if found else None

    def page(self, key_id: str, after: str | None, limit: int) -> tuple[list[Prediction], bool]:
        """The key's predictions, newest first, after the one with id ``after`` (a cursor); and whether
        more follow."""
        query = select(predictions).where(_P.key_id == key_id)
        if after is not None:
            mark = select(_P.created_at).where(_P.id == after, _P.key_id == key_id).scalar_subquery()
            query = query.where((_P.created_at < mark) | ((_P.created_at == mark) & (_P.id < after)))
        found = self._read(query.order_by(_P.created_at.desc(), _P.id.desc()).limit(limit + 1))
        return found[:limit], len(found) > limit

    @reconnecting
    def _read(self, query: Any) -> list[Prediction]:
        with self._reads.connect() as conn:
            rows = conn.execute(query).mappings().all()
            ids = [row["id"] for row in rows]
            owned = conn.execute(
                select(jobs.c.prediction_id, jobs.c.id)
                .where(jobs.c.prediction_id.in_(ids))
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all() if ids else []  # fmt: skip
        members: dict[str, list[str]] = {}
        for prediction_id, job_id in owned:
            members.setdefault(prediction_id, []).append(job_id)
        return [self._prediction(row, members.get(row["id"], ())) for row in rows]

    def _prediction(self, row: Any, job_ids: Sequence[str]) -> Prediction:
        return Prediction(
            id=row["id"],
            key_id=row["key_id"],
            model=row["model"],
            input=row["input"],
            outputs=row["outputs"],
            created_at=as_utc(row["created_at"]) or utcnow(),
            started_at=as_utc(row["started_at"]),
            webhook=row["webhook"],
            webhook_events=row["webhook_events"],
            jobs=[job for job_id in job_ids if (job := self._jobs.get(job_id)) is not None],
        )
