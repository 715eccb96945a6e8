"""Routes for operators and their tools: ``/healthz`` (the process is alive), ``/readyz`` (it can serve:
database, storage, workers) and ``/metrics`` (Prometheus).

``/healthz`` touches nothing, so a slow database never gets a live process restarted. ``/readyz`` and
``/metrics`` read the database at the moment they are asked (``jobs/stats.py``), so every API replica gives
the same, whole picture.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fluxserve import __version__
from fluxserve.jobs.stats import Histogram, JobStats
from fluxserve.jobs.workers import process_name
from fluxserve.storage.base import BlobStore

log = logging.getLogger("fluxserve.ops")

OK = "ok"


def _failure(error: Exception) -> str:
    """What went wrong, in one line (a driver's message can span many)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]


@dataclass
class Readiness:
    stats: JobStats
    blobs: BlobStore
    workers_expected: bool
    seen_within: float  # seconds: a worker heard from longer ago does not count
    storage_timeout: float = 5.0  # seconds: a store that has not answered the probe by then is failing
    _probing: Future[None] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _prober: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="readyz-storage"),
        init=False,
        repr=False,
    )

    def checks(self) -> dict[str, str]:
        """Each check and ``ok`` or why not; a broken part is named, never raised."""
        checks: dict[str, str] = {}
        try:
            self.stats.ping()
            checks["database"] = OK
        except Exception as error:
            checks["database"] = f"unreachable: {_failure(error)}"
        checks["storage"] = self._storage()
        if not self.workers_expected:
            checks["workers"] = "ok (none expected in this deployment)"
        elif checks["database"] != OK:
            checks["workers"] = "unknown: the database is unreachable"
        else:
            live = self.stats.live_workers()
            checks["workers"] = (
                f"ok ({live} live)"
                if live
                else f"no worker process heard from in the last {self.seen_within:g} s"
            )
        return checks

    def _storage(self) -> str:
        """Write and delete a probe object, waiting at most ``storage_timeout``: a hung store (one that takes
        connections and never answers) is reported in seconds, not after the client's minute-long timeout.
        One probe at a time: a check made while one is still out waits on that one."""
        with self._lock:
            if self._probing is None or self._probing.done():
                self._probing = self._prober.submit(self._probe)
            probing = self._probing
        try:
            probing.result(timeout=self.storage_timeout)
        except TimeoutError:
            return f"not writable: no answer within {self.storage_timeout:g} s"
        except Exception as error:
            return f"not writable: {_failure(error)}"
        return OK

    def _probe(self) -> None:
        probe = f"readyz/{process_name()}"  # one object per process, rewritten by each probe
        self.blobs.put(probe, b"ok", "text/plain")
        self.blobs.delete(probe)


class FiguresCollector(Collector):
    """A Prometheus collector that reads the figures from the database on every scrape."""

    def __init__(self, stats: JobStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fluxserve_database_up", "1 when the database answered this scrape")
        try:
            figures = self._stats.figures()
        except Exception:
            log.exception("metrics: the database did not answer")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        active = GaugeMetricFamily(
            "fluxserve_jobs_active",
            "Jobs not ended yet, by model and status (status=queued: the queue depth)",
            labels=["model", "status"],
        )
        for (model, status), n in sorted(figures.active.items()):
            active.add_metric([model, status], n)
        yield active
        ended = CounterMetricFamily(
            "fluxserve_jobs", "Jobs ended, by model and outcome", labels=["model", "outcome"]
        )
        for (model, status), n in sorted(figures.ended.items()):
            ended.add_metric([model, status], n)
        yield ended
        yield _histogram(
            "fluxserve_queue_wait_seconds", "Seconds from submission to start, by model", figures.queue_wait
        )
        yield _histogram(
            "fluxserve_run_seconds", "Seconds from start to end of ended jobs, by model", figures.run_time
        )
        pending = figures.webhooks.get("pending", 0)
        yield GaugeMetricFamily(
            "fluxserve_webhooks_pending", "Webhook deliveries still to make", value=pending
        )
        webhooks = CounterMetricFamily(
            "fluxserve_webhooks", "Webhook deliveries ended, by outcome", labels=["outcome"]
        )
        for status, n in sorted(figures.webhooks.items()):
            if status != "pending":
                webhooks.add_metric([status], n)
        yield webhooks
        yield GaugeMetricFamily(
            "fluxserve_workers_live", "Worker processes heard from recently", value=figures.live_workers
        )


def _histogram(name: str, documentation: str, by_model: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["model"])
    for model, histogram in sorted(by_model.items()):
        buckets: list[tuple[str, float]] = [(f"{bound:g}", n) for bound, n in histogram.buckets]
        buckets.append(("+Inf", histogram.count))
        family.add_metric([model], buckets, histogram.total)
    return family


def router(readiness: Readiness, worker_processes: int) -> APIRouter:
    """The three routes; ``worker_processes`` is what this process supervises (``/healthz`` says it)."""
    registry = CollectorRegistry(auto_describe=False)  # this app's own: no global state between apps
    registry.register(FiguresCollector(readiness.stats))
    routes = APIRouter(tags=["ops"])

    @routes.get("/healthz", summary="Liveness: the process answers (touches nothing else)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "workers": worker_processes}

    @routes.get("/readyz", summary="Readiness: database reachable, storage writable, a worker heard from")
    def readyz() -> JSONResponse:
        checks = readiness.checks()
        failing = [name for name, result in checks.items() if not result.startswith(OK)]
        if failing:
            body = {"status": "not ready", "failing": failing, "checks": checks}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})

    @routes.get("/metrics", summary="Prometheus metrics, read from the database at each scrape")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return routes
