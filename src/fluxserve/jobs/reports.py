"""What keys have been doing, for people: recent jobs and credits spent per key, model and day.

Read-only queries on the job table (the store's roles are for the job's life; these are reports, not
liveness), used by ``fluxserve jobs``, ``fluxserve credits`` and the playground's gallery.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, case, func, select

from fluxserve.core.job import JobStatus
from fluxserve.db import ledger
from fluxserve.db.connection import as_utc, utcnow
from fluxserve.db.tables import api_keys, jobs


@dataclass(frozen=True)
class JobLine:
    id: str
    key: str  # the key's name
    model: str
    status: JobStatus
    size: str | None
    seed: int
    cost: Decimal  # what the job costs when charged (only a success is)
    prompt: str
    result_key: str | None  # its image while kept (None before success and after retention)
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class UsageLine:
    day: str  # YYYY-MM-DD (UTC) of the jobs' submission
    key_id: str
    key: str  # its name
    model: str
    jobs: int
    images: int  # jobs that succeeded: the ones charged
    credits: Decimal  # credits charged

    def as_json(self) -> dict[str, object]:
        return {
            "day": self.day,
            "key": self.key,
            "model": self.model,
            "jobs": self.jobs,
            "images": self.images,
            "credits": str(self.credits),
        }


def recent_jobs(
    database: Engine, key_id: str | None = None, statuses: Collection[JobStatus] = (), limit: int = 20
) -> list[JobLine]:
    """The newest jobs first, of one key or all, in some statuses or any."""
    query = (
        select(jobs, api_keys.c.name.label("key_name"))
        .join(api_keys, api_keys.c.id == jobs.c.key_id)
        .order_by(jobs.c.created_at.desc())
        .limit(limit)
    )
    if key_id is not None:
        query = query.where(jobs.c.key_id == key_id)
    if statuses:
        query = query.where(jobs.c.status.in_([status.value for status in statuses]))
    with database.connect() as conn:
        rows = conn.execute(query).all()
    return [
        JobLine(
            id=row.id,
            key=row.key_name,
            model=row.model,
            status=JobStatus(row.status),
            size=f"{row.width}x{row.height}" if row.width and row.height else None,
            seed=row.seed,
            cost=ledger.from_hundredths(row.cost_hundredths),
            prompt=row.prompt,
            result_key=row.result_key if row.result_expired_at is None else None,
            created_at=as_utc(row.created_at),  # type: ignore[arg-type]
            finished_at=as_utc(row.finished_at),
        )
        for row in rows
    ]


def usage(database: Engine, key_id: str | None = None, days: int = 7) -> list[UsageLine]:
    """Jobs, images and credits charged per day, key and model over the last ``days`` days, newest first."""
    charged = [status.value for status in JobStatus if status.is_charged]
    day = func.date(jobs.c.created_at)
    query = (
        select(
            day.label("day"),
            jobs.c.key_id,
            api_keys.c.name.label("key_name"),
            jobs.c.model,
            func.count().label("jobs"),
            func.sum(case((jobs.c.status.in_(charged), 1), else_=0)).label("images"),
            func.sum(case((jobs.c.status.in_(charged), jobs.c.cost_hundredths), else_=0)).label("spent"),
        )
        .join(api_keys, api_keys.c.id == jobs.c.key_id)
        .where(jobs.c.created_at >= utcnow() - timedelta(days=days))
        .group_by(day, jobs.c.key_id, api_keys.c.name, jobs.c.model)
        .order_by(day.desc(), api_keys.c.name, jobs.c.model)
    )
    if key_id is not None:
        query = query.where(jobs.c.key_id == key_id)
    with database.connect() as conn:
        rows = conn.execute(query).all()
    return [
        UsageLine(
            str(row.day),
            row.key_id,
            row.key_name,
            row.model,
            row.jobs,
            int(row.images),
            ledger.from_hundredths(row.spent),
        )
        for row in rows
    ]


def totals(lines: list[UsageLine], key_id: str) -> dict[str, object]:
    """One key's jobs and credits charged over the lines."""
    mine = [line for line in lines if line.key_id == key_id]
    return {"jobs": sum(line.jobs for line in mine), "spent": str(sum(line.credits for line in mine))}
