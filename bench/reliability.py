"""A reliability run anyone can repeat: many jobs from many clients while the server is killed.

    python -m bench.reliability [--jobs 2000] [--clients 32] [--steps 2] [--port 8790]

Loopback only, bounded in jobs and time. A `fluxserve serve` process (the API and one supervised worker
process) on a fresh data dir, the bundled model with few steps; ``--clients`` threads submit ``--jobs``
jobs in all, each with a webhook to a local receiver and an ``Idempotency-Key``, retrying a submit whose
answer was lost. Meanwhile the worker process is killed with SIGKILL once, and the whole server twice
(then started again on the same data). At the end every job is checked: it succeeded exactly once, its
image is stored exactly once, and its webhook arrived at least once with one stable ``webhook-id``.
Resident memory of the API and worker processes is read after 100 and after 1,000 finished jobs of one
server's life (the kills come after that). Prints a JSON report; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

DEADLINE_SECONDS = 3600


class Receiver:
    """Webhook endpoint: job id -> the webhook-ids it was delivered with."""

    def __init__(self) -> None:
        self.deliveries: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with receiver.lock:
                    receiver.deliveries[body["jobId"]].append(self.headers.get("webhook-id", ""))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Server:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "FLUXSERVE_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
            "FLUXSERVE_HEARTBEAT_SECONDS": "0.5",
            "FLUXSERVE_STALE_AFTER_SECONDS": "4",
            "FLUXSERVE_WEBHOOK_BACKOFF": "0.5,1,2,4,8",
            "FLUXSERVE_MAX_ACTIVE_JOBS": "100000",
            "FLUXSERVE_TORCH_THREADS": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        command = [sys.executable, "-m", "fluxserve", *args, "--data-dir", str(self.data_dir)]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True).stdout

    def start(self) -> None:
        log = (self.data_dir / "server.log").open("ab")
        command = [sys.executable, "-m", "fluxserve", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--data-dir", str(self.data_dir)], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def children(self) -> list[int]:
        assert self.process is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="fluxserve-reliability-"))
    server = Server(data_dir, args.port)
    key = json.loads(server.cli("keys", "create", "--name", "reliability", "--json"))["key"]
    receiver = Receiver()
    server.start()

    # Kills: the worker process once, the whole server twice; placed after the memory readings.
    kills = {1100: "worker", 1400: "server", 1700: "server"}
    lock = threading.Lock()
    submitted: dict[str, str] = {}  # idempotency key -> job id
    retried_submits = 0
    memory: dict[str, dict[str, float]] = {}
    started = time.monotonic()

    def submit_one(idempotency_key: str, index: int) -> None:
        """Submit until answered, the same Idempotency-Key each time."""
        nonlocal retried_submits
        body = {
            "prompt": f"a large red heart in the center on a blue background ({index})",
            "width": 256,
            "height": 256,
            "steps": args.steps,
            "seed": index,
            "webhook_url": receiver.url,
        }
        headers = {"TT-API-KEY": key, "Idempotency-Key": idempotency_key}
        while time.monotonic() - started < DEADLINE_SECONDS:
            try:
                response = httpx.post(
                    f"{server.base_url}/bfl/v1/flux-dev", json=body, headers=headers, timeout=30
                )
            except httpx.HTTPError:
                with lock:
                    retried_submits += 1
                time.sleep(
                    0.5
                )  # the server is down: the same key again, so a submit that landed is not doubled
                continue
            if response.status_code == 200:
                with lock:
                    submitted[idempotency_key] = response.json()["data"]["jobId"]
                return
            raise RuntimeError(f"submit refused: {response.status_code} {response.text}")
        raise RuntimeError("the run went over its time limit")

    counter = iter(range(args.jobs))
    finished = 0

    def wait_for(job_id: str) -> int:
        """Poll until the job ends (through restarts); returns how many jobs had ended with this one."""
        nonlocal finished
        while time.monotonic() - started < DEADLINE_SECONDS:
            try:
                body = httpx.get(
                    f"{server.base_url}/flux/fetch", params={"jobId": job_id}, headers={"TT-API-KEY": key}
                ).json()
            except (httpx.HTTPError, ValueError):
                body = {}
            if body.get("status") in ("SUCCESS", "FAILED"):
                with lock:
                    finished += 1
                    return finished
            time.sleep(0.3)
        raise RuntimeError("the run went over its time limit")

    def client() -> None:
        # A closed loop: each client waits for its job before sending the next, so the kills below land
        # while work is running, not while it is only queued.
        for index in counter:
            idempotency_key = str(uuid.uuid4())
            submit_one(idempotency_key, index)
            done = wait_for(submitted[idempotency_key])
            if done in (100, 1000) and f"after {done}" not in memory:
                pids = server.children()
                assert server.process is not None
                memory[f"after {done}"] = {
                    "api_mib": round(resident_mib(server.process.pid), 1),
                    "worker_mib": round(resident_mib(pids[0]), 1) if pids else -1.0,
                }
            action = kills.pop(done, None)
            if action == "worker":
                for pid in server.children():
                    os.kill(pid, signal.SIGKILL)
            elif action == "server":
                with lock:
                    server.kill()
                    server.start()

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Wait for every job to end.
    http = httpx.Client(base_url=server.base_url, headers={"TT-API-KEY": key}, timeout=30)
    statuses: dict[str, str] = {}
    while time.monotonic() - started < DEADLINE_SECONDS:
        for job_id in submitted.values():
            if statuses.get(job_id) not in ("SUCCESS", "FAILED"):
                statuses[job_id] = http.get("/flux/fetch", params={"jobId": job_id}).json()["status"]
        if all(status in ("SUCCESS", "FAILED") for status in statuses.values()):
            break
        time.sleep(1)
    # Webhooks may still be in flight: give them the backoff's length.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(receiver.deliveries) < len(submitted):
        time.sleep(0.5)

    results = list((data_dir / "files" / "results").rglob("*.*"))
    per_job_files: dict[str, int] = defaultdict(int)
    for path in results:
        per_job_files[path.stem] += 1
    job_ids = set(submitted.values())
    report = {
        "jobs": args.jobs,
        "clients": args.clients,
        "submitted": len(submitted),
        "distinct_jobs": len(job_ids),
        "succeeded": sum(status == "SUCCESS" for status in statuses.values()),
        "lost": args.jobs - len(job_ids),
        "images": len(results),
        "images_duplicated": sum(count > 1 for count in per_job_files.values()),
        "webhooks_missing": len(job_ids - set(receiver.deliveries)),
        "webhook_ids_unstable": sum(len(set(ids)) > 1 for ids in receiver.deliveries.values()),
        "webhooks_delivered_more_than_once": sum(len(ids) > 1 for ids in receiver.deliveries.values()),
        "submits_retried_while_down": retried_submits,
        "memory": memory,
        "seconds": round(time.monotonic() - started, 1),
        "data_dir": str(data_dir),
    }
    if server.process is not None:
        server.process.terminate()
    print(json.dumps(report, indent=2))
    ok = (
        report["lost"] == 0
        and report["succeeded"] == args.jobs
        and report["images"] == args.jobs
        and report["images_duplicated"] == 0
        and report["webhooks_missing"] == 0
        and report["webhook_ids_unstable"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
