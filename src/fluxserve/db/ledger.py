"""The credit ledger: a job's price is held at submit and either kept (success) or given back.

Credits are integer hundredths in the database, so 2.5-credit models add up exactly; a key whose balance
is NULL is unlimited. Each function works inside the caller's transaction.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Connection, select, update

from fluxserve.db.tables import api_keys

_BALANCE = api_keys.c.credits_hundredths


def to_hundredths(credits: Decimal) -> int:
    return int((credits * 100).to_integral_value())


def from_hundredths(value: int) -> Decimal:
    return Decimal(value) / 100


def hold(conn: Connection, key_id: str, amount: Decimal) -> bool:
    """Take ``amount`` from the key's balance; False (and nothing taken) when it does not cover it.

    Touching the key's row also serialises submits of one key (a row lock on PostgreSQL, the write lock
    on SQLite), so checks made after it in the same transaction cannot race another submit of that key.
    """
    cost = to_hundredths(amount)
    held = conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, _BALANCE.is_(None) | (cost <= _BALANCE))
        .values(credits_hundredths=_BALANCE - cost)
    )
    return held.rowcount == 1


def covers(conn: Connection, key_id: str, amount: Decimal) -> bool:
    """Whether the key's balance covers ``amount`` now (a check before work; ``hold`` decides)."""
    balance = conn.execute(select(_BALANCE).where(api_keys.c.id == key_id)).first()
    return balance is not None and (balance[0] is None or balance[0] >= to_hundredths(amount))


def settle(conn: Connection, key_id: str, held: Decimal, charged: bool) -> None:
    """End a hold: kept when the job is charged, given back otherwise (failure, moderation, cancel)."""
    if not charged:
        add(conn, key_id, held)


def reprice(conn: Connection, key_id: str, held: Decimal, cost: Decimal) -> None:
    """Bring a hold down to ``cost`` once a job's price is known exactly (a megapixel-priced job whose
    URL inputs were held at the 4 MP bound): the difference goes back to the key. A price above the hold
    is never taken (``pricing.requote`` caps it at the quote), so a balance cannot go below zero here."""
    if cost < held:
        add(conn, key_id, held - cost)


def add(conn: Connection, key_id: str, amount: Decimal) -> bool:
    """Add to a finite balance; False for an unlimited (or unknown) key, which stays as it is."""
    changed = conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, _BALANCE.is_not(None))
        .values(credits_hundredths=_BALANCE + to_hundredths(amount))
    )
    return changed.rowcount == 1


def set_balance(conn: Connection, key_id: str, credits: Decimal | None) -> bool:
    """Set a key's balance outright (None: unlimited); False for an unknown key."""
    value = None if credits is None else to_hundredths(credits)
    return (
        conn.execute(
            update(api_keys).where(api_keys.c.id == key_id).values(credits_hundredths=value)
        ).rowcount
        == 1
    )
