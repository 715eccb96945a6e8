"""db.ledger.reprice on a real SQLite database: a hold brought down or up to the exact price."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from fluxserve.accounts.keys import KeyStore
from fluxserve.db import ledger
from fluxserve.db.connection import make_engine, migrate
from fluxserve.db.tables import api_keys


def test_reprice_gives_back_or_takes_the_difference(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    keys = KeyStore(engine)
    finite, unlimited = keys.create("finite", Decimal("20")).record, keys.create("unlimited").record

    def balance(key_id: str) -> int | None:
        with engine.connect() as conn:
            return conn.execute(select(api_keys.c.credits_hundredths).where(api_keys.c.id == key_id)).scalar()

    with engine.begin() as conn:
        assert ledger.hold(conn, finite.id, Decimal("13.5"))
        ledger.reprice(conn, finite.id, Decimal("13.5"), Decimal("4.5"))
    assert balance(finite.id) == 1550
    with engine.begin() as conn:
        ledger.reprice(conn, finite.id, Decimal("4.5"), Decimal("21"))  # rose past the balance: taken
        ledger.reprice(conn, unlimited.id, Decimal("3"), Decimal("1"))
    assert balance(finite.id) == -100 and balance(unlimited.id) is None
