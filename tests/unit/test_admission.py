"""Admission before work: a submit the key cannot have is refused before any image is decoded or stored,
and one refused later (a race lost in the final transaction) leaves no file behind."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.db.connection import migrate, open_database
from fluxserve.errors import QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.store_sql import SqlSubmissions
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore

NOT_AN_IMAGE = base64.b64encode(b"these bytes decode as base64 but not as any image").decode()


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Meanwhile(LocalBlobStore):
    """Local files; the first image stored runs ``meanwhile`` first: what another request does between a
    submit's admission and its final transaction."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.meanwhile: Callable[[], object] | None = None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        super().put(key, data, content_type)


def setup(url: str, tmp_path: Path, blobs: LocalBlobStore | None = None) -> tuple[Submitter, KeyStore, Path]:
    database = open_database(url)
    migrate(database)
    limits = Limits(2, {"flux-kontext-max": 1}, 2**20, 2**22)
    files = tmp_path / "files"
    submissions = SqlSubmissions(database)
    return (
        Submitter(submissions, blobs or LocalBlobStore(files), limits, NetworkPolicy()),
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
    blobs = Meanwhile(tmp_path / "files")
    submitter, keys, files = setup(database_url, tmp_path, blobs)
    key = keys.create("racer", Decimal("8")).record  # kontext-max's price: admitted
    text_only = GenerationParams(model="flux-dev", prompt="p", width=256, height=256)  # 2.5 credits
    blobs.meanwhile = lambda: submitter.submit(key, text_only, 1, None, SurfaceName.RESELLER)
    with pytest.raises(QuotaExceeded):
        submitter.submit(key, kontext(png()), 1, None, SurfaceName.RESELLER)
    assert blobs.meanwhile is None  # the other submit ran, between admission and the final transaction
    assert stored(files) == []
