"""The one place that builds the app and chooses implementations from settings."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from fastapi import FastAPI
from sqlalchemy import Engine

from fluxserve import __version__
from fluxserve.accounts.keys import KeyStore
from fluxserve.api import files, reseller, vendor
from fluxserve.api.deps import Services
from fluxserve.api.errors import DeclaredBodyLimit, install_error_handlers
from fluxserve.core.catalog import load_catalog
from fluxserve.engines.registry import EngineRegistry
from fluxserve.jobs.database import make_engine, migrate
from fluxserve.jobs.store_sql import SqlJobStore
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.settings import Settings
from fluxserve.storage.base import BlobStore
from fluxserve.storage.local import LocalBlobStore
from fluxserve.storage.signing import UrlSigner
from fluxserve.webhooks.delivery import WebhookDispatcher
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.runner import Worker
from fluxserve.worker.upsample import StyleCueEnhancer

log = logging.getLogger("fluxserve")

SHUTDOWN_GRACE_SECONDS = 5.0


def make_blob_store(url: str) -> BlobStore:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(url2pathname(parts.path)))
    raise ValueError(f"FLUXSERVE_STORAGE_URL: unsupported scheme {parts.scheme!r} (use file://)")


@dataclass
class Runtime:
    """Everything with a lifetime: the database, the services, and the background work."""

    settings: Settings
    database: Engine
    services: Services
    policy: NetworkPolicy
    engines: EngineRegistry | None = None  # None in an API-only process
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        database = make_engine(settings.database)
        migrate(database)
        blobs = make_blob_store(settings.storage)
        store = SqlJobStore(database)
        catalog = load_catalog(settings.catalog_files)
        max_input_pixels = max(entry.max_input_pixels for entry in catalog.models.values())
        limits = Limits(
            max_active=settings.max_active_jobs,
            max_active_per_model={"flux-kontext-max": settings.max_active_jobs_kontext_max},
            max_input_bytes=settings.max_input_bytes,
            max_input_pixels=max_input_pixels,
        )
        services = Services(
            keys=KeyStore(database),
            jobs=store,
            submitter=Submitter(store, blobs, limits),
            blobs=blobs,
            signer=UrlSigner(settings.secret(), settings.url_ttl_seconds),
            base_url=settings.base_url,
        )
        policy = NetworkPolicy(parse_networks(settings.allowed_private_networks))
        runtime = cls(settings, database, services, policy)
        if settings.workers:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            cap = settings.model_memory_mb * 2**20 if settings.model_memory_mb else None
            registry = runtime.engines = EngineRegistry(catalog, settings.models, memory_cap_bytes=cap)
            inputs = InputLoader(blobs, policy, settings.max_input_bytes, max_input_pixels)
            prefix = f"{socket.gethostname()}-{os.getpid()}"
            runtime.workers = [
                Worker(
                    f"{prefix}-{index}",
                    store,
                    registry,
                    blobs,
                    inputs,
                    StyleCueEnhancer(),
                    heartbeat_seconds=settings.heartbeat_seconds,
                    stale_after_seconds=settings.stale_after_seconds,
                    engine_stall_seconds=settings.engine_stall_seconds,
                    max_attempts=settings.max_attempts,
                    poll_seconds=settings.poll_seconds,
                )
                for index in range(settings.workers)
            ]
        return runtime

    def payload_for(self, job_id: str) -> dict[str, Any] | None:
        job = self.services.jobs.get(job_id)
        return None if job is None else reseller.render_job(job, self.services)

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Workers (threads) and webhook delivery (a task) for as long as the context is open."""
        stop = threading.Event()
        threads = [
            threading.Thread(target=worker.run, args=(stop,), name=worker.worker_id, daemon=True)
            for worker in self.workers
        ]
        for thread in threads:
            thread.start()
        webhook_stop = asyncio.Event()
        webhooks = asyncio.create_task(self.dispatcher().run(webhook_stop))
        log.info("fluxserve ready", extra={"workers": len(threads), "base_url": self.settings.base_url})
        try:
            yield
        finally:
            stop.set()
            webhook_stop.set()
            await webhooks
            # A job still running is not waited for: its heartbeat stops and it is requeued.
            for thread in threads:
                await asyncio.to_thread(thread.join, SHUTDOWN_GRACE_SECONDS)

    def dispatcher(self) -> WebhookDispatcher:
        backoff = [float(value) for value in self.settings.webhook_backoff.split(",") if value.strip()]
        return WebhookDispatcher(
            self.database,
            self.payload_for,
            policy=self.policy,
            backoff=backoff,
            timeout=self.settings.webhook_timeout_seconds,
        )


def max_body_size(settings: Settings) -> int:
    """Room for four base64 images at the input limit, plus the rest of the request."""
    return 4 * settings.max_input_bytes * 4 // 3 + 1024 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with runtime.background():
            yield

    app = FastAPI(
        title="fluxserve",
        version=__version__,
        description="A self-hosted FLUX image API: the reseller dialect under /bfl/v1 and /flux/fetch.",
        lifespan=lifespan,
    )
    app.state.services = runtime.services
    app.state.runtime = runtime
    install_error_handlers(app)
    app.add_middleware(DeclaredBodyLimit, max_bytes=max_body_size(settings))
    # Route-level, so that a too-large body is an HTTPException our handlers render (413).
    app.include_router(reseller.router, max_body_size=max_body_size(settings))
    app.include_router(vendor.router, max_body_size=max_body_size(settings))
    app.include_router(files.router)

    @app.get("/healthz", tags=["ops"], summary="Liveness and readiness")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "workers": len(runtime.workers)}

    return app
