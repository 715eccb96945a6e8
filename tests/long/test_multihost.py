"""fluxserve across hosts: a database host (PostgreSQL and an S3-compatible server), two API hosts and two
worker hosts, each a network namespace with its own address (tests/support/netns.py).

200 jobs from 8 clients go through both API hosts; mid-run one worker process and one API process are
killed with SIGKILL. Every job must end SUCCESS exactly once with one image in the bucket, and every webhook
must arrive at least once with one stable webhook-id. Clients do what a careful client does: every submit
carries an Idempotency-Key, and a request that gets no answer is sent again to the other API host.

It takes a few minutes, so ``make test`` leaves it out (marker ``multihost``) and ``.ci/run`` runs it with
the other long scenarios (``make test-long``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_ENV, free_port
from tests.e2e.test_webhooks_e2e import Receiver
from tests.support import netns, s3_server
from tests.support.pg_server import PostgresCluster, binaries

JOBS, CLIENTS = 200, 8
JOB = {"prompt": "a red circle", "width": 256, "height": 256, "steps": 1}
HOSTS = ["db", "api1", "api2", "w1", "w2"]


class Process:
    """A fluxserve (or helper) process on one test host; its output goes to a log file."""

    def __init__(self, host: netns.Host, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                host.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_until_up(url: str, process: Process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{url} exited: {process.tail()}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up: {process.tail()}")


class Cluster:
    def __init__(self, hosts: dict[str, netns.Host], tmp: Path, models_dir: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.processes: list[Process] = []
        bin_dir = binaries()
        assert bin_dir is not None
        db = hosts["db"]
        self.postgres = PostgresCluster(bin_dir, host=db.address, prefix=db.command([]))
        self.postgres.start()
        s3_port = free_port()
        self.s3_endpoint = f"http://{db.address}:{s3_port}"
        moto = [
            sys.executable,
            "-c",
            "from moto.server import main; main()",
            "-H",
            db.address,
            "-p",
            str(s3_port),
        ]
        self.s3 = self.spawn("db", moto, {})
        wait_until_up(self.s3_endpoint, self.s3)
        self.bucket = f"fluxserve-{uuid.uuid4().hex[:8]}"
        assert httpx.put(f"{self.s3_endpoint}/{self.bucket}", timeout=10).status_code == 200
        self.receiver = Receiver(host=f"{netns.SUBNET}.1")  # on the bridge: the test's own host
        self.env = {
            **FAST_ENV,
            **s3_server.CREDENTIALS,
            "FLUXSERVE_MODELS_DIR": str(models_dir),
            "FLUXSERVE_DATABASE_URL": self.postgres.database(),
            "FLUXSERVE_STORAGE_URL": f"s3://{self.bucket}/fx?endpoint={self.s3_endpoint}&region=us-east-1",
            "FLUXSERVE_ALLOWED_PRIVATE_NETWORKS": f"{netns.SUBNET}.0/24",
            "FLUXSERVE_TORCH_THREADS": "1",
        }
        self.apis = {name: self.api(name) for name in ("api1", "api2")}
        self.workers = {name: self.worker(name) for name in ("w1", "w2")}

    def spawn(self, host: str, argv: list[str], env: dict[str, str]) -> Process:
        process = Process(self.hosts[host], argv, {**os.environ, **env}, self.tmp / f"{host}.log")
        self.processes.append(process)
        return process

    def fluxserve(self, host: str, *args: str) -> Process:
        data_dir = self.tmp / host
        return self.spawn(
            host, [sys.executable, "-m", "fluxserve", *args, "--data-dir", str(data_dir)], self.env
        )

    def api(self, host: str) -> Process:
        address = self.hosts[host].address
        process = self.fluxserve(host, "serve", "--host", address, "--port", "8000", "--no-workers")
        wait_until_up(f"http://{address}:8000/healthz", process)
        return process

    def worker(self, host: str) -> Process:
        return self.fluxserve(host, "worker")

    def base_urls(self) -> list[str]:
        return [f"http://{self.hosts[name].address}:8000" for name in ("api1", "api2")]

    def create_key(self) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "fluxserve", "keys", "create", "--name", "multihost", "--json"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(result.stdout))

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.receiver.close()
        self.postgres.stop()


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[Cluster]:
    netns.require()
    if binaries() is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    with netns.hosts(HOSTS) as hosts:
        made = Cluster(hosts, tmp_path, models_dir)
        try:
            yield made
        finally:
            made.close()


class Client:
    """One client thread's jobs: submit with an Idempotency-Key, poll to the end, fail over on silence."""

    def __init__(self, urls: list[str], key: str, webhook_url: str, start: int) -> None:
        self.urls = urls
        self.webhook_url = webhook_url
        self.turn = start
        self.http = httpx.Client(headers={"TT-API-KEY": key}, timeout=10)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(200):
            url = self.urls[self.turn % len(self.urls)]
            try:
                response = self.http.request(method, url + path, **kwargs)
                if response.status_code < 500:
                    return response
            except httpx.HTTPError:
                pass
            self.turn += 1  # that host is down (or failing): the other one
            time.sleep(0.1)
        raise AssertionError(f"no API host answered {method} {path}")

    def run(self, count: int, done: list[str]) -> None:
        for index in range(count):
            headers = {"Idempotency-Key": uuid.uuid4().hex}
            body = {**JOB, "seed": index, "webhook_url": self.webhook_url}
            response = self.call("POST", "/bfl/v1/flux-dev", json=body, headers=headers)
            assert response.status_code == 200, response.text
            job_id = response.json()["data"]["jobId"]
            while True:
                fetched = self.call("GET", "/flux/fetch", params={"jobId": job_id}).json()
                if fetched["status"] in ("SUCCESS", "FAILED"):
                    break
                time.sleep(0.1)
            assert fetched["status"] == "SUCCESS", fetched
            done.append(job_id)
            self.turn += 1  # spread over both API hosts


