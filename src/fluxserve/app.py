"""The one place that builds the API process: its services, its background work and its routes.

The API process never imports torch or an engine: models run in worker processes, which ``serve``
starts and supervises (``worker/supervisor.py``) and which an operator may run on other machines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import cached_property

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy import Engine

from fluxserve import __version__
from fluxserve.accounts.keys import KeyStore
from fluxserve.api import (
    events,
    files,
    openai_images,
    ops,
    replicate,
    replicate_files,
    reseller,
    reseller_native,
    vendor,
)
from fluxserve.api.deps import Services
from fluxserve.api.errors import install_error_handlers
from fluxserve.api.headers import ResponseHeaders
from fluxserve.api.limits import AccessLog, HeldRequests, KeyRate, RequestGuard
from fluxserve.api.playground import router as playground_router
from fluxserve.core.catalog import load_catalog
from fluxserve.core.job import JobRecord
from fluxserve.finetunes.store import FinetuneStore, builtin_finetunes, relayed_finetuned
from fluxserve.jobs.feed import ChangeFeed, to_fetch, wake_on, webhook_due
from fluxserve.jobs.fetching import InputFetcher
from fluxserve.jobs.predictions import PredictionStore
from fluxserve.jobs.retention import Retention
from fluxserve.jobs.stats import JobStats
from fluxserve.jobs.store import Stores
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.jobs.workers import WorkerRegistry
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.settings import Settings
from fluxserve.storage.signing import UrlSigner
from fluxserve.surfaces import render
from fluxserve.webhooks.delivery import Payload, WebhookDispatcher
from fluxserve.wiring import database_for, make_blob_store, make_feed, make_stores, ops_database_for
from fluxserve.worker.supervisor import Supervisor

log = logging.getLogger("fluxserve")


@dataclass
class Runtime:
    """Everything with a lifetime in the API process: the database, the services, background work."""

    settings: Settings
    database: Engine
    feed: ChangeFeed
    stores: Stores
    services: Services
    policy: NetworkPolicy
    fetcher: InputFetcher
    streams: events.EventStreams

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        database = database_for(settings)
        blobs = make_blob_store(settings.storage)
        feed = make_feed(database)
        stores = make_stores(database, feed)
        catalog = load_catalog(settings.catalog_files)
        limits = Limits(
            max_active=settings.max_active_jobs,
            max_active_per_model={"flux-kontext-max": settings.max_active_jobs_kontext_max},
            max_input_bytes=settings.max_input_bytes,
            max_input_pixels=max(entry.max_input_pixels for entry in catalog.models.values()),
            max_waiting=settings.max_queued_jobs,
        )
        policy = NetworkPolicy(parse_networks(settings.allowed_private_networks))
        fetcher = InputFetcher(
            stores.fetches,
            blobs,
            policy,
            max_bytes=settings.max_input_bytes,
            max_pixels=limits.max_input_pixels,
            timeout=settings.input_fetch_timeout_seconds,
            concurrency=settings.input_fetch_concurrency,
            per_key=settings.input_fetch_max_per_key,
        )
        services = Services(
            keys=KeyStore(database),
            jobs=stores.submissions,
            submitter=Submitter(stores.submissions, blobs, limits, policy),
            blobs=blobs,
            signer=UrlSigner(settings.secret(), settings.url_ttl_seconds),
            base_url=settings.base_url,
            finetunes=FinetuneStore(database, blobs, builtin_finetunes(catalog), relayed_finetuned(catalog)),
            predictions=PredictionStore(database, stores.reads),
        )
        streams = events.EventStreams(
            services,
            max_per_key=settings.events_max_per_key,
            max_per_process=settings.events_max_per_process,
            idle_seconds=settings.events_idle_seconds,
            position_seconds=settings.events_position_seconds,
        )
        runtime = cls(settings, database, feed, stores, services, policy, fetcher, streams)
        # What waits on the feed: streams and synchronous waits, the fetch stage (a job entered
        # ``fetching``), the webhook dispatcher (a job with a webhook ended: its delivery is due).
        feed.subscribe(streams.on_changes)
        feed.subscribe(wake_on(to_fetch, fetcher.wake))
        feed.subscribe(wake_on(webhook_due, runtime.webhooks.wake))
        # A key revoked, rotated or re-credited in any process is forgotten here at once (after a gap in the
        # feed, every key is), so the cache's short max age only bounds what the feed could not say.
        feed.subscribe_keys(services.keys.forget)
        return runtime

    def webhook_payload(self, job: JobRecord) -> Payload:
        """A finished job as the surface it came in renders it, with the vendor task's own secret."""
        return Payload(render(job, self.services), job.webhook_secret)

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Worker processes (when configured), the change feed and the streams' watcher, the fetch stage
        of URL inputs, webhook delivery and retention sweeps, while the context is open."""
        supervisor = Supervisor(self.settings, self.settings.workers) if self.settings.workers else None
        if supervisor is not None:
            supervisor.start()
        self.streams.start()
        self.feed.start()
        webhook_stop = asyncio.Event()
        webhooks = asyncio.create_task(self.webhooks.run(webhook_stop))
        fetches = asyncio.create_task(self.fetcher.run(webhook_stop))
        sweeper = asyncio.create_task(self.sweep_results(webhook_stop))
        log.info(
            "fluxserve ready",
            extra={"worker_processes": self.settings.workers, "base_url": self.settings.base_url},
        )
        try:
            yield
        finally:
            if supervisor is not None:
                # First, while the webhooks still go out: the workers finish their jobs (or hand them back).
                await asyncio.to_thread(supervisor.stop)
            webhook_stop.set()
            await webhooks
            await fetches
            await sweeper
            await self.streams.stop()
            await asyncio.to_thread(self.feed.close)

    async def sweep_results(self, stop: asyncio.Event) -> None:
        """Retention: every ``sweep_seconds``, delete results past their time (off the event loop)."""
        retention = Retention(self.stores.expiry, self.services.blobs, self.settings.result_ttl)
        while not stop.is_set():
            try:
                report = await asyncio.to_thread(retention.sweep)
                if report.results or report.inputs:
                    log.info("retention sweep: %s", report, extra={"bytes": report.bytes})
            except Exception:  # a database or disk hiccup: the next sweep tries again
                log.exception("retention sweep failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.sweep_seconds)

    @cached_property
    def webhooks(self) -> WebhookDispatcher:
        """The process's webhook dispatcher (the feed wakes it)."""
        backoff = [float(value) for value in self.settings.webhook_backoff.split(",") if value.strip()]
        return WebhookDispatcher(
            self.database,
            self.stores.reads,
            self.webhook_payload,
            policy=self.policy,
            backoff=backoff,
            timeout=self.settings.webhook_timeout_seconds,
            concurrency=self.settings.webhook_concurrency,
            per_key=self.settings.webhook_max_per_key,
            per_host=self.settings.webhook_max_per_host,
        )


