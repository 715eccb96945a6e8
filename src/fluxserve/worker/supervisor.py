"""Worker processes, started and watched from a process that never loads a model (``fluxserve serve``).

Each child is ``fluxserve worker``, the same command an operator runs on a GPU machine, with the parent's
settings in its environment. A child that exits, or whose beacon file goes stale (it hung: stopped,
stuck in a kernel, or its engine stopped making progress), is killed and started again, with a growing
pause when it keeps failing at once. Its job is taken back by the stale-job reaper of a live worker, so a
crash costs the job one attempt and never the API. A stop drains the children: each finishes its running
jobs within ``FLUXSERVE_WORKER_DRAIN_SECONDS`` and hands back the rest before it exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fluxserve.settings import Settings

log = logging.getLogger("fluxserve.supervisor")

BEACON_ENV = "FLUXSERVE_WORKER_BEACON"
CHECK_SECONDS = 0.5
MAX_RESTART_PAUSE = 30.0
STABLE_AFTER_SECONDS = 60.0
PR_SET_PDEATHSIG = 1
STARTUP_SECONDS = 120.0  # a child that ran this long resets the restart pause
EXIT_SECONDS = 15.0  # after its drain time, for a child to hand its jobs back and exit before it is killed


def _die_with_parent() -> None:
    """In the child, before it runs: the kernel kills it when the supervising process dies (even by
    SIGKILL), so a crashed server leaves no worker behind to compete with the next one. Linux only."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_environment(settings: Settings) -> dict[str, str]:
    """The parent's settings as ``FLUXSERVE_*`` variables, with the embedded defaults made explicit."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None and name not in ("workers", "host", "port"):
            env[f"FLUXSERVE_{name.upper()}"] = str(value)
    env["FLUXSERVE_DATABASE_URL"] = settings.database
    env["FLUXSERVE_STORAGE_URL"] = settings.storage
    env["FLUXSERVE_PUBLIC_URL"] = settings.base_url
    env["FLUXSERVE_TORCH_THREADS"] = str(settings.threads_per_worker)
    return env


@dataclass
class _Child:
    slot: int
    beacon: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Keeps ``count`` worker processes running until :meth:`stop`."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        beacons = settings.data_dir / "run"
        beacons.mkdir(parents=True, exist_ok=True)
        self._children = [
            _Child(slot, beacons / f"worker-{os.getpid()}-{slot}.beacon") for slot in range(count)
        ]
        self._env = child_environment(settings)
        self._stale_after = settings.stale_after_seconds
        self._grace = settings.worker_drain_seconds + EXIT_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        for child in self._children:
            self._spawn(child)
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM every child (each drains: it ends or hands back its jobs), SIGKILL the ones still running
        after their drain time and ``EXIT_SECONDS`` more."""
        grace = self._grace
        self._stop.set()
        self._thread.join()
        running = [
            child.process for child in self._children if child.process and child.process.poll() is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in self._children:
            child.beacon.unlink(missing_ok=True)

    def _spawn(self, child: _Child) -> None:
        child.beacon.unlink(missing_ok=True)
        env = {**self._env, BEACON_ENV: str(child.beacon)}
        command = [sys.executable, "-m", "fluxserve", "worker", "--data-dir", str(self._settings.data_dir)]
        child.process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        child.started = time.monotonic()
        log.info("worker process started", extra={"slot": child.slot, "pid": child.process.pid})

    def _run(self) -> None:
        while not self._stop.wait(CHECK_SECONDS):
            for child in self._children:
                try:
                    self._check(child)
                except OSError:
                    log.exception("supervising a worker process failed", extra={"slot": child.slot})

    def _check(self, child: _Child) -> None:
        now = time.monotonic()
        process = child.process
        if process is None:
            if now >= child.restart_at:
                self._spawn(child)
            return
        code = process.poll()
        if code is None and self._hung(child):
            log.error(
                "worker process stopped reporting; killing it",
                extra={"slot": child.slot, "pid": process.pid, "silent_seconds": self._stale_after},
            )
            process.kill()
            code = process.wait()
        if code is None:
            return
        ran = now - child.started
        child.pause = 0.0 if ran > STABLE_AFTER_SECONDS else min(MAX_RESTART_PAUSE, max(0.5, child.pause * 2))
        child.process, child.restart_at = None, now + child.pause
        log.error(
            "worker process exited; starting another",
            extra={"slot": child.slot, "exit_code": code, "ran_seconds": round(ran, 1), "pause": child.pause},
        )

    def _hung(self, child: _Child) -> bool:
        """A live worker process refreshes its beacon from its first second on (imports and model loading
        included); it gets ``STARTUP_SECONDS`` to start the interpreter and write it the first time."""
        try:
            return time.time() - child.beacon.stat().st_mtime > self._stale_after
        except FileNotFoundError:
            return time.monotonic() - child.started > STARTUP_SECONDS
