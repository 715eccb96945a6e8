"""The credit ledger: a job's price is held at submit and either kept (success) or given back.

Credits are integer hundredths in the database, so 2.5-credit models add up exactly; a key whose balance
is NULL is unlimited. Each function works inside the caller's transaction, and each change it makes is
also appended to ``credit_ledger`` (kind, signed amount, the job or the operator, the time), so that a
finite balance is always the sum of its key's entries and ``fluxserve usage`` can say where credits went.
Entries are written for unlimited keys too (their usage counts), though no balance moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.sql.elements import BindParameter

from fluxserve.db.connection import as_utc, utcnow
from fluxserve.db.tables import api_keys, credit_ledger

_BALANCE = api_keys.c.credits_hundredths
_COST: BindParameter[int] = bindparam("cost")
# Built once: every submit runs it, and building it per call cost more CPU than running it.
_HOLD = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("key_id"), _BALANCE.is_(None) | (_COST <= _BALANCE))
    .values(credits_hundredths=_BALANCE - _COST)
)


# Built once, as _HOLD: every submit and every finish appends an entry.
_APPEND = insert(credit_ledger)


def to_hundredths(credits: Decimal) -> int:
    return int((credits * 100).to_integral_value())


def from_hundredths(value: int) -> Decimal:
    return Decimal(value) / 100


def hold(
    conn: Connection,
    key_id: str,
    amount: Decimal,
    *,
    job_id: str | None = None,
    model: str | None = None,
    operator: str | None = None,
) -> bool:
    """Take ``amount`` from the key's balance; False (and nothing taken) when it does not cover it. A
    hold for a job; with ``operator`` instead, credits taken by hand (a ``take`` entry).

    Touching the key's row also serialises submits of one key (a row lock on PostgreSQL, the write lock
    on SQLite), so checks made after it in the same transaction cannot race another submit of that key.
    """
    cost = to_hundredths(amount)
    held = conn.execute(_HOLD, {"key_id": key_id, "cost": cost})
    if held.rowcount == 1:
        kind = "take" if operator is not None else "hold"
        _append(conn, key_id, kind, -cost, job_id=job_id, model=model, operator=operator)
    return held.rowcount == 1


def settle(
    conn: Connection,
    key_id: str,
    held: Decimal,
    charged: bool,
    *,
    job_id: str | None = None,
    model: str | None = None,
) -> None:
    """End a hold: kept when the job is charged (a ``settle`` entry of 0), given back otherwise (failure,
    moderation, cancel: a ``refund``)."""
    if charged:
        _append(conn, key_id, "settle", 0, job_id=job_id, model=model)
    else:
        add(conn, key_id, held, kind="refund", job_id=job_id, model=model)


def reprice(
    conn: Connection,
    key_id: str,
    held: Decimal,
    cost: Decimal,
    *,
    job_id: str | None = None,
    model: str | None = None,
) -> None:
    """Bring a hold down to ``cost`` once a job's price is known exactly (a megapixel-priced job whose
    URL inputs were held at the 4 MP bound): the difference goes back to the key (a ``refund``). A price
    above the hold is never taken (``pricing.requote`` caps it at the quote), so a balance cannot go
    below zero here."""
    if cost < held:
        add(conn, key_id, held - cost, kind="refund", job_id=job_id, model=model)


def add(
    conn: Connection,
    key_id: str,
    amount: Decimal,
    *,
    kind: str = "topup",
    job_id: str | None = None,
    model: str | None = None,
    operator: str | None = None,
) -> bool:
    """Add to a finite balance; False for an unlimited (or unknown) key, which stays as it is (a job's
    refund to an unlimited key is still an entry: its usage nets out)."""
    changed = conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, _BALANCE.is_not(None))
        .values(credits_hundredths=_BALANCE + to_hundredths(amount))
    )
    if changed.rowcount == 1 or job_id is not None:
        _append(conn, key_id, kind, to_hundredths(amount), job_id=job_id, model=model, operator=operator)
    return changed.rowcount == 1


def set_balance(conn: Connection, key_id: str, credits: Decimal | None, operator: str | None = None) -> bool:
    """Set a key's balance outright (None: unlimited); False for an unknown key. The ``set`` entry is the
    difference from the key's entries so far, so that they add up to the new balance."""
    value = None if credits is None else to_hundredths(credits)
    if (
        conn.execute(
            update(api_keys).where(api_keys.c.id == key_id).values(credits_hundredths=value)
        ).rowcount
        != 1
    ):
        return False
    _append(conn, key_id, "set", (value or 0) - entries_sum(conn, key_id), operator=operator)
    return True