def max_body_size(settings: Settings) -> int:
    """Room for four base64 images at the input limit, plus the rest of the request."""
    return 4 * settings.max_input_bytes * 4 // 3 + 1024 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        refresher = asyncio.create_task(snapshot.run(stop))
        try:
            async with runtime.background():
                yield
        finally:
            stop.set()
            await refresher
            ops_threads.shutdown(wait=False)
            ops_database.dispose()

    app = FastAPIOffline(  # /docs and /redoc with their assets served from the package: no CDN
        title="fluxserve",
        version=__version__,
        description="A self-hosted FLUX image API: the reseller dialect under /bfl/v1, /flux/generate, "
        "/flux/edits and /flux/fetch; the vendor's own under /v1; the OpenAI images API under /v1/images; "
        "Replicate's predictions under /v1/predictions and /v1/models.",
        lifespan=lifespan,
    )
    app.state.services = runtime.services
    app.state.runtime = runtime
    install_error_handlers(app)
    # Before any route: per-route body caps (submit routes take images, the rest a small JSON), a submit
    # route's key checked before its body is read, and a submit body's JSON size bounded before parsing.
    app.add_middleware(
        RequestGuard,
        keys=runtime.services.keys,
        submit_max_bytes=max_body_size(settings),
        other_max_bytes=settings.http_small_body_bytes,
        max_separators=settings.http_max_json_separators,
        rate=None if settings.key_requests_per_minute is None else KeyRate(settings.key_requests_per_minute),
    )
    app.add_middleware(AccessLog)  # around the guard: every request's line, refusals included
    # Route-level, so that a too-large body is an HTTPException our handlers render (413).
    app.include_router(reseller.router, max_body_size=max_body_size(settings))
    app.include_router(reseller_native.router, max_body_size=max_body_size(settings))
    app.include_router(openai_images.router, max_body_size=max_body_size(settings))
    held = HeldRequests(settings.max_held_requests)  # the OpenAI waits and Replicate's Prefer: wait, together
    app.state.openai_images = openai_images.ImagesOptions(
        settings.openai_wait_seconds, settings.openai_model, settings.openai_edit_model, held
    )
    app.include_router(replicate.router, max_body_size=max_body_size(settings))  # before vendor's /v1/<model>
    app.include_router(replicate_files.router, max_body_size=max_body_size(settings))
    app.state.replicate = replicate.ReplicateOptions(runtime.services.predictions, held)
    app.include_router(vendor.router, max_body_size=max_body_size(settings))
    app.include_router(files.router)
    app.include_router(playground_router)  # the web playground: /playground/ (and / points there)
    # Outermost: Retry-After on every 429 and 503; nosniff everywhere; CSP, no framing, no referrer on pages.
    app.add_middleware(ResponseHeaders, retry_after_seconds=settings.retry_after_seconds)
    app.include_router(events.router)
    app.state.event_streams = runtime.streams

    # /readyz and /metrics on their own database handle and threads: nothing a request holds can starve them.
    ops_database = ops_database_for(settings)
    ops_threads = ThreadPoolExecutor(max_workers=3, thread_name_prefix="fluxserve-ops")  # one per probe
    stats = JobStats(ops_database, WorkerRegistry(ops_database), settings.stale_after_seconds)
    readiness = ops.Readiness(
        stats,
        runtime.services.blobs,
        settings.workers_expected,
        settings.stale_after_seconds,
        ops_threads,
        settings.readyz_timeout_seconds,
    )
    snapshot = ops.MetricsSnapshot(stats, settings.metrics_refresh_seconds, ops_threads)
    app.include_router(ops.router(readiness, snapshot, ops.Token(settings.metrics_token), settings.workers))
    app.state.ops_database = ops_database

    return app
