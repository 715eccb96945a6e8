"""Routes for operators and their tools: ``/healthz`` (the process is alive), ``/readyz`` (it can serve:
database, storage, workers) and ``/metrics`` (Prometheus).

None of them can be made to starve the process or each other, and none waits on the request thread pool or
its connection pool:

- ``/healthz`` touches nothing, so a slow database never gets a live process restarted.
- ``/metrics`` answers the text one refresh task renders every few seconds from the counter tables
  (``jobs/stats.py``): a scrape runs no SQL at all, so any number of them, or abandoned ones, cost nothing.
- ``/readyz`` runs its checks on its own threads and connections, at most one of each at a time however
  many callers ask (they share the answer), and waits for them at most its own short timeout.

Both read a separate database handle with its own pool (``app.py``), never the one requests use.
Anonymous callers learn which part is unavailable, never a driver's or pool's message: that goes to the
log, and to callers that send the metrics token (``FLUXSERVE_METRICS_TOKEN``), which ``/metrics`` then
also requires.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import suppress
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fluxserve import __version__
from fluxserve.jobs.stats import Figures, Histogram, JobStats
from fluxserve.jobs.workers import process_name
from fluxserve.storage.base import BlobStore
from fluxserve.surfaces.base import bearer_token

log = logging.getLogger("fluxserve.ops")

OK = "ok"
UNAVAILABLE = "unavailable"
T = TypeVar("T")


def _failure(error: BaseException) -> str:
    """What went wrong, in one line (a driver's message can span many)."""
    if isinstance(error, TimeoutError):
        return "no answer in time"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]


class Token:
    """The operators' bearer token, when one is set; compared in constant time."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def required(self) -> bool:
        return self._token is not None

    def presented(self, authorization: str | None) -> bool:
        sent = bearer_token(authorization)
        return (
            self._token is not None and sent is not None and hmac.compare_digest(sent.encode(), self._token)
        )


class SingleFlight(Generic[T]):
    """``call`` runs on ``executor`` at most once at a time: a caller while it runs waits for that same run.
    Each caller waits at most ``timeout`` seconds; a run that hangs holds one thread, never more."""

    def __init__(self, call: Callable[[], T], executor: Executor, timeout: float) -> None:
        self._call = call
        self._executor = executor
        self._timeout = timeout
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(self._executor, self._call)
            self._running.add_done_callback(_retrieve)  # a run nobody waited for to the end is not an error
        return await asyncio.wait_for(asyncio.shield(self._running), self._timeout)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Readiness:
    def __init__(
        self,
        stats: JobStats,
        blobs: BlobStore,
        workers_expected: bool,
        seen_within: float,  # seconds: a worker heard from longer ago does not count
        executor: Executor,
        timeout: float,
    ) -> None:
        self._database = SingleFlight(stats.live_workers, executor, timeout)
        self._storage = SingleFlight(self._probe_storage, executor, timeout)
        self._blobs = blobs
        self._workers_expected = workers_expected
        self._seen_within = seen_within

    def _probe_storage(self) -> None:
        probe = f"readyz/{process_name()}"  # one object per process, rewritten by each probe
        self._blobs.put(probe, b"ok", "text/plain")
        self._blobs.delete(probe)

    async def checks(self, detailed: bool) -> dict[str, str]:
        """Each check and ``ok`` or why not (the failure's text only when ``detailed``); never raises."""
        (live, database), (_, storage) = await asyncio.gather(
            self._check("database", self._database, detailed), self._check("storage", self._storage, detailed)
        )
        checks = {"database": database, "storage": storage}
        if not self._workers_expected:
            checks["workers"] = "ok (none expected in this deployment)"
        elif live is None:
            checks["workers"] = "unknown: the database is unavailable"
        else:
            checks["workers"] = (
                f"ok ({live} live)"
                if live
                else f"no worker process heard from in the last {self._seen_within:g} s"
            )
        return checks

    @staticmethod
    async def _check(name: str, probe: Callable[[], Awaitable[T]], detailed: bool) -> tuple[T | None, str]:
        try:
            return await probe(), OK
        except Exception as error:
            log.warning("readyz: %s unavailable: %s", name, _failure(error))
            return None, f"{UNAVAILABLE}: {_failure(error)}" if detailed else UNAVAILABLE


class MetricsSnapshot:
    """The ``/metrics`` text, rendered by :meth:`run` from the counter tables every ``interval`` seconds.

    Until the first read, and while the database does not answer, ``fluxserve_database_up`` is 0 and the
    last figures read (if any) are kept, so counters never go backwards in between."""

    def __init__(self, stats: JobStats, interval: float, executor: Executor) -> None:
        self._stats = stats
        self._interval = interval
        self._executor = executor
        self._collector = FiguresCollector()
        self._registry = CollectorRegistry(auto_describe=False)  # this app's own: no global state
        self._registry.register(self._collector)
        self.text = generate_latest(self._registry)

    def refresh(self) -> None:
        try:
            self._collector.figures = self._stats.figures()
            self._collector.read_at = time.time()
            self._collector.up = True
        except Exception:
            log.exception("metrics: the database did not answer")
            self._collector.up = False
        self.text = generate_latest(self._registry)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop``; a refresh that hangs on the database does not hold up the stop."""
        loop = asyncio.get_running_loop()
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                refreshed: asyncio.Future[Any] = loop.run_in_executor(self._executor, self.refresh)
                await asyncio.wait([refreshed, stopped], return_when=asyncio.FIRST_COMPLETED)
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopped), timeout=self._interval)
        finally:
            stopped.cancel()


class FiguresCollector(Collector):
    """The last figures read, as Prometheus families (rendered at refresh time, not per scrape)."""

    def __init__(self) -> None:
        self.figures: Figures | None = None
        self.read_at = 0.0
        self.up = False

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "fluxserve_database_up", "1 when the last read of the figures succeeded", value=int(self.up)
        )
        figures = self.figures
        if figures is None:
            return
        yield GaugeMetricFamily(
            "fluxserve_metrics_read_timestamp_seconds",
            "When these figures were read from the database (Unix time)",
            value=self.read_at,
        )
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
            "fluxserve_queue_wait_seconds",
            "Seconds from submission to each start, by model",
            figures.queue_wait,
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


def router(readiness: Readiness, snapshot: MetricsSnapshot, token: Token, worker_processes: int) -> APIRouter:
    """The three routes, all on the event loop (no thread-pool hop); ``worker_processes`` is what this
    process supervises (``/healthz`` says it)."""
    routes = APIRouter(tags=["ops"])

    @routes.get("/healthz", summary="Liveness: the process answers (touches nothing else)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "workers": worker_processes}

    @routes.get("/readyz", summary="Readiness: database reachable, storage writable, a worker heard from")
    async def readyz(
        authorization: str | None = Header(default=None, include_in_schema=False),
    ) -> JSONResponse:
        checks = await readiness.checks(detailed=token.presented(authorization))
        failing = [name for name, result in checks.items() if not result.startswith(OK)]
        if failing:
            body = {"status": "not ready", "failing": failing, "checks": checks}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})

    @routes.get("/metrics", summary="Prometheus metrics, as last read from the counter tables")
    async def metrics(authorization: str | None = Header(default=None, include_in_schema=False)) -> Response:
        if token.required and not token.presented(authorization):
            return JSONResponse(
                {"detail": "/metrics needs Authorization: Bearer <FLUXSERVE_METRICS_TOKEN>"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(snapshot.text, media_type=CONTENT_TYPE_LATEST)

    return routes