def test_two_api_hosts_two_worker_hosts_kill_9_loses_nothing(cluster: Cluster) -> None:
    key = cluster.create_key()
    done: list[str] = []
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            Client(cluster.base_urls(), key["key"], cluster.receiver.url, index).run(JOBS // CLIENTS, done)
        except BaseException as error:  # reported below, with the hosts' logs
            errors.append(error)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    killed: list[str] = []
    while any(thread.is_alive() for thread in threads):
        if len(done) >= 50 and not killed:
            cluster.workers["w1"].kill()  # SIGKILL, mid-job: its job goes back to the queue
            killed.append("w1")
        if len(done) >= 100 and len(killed) == 1:
            cluster.apis["api1"].kill()  # SIGKILL: clients fail over, its webhook leases run out
            killed.append("api1")
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in cluster.processes[-4:])
    assert not errors, f"{errors[0]!r}\n{logs}"
    assert killed == ["w1", "api1"]
    assert len(done) == JOBS and len(set(done)) == JOBS

    # One image per job in the bucket, read with the S3 server's own listing.
    keys = s3_server.object_keys(cluster.bucket, "fx/results/", cluster.s3_endpoint)
    assert len(keys) == JOBS
    assert {Path(name).stem for name in keys} == set(done)

    # Every webhook at least once, with one webhook-id per job.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(delivered(cluster.receiver)) < JOBS:
        time.sleep(0.2)
    ids = delivered(cluster.receiver)
    assert set(ids) == set(done), f"{len(set(done) - set(ids))} webhooks missing"
    assert all(len(found) == 1 for found in ids.values()), {j: i for j, i in ids.items() if len(i) > 1}


def delivered(receiver: Receiver) -> dict[str, set[str]]:
    """Job id -> the webhook-ids its successful deliveries carried."""
    found: dict[str, set[str]] = {}
    for headers, body, code in list(receiver.requests):
        if code == 200:
            lower = {name.lower(): value for name, value in headers.items()}
            found.setdefault(json.loads(body)["jobId"], set()).add(lower["webhook-id"])
    return found