def entries_sum(conn: Connection, key_id: str) -> int:
    """The sum of a key's entries, in hundredths: its balance, when the balance is finite."""
    return int(
        conn.execute(
            select(func.coalesce(func.sum(credit_ledger.c.amount_hundredths), 0)).where(
                credit_ledger.c.key_id == key_id
            )
        ).scalar_one()
    )


def _append(
    conn: Connection,
    key_id: str,
    kind: str,
    hundredths: int,
    *,
    job_id: str | None = None,
    model: str | None = None,
    operator: str | None = None,
) -> None:
    conn.execute(
        _APPEND,
        {
            "key_id": key_id, "kind": kind, "amount_hundredths": hundredths, "job_id": job_id,
            "model": model, "operator": operator, "created_at": utcnow(),
        },
    )  # fmt: skip


JOB_KINDS = ("hold", "settle", "refund", "summary")  # what jobs cost; the rest are operators' changes


@dataclass(frozen=True)
class UsageLine:
    """Credits that moved for one key in one group (a UTC day or a model) since a time."""

    group: str
    key: str
    charged: Decimal  # what its jobs cost, refunds netted out
    jobs: int  # jobs charged (a summary entry counts the jobs it folded)
    operator: Decimal  # the net of top-ups, takes and sets

    def as_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "key": self.key,
            "charged": str(self.charged),
            "jobs": self.jobs,
            "operator": str(self.operator),
        }


def usage(conn: Connection, since: datetime, by: str, key_id: str | None = None) -> list[UsageLine]:
    """Usage from the ledger per key and UTC day (``by="day"``) or model (``by="model"``)."""
    query = (
        select(api_keys.c.name, credit_ledger)
        .join(api_keys, api_keys.c.id == credit_ledger.c.key_id)
        .where(credit_ledger.c.created_at >= since)
        .order_by(credit_ledger.c.id)
    )
    if key_id is not None:
        query = query.where(credit_ledger.c.key_id == key_id)
    totals: dict[tuple[str, str], list[int]] = {}
    for row in conn.execute(query):
        group = _day(row.created_at) if by == "day" else (row.model or "(operator)")
        line = totals.setdefault((group, row.name), [0, 0, 0])
        if row.kind in JOB_KINDS:
            line[0] -= row.amount_hundredths
            line[1] += row.jobs if row.kind == "summary" else int(row.kind == "settle")
        else:
            line[2] += row.amount_hundredths
    return [
        UsageLine(group, key, from_hundredths(charged), jobs, from_hundredths(operator))
        for (group, key), (charged, jobs, operator) in sorted(totals.items())
    ]


def fold(conn: Connection, job_ids: Sequence[str]) -> int:
    """Replace the entries of ``job_ids`` (jobs about to be deleted) by one ``summary`` entry per key,
    model and UTC day, keeping each key's sum and its usage by day and model; the entries folded."""
    rows = conn.execute(select(credit_ledger).where(credit_ledger.c.job_id.in_(job_ids))).all()
    groups: dict[tuple[str, str | None, str], tuple[int, set[str]]] = {}
    for row in rows:
        group = (row.key_id, row.model, _day(row.created_at))
        amount, charged = groups.get(group, (0, set()))
        settled = {row.job_id} if row.kind == "settle" else set()
        groups[group] = (amount + row.amount_hundredths, charged | settled)
    for (key_id, model, day), (amount, charged) in groups.items():
        conn.execute(
            insert(credit_ledger).values(
                key_id=key_id, kind="summary", amount_hundredths=amount, model=model, operator="prune",
                jobs=len(charged), created_at=datetime.fromisoformat(day).replace(tzinfo=UTC),
            )
        )  # fmt: skip
    conn.execute(delete(credit_ledger).where(credit_ledger.c.id.in_([row.id for row in rows])))
    return len(rows)


def _day(created_at: datetime) -> str:
    moment = as_utc(created_at)
    assert moment is not None
    return moment.date().isoformat()
