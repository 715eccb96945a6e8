"""A worker process (``fluxserve worker``): worker threads that claim jobs and run them on engines.

This is the only kind of process that imports torch and loads models (and only when it serves a model on a
local engine: a worker that only relays runs without the ``local`` extra). ``fluxserve serve`` starts its
worker processes with :mod:`fluxserve.worker.supervisor`; on a GPU machine an operator runs one per GPU.
A stop (SIGTERM) drains the process: see :func:`run_worker_process`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from functools import partial

from sqlalchemy.exc import SQLAlchemyError

from fluxserve.core.catalog import Catalog, load_catalog
from fluxserve.engines.registry import EngineRegistry
from fluxserve.jobs.store import Claims
from fluxserve.jobs.workers import WorkerRegistry, process_name
from fluxserve.safety.moderation import make_moderator
from fluxserve.settings import Settings
from fluxserve.wiring import database_for, make_blob_store, make_feed, make_stores
from fluxserve.worker.beacon import Beacon, Liveness
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.runner import Worker
from fluxserve.worker.stack import runs_local_models
from fluxserve.worker.upsample import StyleCueEnhancer

log = logging.getLogger("fluxserve.worker")

HANDED_BACK_SECONDS = 5.0  # how long workers get to notice that their jobs were handed back, at most


def engine_registry(settings: Settings, catalog: Catalog) -> EngineRegistry:
    """The process's engines, within the operator's memory cap (``FLUXSERVE_MODEL_MEMORY_MB``)."""
    cap = settings.model_memory_mb * 2**20 if settings.model_memory_mb else None
    return EngineRegistry(catalog, settings.models, memory_cap_bytes=cap)


def build_workers(
    settings: Settings,
    store: Claims,
    threads: int,
    liveness: Liveness,
    models: Collection[str] | None = None,
) -> list[Worker]:
    """``threads`` workers sharing one engine registry (one copy of each model's weights), serving
    ``models`` (None: every model) and preferring the jobs of those whose weights they hold."""
    blobs = make_blob_store(settings.storage)
    catalog = load_catalog(settings.catalog_files)
    max_input_pixels = max(entry.max_input_pixels for entry in catalog.models.values())
    registry = engine_registry(settings, catalog)
    inputs = InputLoader(blobs, max_input_pixels)
    # One per process (its classifiers load once); the relay's jobs are moderated by the vendor.
    moderator = make_moderator(settings.moderation) if runs_local_models(catalog, models) else None
    return [
        Worker(
            f"{process_name()}-{index}",
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
            previews_every=settings.previews_interval_seconds if settings.previews else None,
            liveness=liveness,
            models=models,
            holding=registry.resident,
            moderator=moderator,
        )
        for index in range(threads)
    ]


def run_worker_process(
    settings: Settings,
    threads: int,
    liveness: Liveness,
    beacon: Beacon,
    stop: threading.Event,
    models: Collection[str] | None = None,
) -> None:
    """Run until ``stop`` is set, then drain: claim nothing more, give the running jobs
    ``worker_drain_seconds`` to finish, and hand back those still running (queued again at once, so a
    deploy costs them neither the stale timeout nor an attempt). ``beacon`` (running since the process
    started) refreshes the process's row in the workers table meanwhile; the row goes at the end."""
    if runs_local_models(load_catalog(settings.catalog_files), models):
        import torch

        torch.set_num_threads(settings.threads_per_worker)
    database = database_for(settings)
    store = make_stores(database, make_feed(database)).claims
    workers = build_workers(settings, store, threads, liveness, models)
    # The process's row in the workers table, for /readyz and /metrics of every API replica.
    registry, name = WorkerRegistry(database), process_name()
    seen = partial(registry.seen, name, threads)
    beacon.add(seen)
    # Daemons: a thread whose job was handed back and whose engine does not stop must not hold the exit.
    runners = [threading.Thread(target=w.run, args=(stop,), name=w.worker_id, daemon=True) for w in workers]
    for runner in runners:
        runner.start()
    log.info("worker process ready", extra={"threads": threads, "torch_threads": settings.threads_per_worker})
    while not stop.is_set() and any(runner.is_alive() for runner in runners):
        stop.wait(0.5)
    drain(store, workers, runners, settings.worker_drain_seconds)
    beacon.remove(seen)
    try:
        registry.leave(name)
    except SQLAlchemyError:
        log.warning("could not remove this worker process's row", exc_info=True)


def drain(store: Claims, workers: list[Worker], runners: list[threading.Thread], grace: float) -> None:
    """Wait up to ``grace`` seconds for the runners (stopped: they finish their jobs and claim no more),
    then hand back the jobs of those still running. Their engines stop at the next step, the job no
    longer theirs; the process does not wait long for that."""
    log.info("worker process draining", extra={"grace_seconds": grace})
    deadline = time.monotonic() + grace
    for runner in runners:
        runner.join(timeout=max(0.0, deadline - time.monotonic()))
    busy = [worker.worker_id for worker, runner in zip(workers, runners, strict=True) if runner.is_alive()]
    if not busy:
        return
    handed = store.hand_back(busy)
    log.warning("drain time over; running jobs handed back", extra={"jobs": handed, "grace_seconds": grace})
    deadline = time.monotonic() + HANDED_BACK_SECONDS
    for runner in runners:
        runner.join(timeout=max(0.0, deadline - time.monotonic()))
