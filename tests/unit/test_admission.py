"""Admission before work: a submit the key cannot have is refused before any image is decoded or stored,
and one refused later (a race lost in the final transaction) leaves no file behind."""

from __future__ import annotations

import base64
import io
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.job import Job
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.db.connection import make_engine, migrate
from fluxserve.errors import QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.store import Idempotency
from fluxserve.jobs.store_sql import SqlJobStore
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore

NOT_AN_IMAGE = base64.b64encode(b"these bytes decode as base64 but not as any image").decode()


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class LosesTheRace(SqlJobStore):
    """Admits, then refuses in the final transaction, as when another submit spent the credits between."""

    def submit(
        self,
        job: Job,
        max_active: int,
        max_active_model: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Job:
        raise QuotaExceeded()


def setup(
    url: str, tmp_path: Path, store_class: type[SqlJobStore] = SqlJobStore
) -> tuple[Submitter, KeyStore, Path]:
    database = make_engine(url)
    migrate(database)
    limits = Limits(2, {"flux-kontext-max": 1}, 2**20, 2**22)
    files = tmp_path / "files"
    return (
        Submitter(store_class(database), LocalBlobStore(files), limits, NetworkPolicy()),
        KeyStore(database),
        files,
    )


def kontext(image: str) -> GenerationParams:
    return GenerationParams(
        model="flux-kontext-max", prompt="edit", input_images=[ImageRef(field="input_image", ref=image)]
    )


def stored(files: Path) -> list[Path]:
    return [path for path in files.rglob("*") if path.is_file()] if files.exists() else []


def test_no_credits_is_refused_before_the_image_is_even_decoded(database_url: str, tmp_path: Path) -> None:
    submitter, keys, files = setup(database_url, tmp_path)
    broke: ApiKey = keys.create("broke", Decimal("0")).record
    # An undecodable image would be a 400 if it were looked at: the 402 proves it was not.
    with pytest.raises(QuotaExceeded):
        submitter.submit(broke, kontext(NOT_AN_IMAGE), 1, None, SurfaceName.RESELLER)
    with pytest.raises(QuotaExceeded):
        submitter.submit(broke, kontext(png()), 1, None, SurfaceName.RESELLER)
    assert stored(files) == []


def test_a_key_at_its_limit_is_refused_before_work(database_url: str, tmp_path: Path) -> None:
    submitter, keys, files = setup(database_url, tmp_path)
    key = keys.create("busy").record
    submitter.submit(key, kontext(png()), 1, None, SurfaceName.RESELLER)  # kontext-max's own limit: 1
    assert len(stored(files)) == 1
    with pytest.raises(TooManyActiveJobs):
        submitter.submit(key, kontext(NOT_AN_IMAGE), 1, None, SurfaceName.RESELLER)
    assert len(stored(files)) == 1


def test_a_submit_refused_in_its_final_transaction_leaves_no_file(database_url: str, tmp_path: Path) -> None:
    submitter, keys, files = setup(database_url, tmp_path, LosesTheRace)
    key = keys.create("racer", Decimal("100")).record
    with pytest.raises(QuotaExceeded):
        submitter.submit(key, kontext(png()), 1, None, SurfaceName.RESELLER)
    assert stored(files) == []
