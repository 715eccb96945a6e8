"""Workers that keep their models (issue 24): a worker serves a declared set of models and prefers the jobs
of the models it holds, within a window of the fair order and never past the wait bound; on SQLite and
PostgreSQL. Also ``fluxserve worker --models`` refusing what the catalog lacks."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import update

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.catalog import Catalog
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import jobs
from fluxserve.engines.registry import EngineRegistry
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_stores
from tests.support.engine_fixtures import tiny_weights
from tests.support.tiny_pipelines import tiny_pipeline


class Queue:
    def __init__(self, url: str, root: Path) -> None:
        self.database = open_database(url)
        migrate(self.database)
        self.stores = make_stores(self.database)
        self.key = KeyStore(self.database).create("k", Decimal(1000)).record
        limits = Limits(1000, {}, 2**20, 2**22)
        self.submitter = Submitter(
            self.stores.submissions, LocalBlobStore(root / "files"), limits, NetworkPolicy([])
        )

    def submit(self, *models: str, key: ApiKey | None = None) -> list[str]:
        """One job per model named, in that order (one key: they keep that order in the fair queue)."""
        return [
            self.submitter.submit(
                key or self.key,
                GenerationParams(model=model, prompt="p", width=256, height=256),
                1,
                None,
                SurfaceName.RESELLER,
            ).id
            for model in models
        ]

    def age(self, job_id: str, by: timedelta) -> None:
        """Make a job look ``by`` older, as if it had waited that much longer."""
        job = self.stores.reads.get(job_id)
        assert job is not None and job.created_at is not None
        with self.database.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(created_at=job.created_at - by))

    def claim(self, *args: object, **kwargs: object) -> str | None:
        job = self.stores.claims.claim("w", *args, **kwargs)  # type: ignore[arg-type]
        return job.id if job is not None else None


def test_a_worker_claims_only_the_models_it_serves(database_url: str, tmp_path: Path) -> None:
    queue = Queue(database_url, tmp_path)
    dev, schnell, pro = queue.submit("flux-dev", "flux-pro-1.1", "flux-pro")
    assert queue.claim(["flux-pro-1.1", "flux-pro"]) == schnell
    assert queue.claim(["flux-pro-1.1"]) is None  # flux-dev's job waits for a worker that serves it
    assert queue.claim(["flux-pro-1.1", "flux-pro"], ["flux-dev"]) == pro  # a preference never widens it
    assert queue.claim(None) == dev


def test_a_worker_prefers_the_model_it_holds_within_the_window(database_url: str, tmp_path: Path) -> None:
    queue = Queue(database_url, tmp_path)
    first, _, held, *_, far = queue.submit("flux-dev", "flux-pro", "flux-pro-1.1", "flux-pro", "flux-pro-1.1")
    assert queue.claim(None, ["flux-pro-1.1"], window=3) == held  # third in line, run without a load
    assert queue.claim(None, ["flux-pro-1.1"], window=3) == first  # the next is 4 down: fair order
    assert queue.claim(None, ["flux-pro-1.1"], window=4) == far
    assert queue.claim(None, ["nothing-queued"]) is not None  # no job of it: the fair order's first


def test_a_stream_of_the_held_model_does_not_starve_another(database_url: str, tmp_path: Path) -> None:
    """A worker holding flux-pro-1.1, fed a new flux-pro-1.1 job before each claim, passes over the
    flux-dev job at the head while it is young, and takes it once it has waited past the bound."""
    queue = Queue(database_url, tmp_path)
    (dev,) = queue.submit("flux-dev")
    bound = timedelta(seconds=30)
    for _ in range(2):
        (schnell,) = queue.submit("flux-pro-1.1")
        assert queue.claim(None, ["flux-pro-1.1"], max_wait=bound) == schnell
    queue.age(dev, bound + timedelta(seconds=1))
    queue.submit("flux-pro-1.1")
    assert queue.claim(None, ["flux-pro-1.1"], max_wait=bound + timedelta(seconds=5)) != dev
    assert queue.claim(None, ["flux-pro-1.1"], max_wait=bound) == dev


def test_worker_refuses_models_the_catalog_lacks(tmp_path: Path) -> None:
    for models, reason in (("flux-dev,nope", "not in the catalog: nope"), (" , ", "name at least one model")):
        command = ["worker", "--data-dir", str(tmp_path), "--models", models]
        run = subprocess.run(
            [sys.executable, "-m", "fluxserve", *command], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 2 and "--models" in run.stderr and reason in run.stderr, run.stderr


def test_the_registry_names_the_models_whose_weights_it_holds(models_dir: Path) -> None:
    """What a worker prefers: the models served so far whose weights are still in memory (with a cap of
    one model, loading FLUX.2 [klein] evicts FLUX.1, and the routes sharing its weights with it)."""
    flux1 = {"weights": str(tiny_weights(models_dir))}
    klein = {"weights": str(tiny_pipeline(models_dir, "tiny-flux2-klein"))}
    catalog = Catalog.model_validate(
        {"models": {"flux-dev": flux1, "flux-pro": flux1, "flux-2-klein-4b": klein}}
    )
    registry = EngineRegistry(catalog, models_dir, memory_cap_bytes=1)
    assert registry.resident() == []
    registry.get("flux-dev")
    registry.get("flux-pro")
    assert registry.resident() == ["flux-dev", "flux-pro"]
    registry.get("flux-2-klein-4b")
    assert registry.resident() == ["flux-2-klein-4b"]
