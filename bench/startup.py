"""Start-up cost of each kind of process: import time and peak memory, and an API-only server's time to
healthy and resident memory.

    python bench/startup.py [--src DIR] [--repeat N]

``--src`` points at another checkout's ``src`` (e.g. a git worktree of an older commit) to compare.
Run on an idle machine; each figure is the median of ``--repeat`` fresh interpreters.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROBE = (
    "import resource, sys, time; t = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)


def import_cost(module: str, env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def serve_cost(env: dict[str, str]) -> tuple[float, float]:
    """Seconds from exec to a 200 from /healthz, and resident MiB then, of `serve --no-workers`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluxserve",
                "serve",
                "--no-workers",
                "--port",
                str(port),
                "--data-dir",
                data,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.02)
            ready = time.perf_counter() - started
            status = Path(f"/proc/{process.pid}/status").read_text()
            rss = (
                next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
            )
        finally:
            process.terminate()
            process.wait()
    return ready, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    rows = {
        "import fluxserve.app (API process)": lambda: import_cost("fluxserve.app", env),
        "import fluxserve.worker.process (worker process)": lambda: import_cost(
            "fluxserve.worker.process", env
        ),
        "serve --no-workers: to healthy, resident": lambda: serve_cost(env),
    }
    for name, measure in rows.items():
        try:
            samples = [measure() for _ in range(args.repeat)]
        except subprocess.CalledProcessError:
            print(f"{name}: not in this checkout")
            continue
        seconds = statistics.median(sample[0] for sample in samples)
        mib = statistics.median(sample[1] for sample in samples)
        print(f"{name}: {seconds:.2f} s, {mib:.0f} MiB")


if __name__ == "__main__":
    main()
