"""A worker process's liveness, and the one signal that carries it out.

Liveness has four mechanisms, one word each:

- a **heartbeat** is a worker thread vouching for the job it runs (``Claims.heartbeat``: the job's
  ``worker_id``/``heartbeat_at``); a job whose heartbeat stops goes back to the queue (``requeue_stale``);
- a **renewal** is an API process keeping its fetch lease (``FetchLeases.renew``: ``fetch_owner``/
  ``fetch_renewed_at``); a lease not renewed is freed for another process (``release_stale``);
- a **stall** is an engine that neither reports progress nor asks about cancellation for
  ``FLUXSERVE_ENGINE_STALL_SECONDS`` (``worker.runner``): its job's heartbeat stops, and the process is no
  longer :class:`Liveness`-alive;
- the **beacon** (here) is the process saying that it is alive, every few seconds while no engine of it
  stalls, to whoever listens: the supervisor's beacon file (``fluxserve serve`` kills and restarts a worker
  whose file goes stale) and the process's row in the workers table (``jobs/workers.py``, counted by
  ``/readyz`` and ``/metrics`` on every replica).

Kept free of torch so that the beacon runs from the first moment of the process, while the model stack is
still importing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger("fluxserve.worker")


class Watched(Protocol):
    @property
    def stalled(self) -> bool: ...


class Liveness:
    """The jobs running in this process: the process is alive while none of their engines is stalled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()

    @contextmanager
    def watch(self, items: Iterable[Watched]) -> Iterator[None]:
        items = list(items)
        with self._lock:
            self._watched.update(items)
        try:
            yield
        finally:
            with self._lock:
                self._watched.difference_update(items)

    def alive(self) -> bool:
        with self._lock:
            return not any(item.stalled for item in self._watched)


Receiver = Callable[[], object]


class Beacon:
    """Every ``interval`` seconds while ``alive()``, call each receiver (touch a file, refresh a row). A
    receiver that fails (a database briefly away) costs its own signal once, never the others'."""

    def __init__(self, alive: Callable[[], bool], interval: float) -> None:
        self._alive = alive
        self._interval = interval
        self._receivers: list[Receiver] = []
        self._lock = threading.Lock()  # held through a round: a receiver removed gets no later signal

    def add(self, receiver: Receiver) -> None:
        """Signal ``receiver`` too, at once and then at every round."""
        with self._lock:
            self._receivers.append(receiver)
            self._signal(receiver)

    def remove(self, receiver: Receiver) -> None:
        """Signal ``receiver`` no more (once this returns, a round under way has ended)."""
        with self._lock:
            self._receivers.remove(receiver)

    def start(self, stop: threading.Event | None = None) -> threading.Thread:
        """Run the rounds on a daemon thread, until ``stop`` (None: until the process exits, so that a
        draining process is not taken for a hung one)."""
        stop = stop or threading.Event()

        def run() -> None:
            while not stop.wait(self._interval):
                if self._alive():
                    with self._lock:
                        for receiver in self._receivers:
                            self._signal(receiver)

        thread = threading.Thread(target=run, name="beacon", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _signal(receiver: Receiver) -> None:
        try:
            receiver()
        except Exception:
            log.warning("a beacon signal failed; the next round tries again", exc_info=True)
