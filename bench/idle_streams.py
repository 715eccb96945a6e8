"""What idle event streams cost an API process: many open streams on jobs that do not change.

    python bench/idle_streams.py [--streams 500] [--keys 16] [--window 10] [--samples 50]

A `fluxserve serve` subprocess without workers (so queued jobs stay as they are) on SQLite; each of
``--keys`` keys submits one job and opens its share of ``--streams`` streams on it (`/flux/events`, one
asyncio client). Measured first with no stream open, then with all of them open and their first event
received: the API process's CPU share over ``--window`` seconds (psutil), the median of ``--samples``
sequential `/healthz` requests, and the median of ``--samples`` submits of another key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import psutil

from bench.engine import serve
from fluxserve.accounts.keys import KeyStore
from fluxserve.db.connection import open_database


def cpu_share(process: psutil.Process, window: float) -> float:
    """The process's (and its threads') CPU time over ``window`` seconds, as a share of one core."""
    before, started = process.cpu_times(), time.monotonic()
    time.sleep(window)
    after = process.cpu_times()
    return (after.user + after.system - before.user - before.system) / (time.monotonic() - started)


def median_ms(base: str, samples: int, key: str | None = None) -> float:
    """The median of ``samples`` sequential /healthz requests, or submits of ``key``, in ms."""
    times = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for index in range(samples):
            started = time.perf_counter()
            if key is None:
                response = client.get("/healthz")
            else:
                body = {"prompt": f"another key's job {index}"}
                response = client.post("/bfl/v1/flux-dev", json=body, headers={"TT-API-KEY": key})
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return statistics.median(times)


def measure(label: str, base: str, server: int, key: str, args: argparse.Namespace) -> None:
    process = psutil.Process(server)
    share = cpu_share(process, args.window)
    health = median_ms(base, args.samples)
    submit = median_ms(base, args.samples, key)
    print(
        f"{label}: API process {share * 100:.1f} % of a core, /healthz p50 {health:.1f} ms, "
        f"submit p50 {submit:.1f} ms"
    )


async def hold_streams(
    base: str, keys: list[str], count: int, opened: threading.Event, stop: threading.Event
) -> int:
    """Open ``count`` streams spread over ``keys`` (one job each), set ``opened`` once each had its first
    event, hold them until ``stop``; returns how many were still open then."""
    limits = httpx.Limits(max_connections=count + 16, max_keepalive_connections=count + 16)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        jobs = []
        for key in keys:
            response = await client.post(
                "/bfl/v1/flux-dev", json={"prompt": "a job nobody runs"}, headers={"TT-API-KEY": key}
            )
            jobs.append((key, response.json()["data"]["jobId"]))
        first = asyncio.Semaphore(0)

        async def one(key: str, job_id: str) -> None:
            headers = {"TT-API-KEY": key}
            async with client.stream(
                "GET", "/flux/events", params={"jobId": job_id}, headers=headers
            ) as response:
                assert response.status_code == 200, await response.aread()
                told = False
                async for line in response.aiter_lines():  # held open until cancelled
                    if line.startswith("event:") and not told:
                        told = True
                        first.release()
            raise AssertionError("a stream ended")  # the idle timeout is far beyond the run

        tasks = [asyncio.create_task(one(*jobs[index % len(jobs)])) for index in range(count)]
        for _ in range(count):
            await first.acquire()
        opened.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        ended = sum(task.done() for task in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return count - ended


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    env = {**os.environ, "FLUXSERVE_WORKERS": "0", "FLUXSERVE_MAX_ACTIVE_JOBS": "100000"}
    with tempfile.TemporaryDirectory() as scratch:
        server, base, other = serve(Path(scratch), env)
        try:
            keys = KeyStore(open_database(f"sqlite:///{Path(scratch) / 'fluxserve.db'}"))
            streamers = [keys.create(f"streams-{index}", Decimal(1000)).key for index in range(args.keys)]
            print(
                f"{args.streams} streams over {args.keys} keys, window {args.window:g} s, "
                f"{args.samples} samples"
            )
            measure("no streams", base, server.pid, other, args)
            opened, stop = threading.Event(), threading.Event()
            held: list[int] = []
            holder = threading.Thread(
                target=lambda: held.append(
                    asyncio.run(hold_streams(base, streamers, args.streams, opened, stop))
                ),
                daemon=True,
            )
            started = time.monotonic()
            holder.start()
            assert opened.wait(600), "the streams did not all open"
            print(f"  {args.streams} streams open in {time.monotonic() - started:.1f} s")
            time.sleep(2)  # settled
            measure(f"{args.streams} idle streams", base, server.pid, other, args)
            stop.set()
            holder.join(30)
            print(f"  streams still open at the end: {held[0] if held else 'unknown'}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
