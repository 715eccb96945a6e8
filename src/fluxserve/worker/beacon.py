"""How a worker process tells its supervisor that it is alive: a file it touches while none of its
engines is stalled. Kept free of torch so that it runs from the first moment of the process, while the
model stack is still importing."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol


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


def start_beacon(path: Path, liveness: Liveness, interval: float, stop: threading.Event) -> None:
    """Touch ``path`` every ``interval`` seconds while the process is alive, until ``stop``."""

    def run() -> None:
        path.touch()
        while not stop.wait(interval):
            if liveness.alive():
                path.touch()

    threading.Thread(target=run, name="beacon", daemon=True).start()
