"""API keys (stored as SHA-256 hashes: keys are random, so a slow hash buys nothing) and credits."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Engine, insert, select, update

from fluxserve.db import ledger
from fluxserve.db.connection import utcnow
from fluxserve.db.tables import api_keys
from fluxserve.webhooks.signing import new_secret

KEY_PREFIX = "fs_"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    webhook_secret: str
    credits: Decimal | None  # None: unlimited
    active: bool


@dataclass(frozen=True)
class NewKey:
    key: str
    record: ApiKey


def _record(row) -> ApiKey:  # type: ignore[no-untyped-def]
    credits = None if row.credits_hundredths is None else ledger.from_hundredths(row.credits_hundredths)
    return ApiKey(row.id, row.name, row.key_prefix, row.webhook_secret, credits, row.active)


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, name: str, credits: Decimal | None = None) -> NewKey:
        """Make a key; the raw value is returned once and never stored."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        values = {
            "id": str(uuid.uuid4()),
            "name": name,
            "key_hash": hash_key(raw),
            "key_prefix": raw[:10],
            "webhook_secret": new_secret(),
            "credits_hundredths": None if credits is None else ledger.to_hundredths(credits),
            "active": True,
            "created_at": utcnow(),
        }
        with self._engine.begin() as conn:
            conn.execute(insert(api_keys).values(values))
        return NewKey(raw, self.get(values["id"]))  # type: ignore[arg-type]

    def authenticate(self, raw: str | None) -> ApiKey | None:
        if not raw:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == hash_key(raw.strip()))).first()
        return _record(row) if row is not None and row.active else None

    def get(self, key_id: str) -> ApiKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _record(row) if row is not None else None

    def list(self) -> list[ApiKey]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_record(row) for row in rows]

    def count(self) -> int:
        return len(self.list())

    def add_credits(self, key_id: str, credits: Decimal) -> ApiKey | None:
        """Top up a finite balance (an unlimited key stays unlimited)."""
        with self._engine.begin() as conn:
            ledger.add(conn, key_id, credits)
        return self.get(key_id)

    def find(self, name_or_id: str) -> ApiKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(api_keys).where((api_keys.c.id == name_or_id) | (api_keys.c.name == name_or_id))
            ).first()
        return _record(row) if row is not None else None

    def revoke(self, key_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(active=False))
