"""Peak memory of the API process while it takes large multipart uploads (issue 20, break 2).

    python bench/upload_memory.py [--mb 105] [--parallel 1] [--credits unlimited|0]

Starts ``fluxserve serve`` (no workers) on a fresh data directory, sends ``--parallel`` uploads of one
``image`` part of ``--mb`` MB each to ``/flux/edits`` at once, samples the API process's resident memory
(psutil, every 5 ms) and prints its size before, its peak and its size after, with the answers' status codes.
Run it against another tree by putting that tree's ``src`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from bench.engine import serve

MB = 1_000_000


def body(boundary: str, size: int) -> Iterator[bytes]:
    """A multipart form with a prompt, a mode and one ``image`` part of ``size`` bytes, made as it is sent."""
    for name, value in (("prompt", "make it blue"), ("mode", "flux-kontext-pro")):
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunk = b"\x89PNG" + b"x" * (MB - 4)
    for _ in range(size // MB):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=105)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--credits", default="unlimited", help="'0': a key that cannot pay for any job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "FLUXSERVE_WORKERS": "0"}
        server, base, key = serve(Path(scratch), env)
        try:
            if args.credits != "unlimited":
                command = ["credits", "set", "bench", args.credits, "--data-dir", scratch]
                subprocess.run(
                    [sys.executable, "-m", "fluxserve", *command], env=env, check=True, capture_output=True
                )
            api = psutil.Process(server.pid)
            httpx.get(f"{base}/healthz")
            before = api.memory_info().rss
            peak = before
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, api.memory_info().rss)
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)
            sampler.start()

            def upload(_: int) -> int | str:
                headers = {"TT-API-KEY": key, "Content-Type": "multipart/form-data; boundary=bench"}
                content = body("bench", args.mb * MB)
                try:
                    return httpx.post(
                        f"{base}/flux/edits", content=content, headers=headers, timeout=600
                    ).status_code
                except httpx.HTTPError as error:  # an early answer may close the connection mid-body
                    return type(error).__name__

            with ThreadPoolExecutor(args.parallel) as pool:
                codes = list(pool.map(upload, range(args.parallel)))
            time.sleep(1)
            stop.set()
            sampler.join()
            after = api.memory_info().rss
        finally:
            server.terminate()
            server.wait()
    print(
        f"{args.parallel} x {args.mb} MB, credits {args.credits}: status {codes}; RSS before "
        f"{before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB (+{(peak - before) / 2**20:.0f}), "
        f"after {after / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
