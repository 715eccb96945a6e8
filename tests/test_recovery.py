"""kill -9 in the middle of work, then a restart on the same data: every job still ends SUCCESS."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.conftest import Api, ServerProcess
from tests.test_lifecycle import slow_env, wait_for

MEDIUM_JOB = {"prompt": "durable", "width": 1024, "height": 1024, "steps": 16}


def test_kill_9_while_running_and_queued_loses_nothing(make_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(slow_env(tmp_path))
    server.start()
    client = Api(server.base_url, server.create_key("k", credits="100")["key"])
    job_ids = [client.job("flux-dev", {**MEDIUM_JOB, "seed": seed}) for seed in range(4)]
    wait_for(client, job_ids[0], "ON_QUEUE")
    statuses = {client.fetch(job_id)["status"] for job_id in job_ids[1:]}
    assert statuses == {"PENDING_QUEUE"}

    server.kill()
    server.start()
    client = Api(server.base_url, client.http.headers["TT-API-KEY"])
    for job_id in job_ids:
        body = client.wait(job_id, timeout=180)
        assert body["status"] == "SUCCESS", body
        image = Image.open(io.BytesIO(httpx.get(body["data"]["imageUrl"]).content))
        assert image.size == (1024, 1024)
    # every job charged exactly once
    keys = server.cli("keys", "list")
    assert '"credits": "90"' in keys
