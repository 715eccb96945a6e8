"""db.ledger.reprice on a real SQLite database: a hold brought down to the exact price, never up."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from fluxserve.accounts.keys import KeyStore
from fluxserve.db import ledger
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import api_keys


def test_reprice_gives_back_the_difference_and_never_takes_more(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(database)
    keys = KeyStore(database)
    finite, unlimited = keys.create("finite", Decimal("20")).record, keys.create("unlimited").record

    def balance(key_id: str) -> int | None:
        with database.connect() as conn:
            return conn.execute(select(api_keys.c.credits_hundredths).where(api_keys.c.id == key_id)).scalar()

    with database.begin() as conn:
        assert ledger.hold(conn, finite.id, Decimal("13.5"))
        ledger.reprice(conn, finite.id, Decimal("13.5"), Decimal("4.5"))
    assert balance(finite.id) == 1550
    with database.begin() as conn:
        ledger.reprice(conn, finite.id, Decimal("4.5"), Decimal("21"))  # above the hold: nothing taken
        ledger.reprice(conn, unlimited.id, Decimal("3"), Decimal("1"))
    assert balance(finite.id) == 1550 and balance(unlimited.id) is None
