"""The finetunes an installation has: the operator's (the ``finetunes`` table, files in the blob store) and
the ones shipped with the bundled model (files inside the package), each for one model name.

A finetune is for every key (``key_id`` None) or for one; a key sees and uses only those. A finetune's
``file`` says where its weights are: ``blob:finetunes/<sha256>.safetensors`` in the blob store (so every
worker, on any machine, reads the same bytes; the same file added twice is stored once) or
``builtin:<name>`` for a shipped one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError

from fluxserve.core.catalog import BUNDLED_WEIGHTS, WEIGHTS, Catalog
from fluxserve.core.models import MODELS
from fluxserve.db.connection import utcnow
from fluxserve.db.tables import finetunes
from fluxserve.errors import BlobNotFound, EngineError
from fluxserve.finetunes.check import AdapterProblem, check_fits, inspect
from fluxserve.storage.base import BlobStore

log = logging.getLogger("fluxserve.finetunes")

# Shipped adapters for the bundled model: name -> (model name, what it does). Files in BUILTIN_DIR.
BUILTIN_DIR = WEIGHTS / "finetunes"
BUILTIN: dict[str, tuple[str, str]] = {
    "outlines": ("flux-pro", "trained toward outlines: shapes drawn thinner (training/RESULTS.md)"),
}
BLOB = "blob:"
BUILTIN_PREFIX = "builtin:"
# As the vendor names uploaded LoRAs: lowercase letters, digits, hyphens and underscores.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")


class FinetuneProblem(Exception):
    """An operation on finetunes that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class Finetune:
    name: str
    model: str  # the model name it was added for (core.models.FINETUNE_TARGETS)
    key_id: str | None  # None: every key may use it
    file: str  # blob:<key> or builtin:<name>
    sha256: str
    size_bytes: int
    rank: int
    comment: str | None
    created_at: datetime | None  # None for a shipped one

    @property
    def builtin(self) -> bool:
        return self.file.startswith(BUILTIN_PREFIX)

    def details(self) -> dict[str, Any]:
        """What ``/v1/finetune_details`` and ``fluxserve finetunes list`` say about it."""
        return {
            "finetune_id": self.name,
            "model": self.model,
            "scope": "all keys" if self.key_id is None else "this key",
            "type": "lora",
            "rank": self.rank,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "comment": self.comment,
            "created_at": None if self.created_at is None else self.created_at.isoformat(),
            "builtin": self.builtin,
        }


def builtin_finetunes(catalog: Catalog) -> list[Finetune]:
    """The shipped adapters whose model the catalog serves with the bundled weights they were trained for,
    checked against those weights (a shipped adapter that no longer fits them is left out, logged)."""
    found = []
    for name, (model, comment) in BUILTIN.items():
        entry = catalog.models.get(model)
        path = BUILTIN_DIR / f"{name}.safetensors"
        if entry is None or entry.weights != "builtin:bundled" or not path.is_file():
            continue
        try:
            info = inspect(path)
            check_fits(info, BUNDLED_WEIGHTS, name)
        except AdapterProblem as problem:
            log.warning("shipped finetune left out", extra={"finetune": name, "reason": str(problem)})
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        found.append(
            Finetune(
                name,
                model,
                None,
                BUILTIN_PREFIX + name,
                digest,
                path.stat().st_size,
                info.rank,
                comment,
                None,
            )
        )
    return found


def relayed_finetuned(catalog: Catalog) -> list[str]:
    """The finetuned routes the catalog relays to the vendor (their own entry, or their base model's)."""
    return [
        name
        for name, entry in catalog.models.items()
        if entry.engine == "relay" and name in MODELS and MODELS[name].finetunes_of
    ]


def read_adapter(file: str, blobs: BlobStore, name: str) -> bytes:
    """The bytes of a finetune's file; EngineError when it is gone (removed after the job was submitted)."""
    try:
        if file.startswith(BUILTIN_PREFIX):
            return (BUILTIN_DIR / f"{file.removeprefix(BUILTIN_PREFIX)}.safetensors").read_bytes()
        return blobs.get(file.removeprefix(BLOB))
    except (BlobNotFound, OSError) as exc:
        raise EngineError(f"finetune_id: {name} was removed after this job was submitted") from exc


