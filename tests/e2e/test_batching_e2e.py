"""Queued jobs of one model and size run as one batch, and each gets the image it would get alone."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx

from tests.conftest import Api, ServerProcess, catalog_env
from tests.e2e.test_lifecycle import wait_for

CATALOG = """
[models."flux-dev"]
options = { max_batch = 4 }
"""


def batch_sizes(server: ServerProcess, job_ids: list[str]) -> list[int]:
    with sqlite3.connect(server.data_dir / "fluxserve.db") as db:
        rows = dict(db.execute("SELECT id, details FROM jobs").fetchall())
    return [json.loads(rows[job_id])["batch_size"] for job_id in job_ids]


def test_queued_jobs_batch_and_match_solo_runs(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog = tmp_path / "batch.toml"
    catalog.write_text(CATALOG)
    server: ServerProcess = make_server(catalog_env(catalog))
    server.start()
    client = Api(server.base_url, server.create_key()["key"])
    blocker = client.job("flux-pro", {"prompt": "busy", "width": 1024, "height": 1024, "steps": 50})
    wait_for(client, blocker, "ON_QUEUE")
    requests = [
        {"prompt": f"shape number {seed}", "width": 512, "height": 512, "steps": 3, "seed": seed}
        for seed in range(4)
    ]
    batched = [client.job("flux-dev", request) for request in requests]
    bodies = [client.wait(job_id) for job_id in batched]
    assert all(body["status"] == "SUCCESS" for body in bodies), bodies
    assert batch_sizes(server, batched) == [4, 4, 4, 4]

    solo_bytes = []
    solo_ids = []
    for request in requests:
        job_id = client.job("flux-dev", request)
        solo_ids.append(job_id)
        solo_bytes.append(httpx.get(client.wait(job_id)["data"]["imageUrl"]).content)
    assert batch_sizes(server, solo_ids) == [1, 1, 1, 1]
    batched_bytes = [httpx.get(body["data"]["imageUrl"]).content for body in bodies]
    assert batched_bytes == solo_bytes
    assert len(set(batched_bytes)) == 4
