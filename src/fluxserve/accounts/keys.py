"""API keys (stored as SHA-256 hashes: keys are random, so a slow hash buys nothing) and credits."""

from __future__ import annotations

import getpass
import hashlib
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fluxserve.db import ledger
from fluxserve.db.connection import reconnecting, utcnow
from fluxserve.db.tables import api_keys
from fluxserve.errors import KeyProblem
from fluxserve.webhooks.signing import new_secret

KEY_PREFIX = "fs_"
CACHE_MAX_AGE = 1.0  # seconds a verified key is trusted without the database (revocation takes this long)
CACHE_MAX_KEYS = 10_000


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


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


def _new_secret() -> tuple[str, dict[str, str]]:
    """A raw key, and the columns that store it (its hash, and its prefix to recognise it by)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    return raw, {"key_hash": hash_key(raw), "key_prefix": raw[:10]}


def _record(row) -> ApiKey:  # type: ignore[no-untyped-def]
    credits = None if row.credits_hundredths is None else ledger.from_hundredths(row.credits_hundredths)
    return ApiKey(row.id, row.name, row.key_prefix, row.webhook_secret, credits, row.active)


class KeyCache:
    """Verified live keys by hash, each trusted for at most ``max_age`` seconds, at most ``max_size`` of them
    (the least recently verified go first).

    A request then costs a hash and a dict lookup instead of a query. Only live keys are kept (an unknown
    key is asked of the database each time, so it cannot push good ones out). The change feed calls
    :meth:`invalidate` when a key changes; until then the max age bounds how long another replica's
    revocation or credit change goes unseen. Thread-safe: routes run in the thread pool."""

    def __init__(
        self,
        max_age: float = CACHE_MAX_AGE,
        max_size: int = CACHE_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_age = max_age
        self._max_size = max_size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, ApiKey]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> ApiKey | None:
        """The key verified under this hash within the max age, else None."""
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if self._clock() - entry[0] > self._max_age:
                del self._entries[key_hash]
                return None
            return entry[1]

    def put(self, key_hash: str, key: ApiKey) -> None:
        with self._lock:
            self._entries[key_hash] = (self._clock(), key)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)

    def invalidate(self, key_id: str) -> None:
        """Forget the key with this id (revoked, or its balance changed)."""
        with self._lock:
            for key_hash in [each for each, (_, key) in self._entries.items() if key.id == key_id]:
                del self._entries[key_hash]

    def invalidate_all(self) -> None:
        """Forget every key (the change feed lost its connection: what changed meanwhile is unknown)."""
        with self._lock:
            self._entries.clear()


class KeyStore:
    def __init__(self, database: Engine, cache: KeyCache | None = None) -> None:
        self._database = database
        self._reads = database.execution_options(isolation_level="AUTOCOMMIT")  # no BEGIN/ROLLBACK a lookup
        self.cache = cache or KeyCache()

    @property
    def database(self) -> Engine:
        """The database the keys live in (reports on their jobs read it too)."""
        return self._database

    def create(self, name: str, credits: Decimal | None = None, operator: str = OPERATOR) -> NewKey:
        """Make a key; the raw value is returned once and never stored. A name names one live key, so that
        commands given a name cannot reach the wrong one."""
        name = name.strip()
        if not name:
            raise KeyProblem("a key needs a name")
        raw, secret = _new_secret()
        key_id = str(uuid.uuid4())
        values = {
            "id": key_id,
            "name": name,
            **secret,
            "webhook_secret": new_secret(),
            "credits_hundredths": None if credits is None else ledger.to_hundredths(credits),
            "active": True,
            "created_at": utcnow(),
        }
        try:
            with self._database.begin() as conn:
                conn.execute(insert(api_keys).values(values))
                if credits is not None:  # the key's first entry: its starting balance
                    ledger.set_balance(conn, key_id, credits, operator=operator)
        except IntegrityError as error:  # the live-name index (the hash is random, never a clash)
            raise KeyProblem(
                f"a live key is already named {name!r} (a key is shown only once): "
                f"`fluxserve keys rotate {name}` gives it a new secret and keeps its credits, "
                "or choose another name"
            ) from error
        return NewKey(raw, self.get(values["id"]))  # type: ignore[arg-type]

    def rotate(self, key: ApiKey) -> NewKey:
        """A new secret for a live key, which keeps its id, so its credits, jobs and results stay its own;
        the old secret stops working at once (this process's cache forgets the key now; other processes'
        caches hear of it through the change feed)."""
        raw, secret = _new_secret()
        live = (api_keys.c.id == key.id) & api_keys.c.active.is_(True)
        with self._database.begin() as conn:
            if conn.execute(update(api_keys).where(live).values(secret)).rowcount != 1:
                raise KeyProblem(f"{key.name} is revoked: `fluxserve keys create` makes a new key")
        self.cache.invalidate(key.id)
        return NewKey(raw, self.get(key.id))  # type: ignore[arg-type]

    def forget(self, key_id: str | None) -> None:
        """The change feed's word that a key changed (None: any key may have): its cached entry goes."""
        if key_id is None:
            self.cache.invalidate_all()
        else:
            self.cache.invalidate(key_id)

    def cached(self, raw: str) -> ApiKey | None:
        """The live key for ``raw`` if the cache verified it within its max age (no database), else None."""
        return self.cache.get(hash_key(raw.strip()))

    def authenticate(self, raw: str | None) -> ApiKey | None:
        """The live key for ``raw``: from the cache, else from the database (and then cached)."""
        if not raw:
            return None
        key_hash = hash_key(raw.strip())
        key = self.cache.get(key_hash)
        if key is None:
            key = self._lookup(key_hash)
            if key is not None:
                self.cache.put(key_hash, key)
        return key

    @reconnecting
    def _lookup(self, key_hash: str) -> ApiKey | None:
        with self._reads.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return _record(row) if row is not None and row.active else None

    def get(self, key_id: str) -> ApiKey | None:
        with self._database.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _record(row) if row is not None else None

    def list(self) -> list[ApiKey]:
        with self._database.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_record(row) for row in rows]

    def count(self) -> int:
        return len(self.list())

    def find(self, name_or_id: str) -> ApiKey | None:
        """The key with this id; else the live key of this name; else the newest revoked one of it."""
        with self._database.connect() as conn:
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
        with self._database.begin() as conn:
            ledger.add(conn, key.id, credits, operator=operator)
        self.cache.invalidate(key.id)
        return self.get(key.id)  # type: ignore[return-value]

    def take_credits(self, key: ApiKey, credits: Decimal, operator: str = OPERATOR) -> ApiKey:
        """Take credits from a live key's finite balance; never below zero."""
        self._finite_and_live(key, "take credits from")
        with self._database.begin() as conn:
            if not ledger.hold(conn, key.id, credits, operator=operator):
                balance = self.get(key.id)
                raise KeyProblem(
                    f"{key.name} has {balance.credits if balance else 0} credits: cannot take {credits}"
                )
        self.cache.invalidate(key.id)
        return self.get(key.id)  # type: ignore[return-value]

    def set_credits(self, key: ApiKey, credits: Decimal | None, operator: str = OPERATOR) -> ApiKey:
        """Set a live key's balance outright (None: unlimited)."""
        if not key.active:
            raise KeyProblem(f"{key.name} is revoked: its balance cannot be set")
        with self._database.begin() as conn:
            ledger.set_balance(conn, key.id, credits, operator=operator)
        self.cache.invalidate(key.id)
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
        with self._database.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(active=False))
        self.cache.invalidate(key_id)
