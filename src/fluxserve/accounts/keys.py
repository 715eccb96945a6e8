"""API keys (stored as SHA-256 hashes: keys are random, so a slow hash buys nothing) and credits."""

from __future__ import annotations

import getpass
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fluxserve.db import ledger
from fluxserve.db.connection import utcnow
from fluxserve.db.tables import api_keys
from fluxserve.webhooks.signing import new_secret

KEY_PREFIX = "fs_"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class KeyProblem(Exception):
    """An operation on keys that cannot be done as asked; the message says why, for the operator."""


# Who changed credits by hand, as the ledger records it: the user running the command.
OPERATOR = f"cli:{getpass.getuser()}"


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

    @property
    def engine(self) -> Engine:
        """The database the keys live in (reports on their jobs read it too)."""
        return self._engine

    def create(self, name: str, credits: Decimal | None = None, operator: str = OPERATOR) -> NewKey:
        """Make a key; the raw value is returned once and never stored. A name names one live key, so that
        commands given a name cannot reach the wrong one."""
        name = name.strip()
        if not name:
            raise KeyProblem("a key needs a name")
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = str(uuid.uuid4())
        values = {
            "id": key_id,
            "name": name,
            "key_hash": hash_key(raw),
            "key_prefix": raw[:10],
            "webhook_secret": new_secret(),
            "credits_hundredths": None if credits is None else ledger.to_hundredths(credits),
            "active": True,
            "created_at": utcnow(),
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(api_keys).values(values))
                if credits is not None:  # the key's first entry: its starting balance
                    ledger.set_balance(conn, key_id, credits, operator=operator)
        except IntegrityError as error:  # the live-name index (the hash is random, never a clash)
            raise KeyProblem(
                f"a live key is already named {name!r}: choose another name, or revoke that key first"
            ) from error
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

    def find(self, name_or_id: str) -> ApiKey | None:
        """The key with this id; else the live key of this name; else the newest revoked one of it."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(api_keys)
                .where((api_keys.c.id == name_or_id) | (api_keys.c.name == name_or_id))
                .order_by(
                    (api_keys.c.id == name_or_id).desc(),
                    api_keys.c.active.desc(),
                    api_keys.c.created_at.desc(),
                )
            ).first()
        return _record(row) if row is not None else None

    def resolve(self, name_or_id: str) -> ApiKey:
        """:meth:`find`, or a :class:`KeyProblem` that says there is no such key."""
        key = self.find(name_or_id)
        if key is None:
            raise KeyProblem(f"no key named {name_or_id!r} (`fluxserve keys` lists them)")
        return key

    def add_credits(self, key: ApiKey, credits: Decimal, operator: str = OPERATOR) -> ApiKey:
        """Top up a live key's finite balance."""
        self._finite_and_live(key, "add credits to")
        with self._engine.begin() as conn:
            ledger.add(conn, key.id, credits, operator=operator)
        return self.get(key.id)  # type: ignore[return-value]

    def take_credits(self, key: ApiKey, credits: Decimal, operator: str = OPERATOR) -> ApiKey:
        """Take credits from a live key's finite balance; never below zero."""
        self._finite_and_live(key, "take credits from")
        with self._engine.begin() as conn:
            if not ledger.hold(conn, key.id, credits, operator=operator):
                balance = self.get(key.id)
                raise KeyProblem(
                    f"{key.name} has {balance.credits if balance else 0} credits: cannot take {credits}"
                )
        return self.get(key.id)  # type: ignore[return-value]

    def set_credits(self, key: ApiKey, credits: Decimal | None, operator: str = OPERATOR) -> ApiKey:
        """Set a live key's balance outright (None: unlimited)."""
        if not key.active:
            raise KeyProblem(f"{key.name} is revoked: its balance cannot be set")
        with self._engine.begin() as conn:
            ledger.set_balance(conn, key.id, credits, operator=operator)
        return self.get(key.id)  # type: ignore[return-value]

    @staticmethod
    def _finite_and_live(key: ApiKey, action: str) -> None:
        if not key.active:
            raise KeyProblem(f"{key.name} is revoked: cannot {action} it")
        if key.credits is None:
            raise KeyProblem(
                f"{key.name} has unlimited credits: cannot {action} it "
                f"(`fluxserve credits set {key.name} AMOUNT` gives it a balance)"
            )

    def revoke(self, key_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(active=False))
