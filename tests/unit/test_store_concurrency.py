"""Races on the real store, on SQLite and on PostgreSQL: concurrent submits against one key's credits and
active-job limits, and several workers claiming at once. Each check counts outcomes exactly, so a lost race
shows."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.job import JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database
from fluxserve.errors import QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_stores

THREADS = 16


class Bench:
    def __init__(self, url: str, root: Path, max_active: int = 24, kontext_max: int = 6) -> None:
        database = open_database(url)
        migrate(database)
        self.stores = make_stores(database)
        self.keys = KeyStore(database)
        limits = Limits(max_active, {"flux-kontext-max": kontext_max}, 2**20, 2**22)
        self.submitter = Submitter(
            self.stores.submissions, LocalBlobStore(root / "files"), limits, NetworkPolicy([])
        )

    def submit(self, key: ApiKey, model: str = "flux-dev") -> str:
        fields: dict[str, Any] = {"width": 256, "height": 256} if model == "flux-dev" else {}
        params = GenerationParams(model=model, prompt="race", **fields)
        return self.submitter.submit(key, params, 1, None, SurfaceName.RESELLER).id


def at_once(count: int, action: Callable[[], object]) -> Counter[str]:
    """Run ``action`` in ``count`` threads released together; count results by kind."""
    start = threading.Barrier(count)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        try:
            action()
            kind = "ok"
        except Exception as error:  # counted by kind, so an unexpected one fails the comparison
            kind = type(error).__name__
        with lock:
            outcomes[kind] += 1

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_concurrent_submits_never_spend_more_than_the_balance(database_url: str, tmp_path: Path) -> None:
    bench = Bench(database_url, tmp_path)
    key = bench.keys.create("k", Decimal("10")).record  # four flux-dev jobs at 2.5
    outcomes = at_once(THREADS, lambda: bench.submit(key))
    assert outcomes == Counter({"ok": 4, QuotaExceeded.__name__: THREADS - 4})
    found = bench.keys.get(key.id)
    assert found is not None and found.credits == Decimal("0")


@pytest.mark.parametrize(("model", "limit"), [("flux-dev", 5), ("flux-kontext-max", 6)])
def test_concurrent_submits_never_pass_the_active_job_limits(
    database_url: str, tmp_path: Path, model: str, limit: int
) -> None:
    bench = Bench(database_url, tmp_path, max_active=5 if model == "flux-dev" else 24, kontext_max=6)
    key = bench.keys.create("unlimited").record
    outcomes = at_once(THREADS, lambda: bench.submit(key, model))
    assert outcomes == Counter({"ok": limit, TooManyActiveJobs.__name__: THREADS - limit})


def test_kontext_max_jobs_count_against_the_general_limit_too(database_url: str, tmp_path: Path) -> None:
    bench = Bench(database_url, tmp_path, max_active=8, kontext_max=6)
    key = bench.keys.create("unlimited").record
    for _ in range(4):
        bench.submit(key)
    outcomes = at_once(THREADS, lambda: bench.submit(key, "flux-kontext-max"))
    assert outcomes == Counter({"ok": 4, TooManyActiveJobs.__name__: THREADS - 4})  # 8 active in all


def test_workers_claiming_at_once_take_each_job_exactly_once(database_url: str, tmp_path: Path) -> None:
    bench = Bench(database_url, tmp_path, max_active=100)
    key = bench.keys.create("unlimited").record
    submitted = {bench.submit(key) for _ in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def drain() -> None:
        worker = f"w-{threading.get_ident()}"
        while (job := bench.stores.claims.claim(worker)) is not None:
            with lock:
                claimed.append(job.id)

    assert at_once(8, drain) == Counter({"ok": 8})
    assert sorted(claimed) == sorted(submitted)  # every job once: none twice, none left
    jobs = [bench.stores.reads.get(job_id) for job_id in submitted]
    assert all(job is not None and job.status is JobStatus.RUNNING and job.attempts == 1 for job in jobs)