def _record(row: Any) -> Finetune:
    return Finetune(
        row.name, row.model, row.key_id, BLOB + row.blob_key, row.sha256, row.size_bytes, row.rank,
        row.comment, row.created_at,
    )  # fmt: skip


class FinetuneStore:
    """The operator's finetunes (database and blob store) and the shipped ones (``builtins``)."""

    def __init__(
        self,
        database: Engine,
        blobs: BlobStore,
        builtins: Iterable[Finetune] = (),
        relayed: Collection[str] = (),
    ) -> None:
        """``relayed``: the finetuned routes this installation relays to the vendor, whose finetunes live
        there (a ``finetune_id`` on them is the vendor's to resolve, never looked up here)."""
        self.database = database
        self._blobs = blobs
        self._builtins = {finetune.name: finetune for finetune in builtins}
        self._relayed = frozenset(relayed)

    def upstream(self, model: str) -> bool:
        """Whether the vendor resolves ``model``'s finetunes: the route is relayed."""
        return model in self._relayed

    def add(
        self, name: str, data: bytes, model: str, rank: int, key_id: str | None, comment: str | None
    ) -> Finetune:
        """Store the file (once per content) and record it; FinetuneProblem if the name is taken."""
        if not NAME.fullmatch(name):
            raise FinetuneProblem(
                f"name: {name!r} must be 1 to 100 lowercase letters, digits, '-' or '_' (the finetune_id)"
            )
        if name in self._builtins or name in BUILTIN:
            raise FinetuneProblem(f"name: {name!r} is a shipped finetune's; choose another")
        digest = hashlib.sha256(data).hexdigest()
        blob_key = f"finetunes/{digest}.safetensors"
        if not self._blobs.exists(blob_key):
            self._blobs.put(blob_key, data, "application/octet-stream")
        values = {
            "name": name, "key_id": key_id, "model": model, "blob_key": blob_key, "sha256": digest,
            "size_bytes": len(data), "rank": rank, "comment": comment, "created_at": utcnow(),
        }  # fmt: skip
        try:
            with self.database.begin() as conn:
                conn.execute(insert(finetunes).values(**values))
        except IntegrityError:
            raise FinetuneProblem(f"name: a finetune named {name!r} exists (remove it first)") from None
        found = self.get(name)
        assert found is not None
        return found

    def get(self, name: str) -> Finetune | None:
        """Any finetune by name, whoever may use it."""
        if name in self._builtins:
            return self._builtins[name]
        with self.database.connect() as conn:
            row = conn.execute(select(finetunes).where(finetunes.c.name == name)).first()
        return None if row is None else _record(row)

    def find(self, name: str, key_id: str) -> Finetune | None:
        """The finetune ``name`` if the key may use it (its own or every key's), else None."""
        found = self.get(name)
        return found if found is not None and found.key_id in (None, key_id) else None

    def visible(self, key_id: str | None) -> list[Finetune]:
        """The finetunes a key may use (None: every one), shipped ones first, then by name."""
        query = select(finetunes).order_by(finetunes.c.name)
        if key_id is not None:
            query = query.where(or_(finetunes.c.key_id.is_(None), finetunes.c.key_id == key_id))
        with self.database.connect() as conn:
            rows = conn.execute(query).all()
        return [*self._builtins.values(), *(_record(row) for row in rows)]

    def remove(self, name: str) -> Finetune:
        """Forget a finetune, and its file when no other finetune has the same content; jobs already
        queued with it fail saying so. FinetuneProblem for a shipped or unknown one."""
        found = self.get(name)
        if found is None:
            raise FinetuneProblem(f"no finetune named {name!r}")
        if found.builtin:
            raise FinetuneProblem(f"{name!r} ships with fluxserve and cannot be removed")
        blob_key = found.file.removeprefix(BLOB)
        with self.database.begin() as conn:
            conn.execute(delete(finetunes).where(finetunes.c.name == name))
            others = conn.execute(
                select(func.count()).select_from(finetunes).where(finetunes.c.blob_key == blob_key)
            ).scalar_one()
        if not others:
            self._blobs.delete(blob_key)
        return found
