"""kill -9 in the middle of work, then a restart on the same data: every job still ends SUCCESS, and a
webhook waiting for its retry is still delivered."""

from __future__ import annotations

import io

import httpx
from PIL import Image
from standardwebhooks import Webhook

from tests.conftest import Api, ServerProcess
from tests.e2e.test_lifecycle import slow_env, wait_for
from tests.e2e.test_webhooks_e2e import Receiver, delivered

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


def test_kill_9_keeps_a_pending_webhook_which_arrives_after_the_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    """A delivery that failed and waits for its retry is in the database, not in the killed process: after
    ``kill -9`` and a restart it is delivered, once, with the webhook-id its first try carried."""
    receiver = Receiver(fail_first=10**6)  # fails every try until told otherwise
    server: ServerProcess = make_server({"FLUXSERVE_WEBHOOK_BACKOFF": ",".join(["0.5"] * 8)})
    key = server.create_key()
    server.start()
    try:
        client = Api(server.base_url, key["key"])
        job_id = client.job("flux-dev", {"prompt": "hook", "steps": 1, "webhook_url": receiver.url})
        receiver.wait(1, timeout=120)
        server.kill()
        tries_before = len(receiver.requests)
        receiver.fail_first = tries_before  # the target is back
        server.start()
        delivered(server, job_id, timeout=60)  # recorded: no further try can follow
        codes = [code for _, _, code in receiver.requests]
        assert codes == [500] * tries_before + [200], codes
        ids = {{n.lower(): v for n, v in h.items()}["webhook-id"] for h, _, _ in receiver.requests}
        assert len(ids) == 1, ids
        headers, body, _ = receiver.requests[-1]
        payload = Webhook(key["webhook_secret"]).verify(body, {n.lower(): v for n, v in headers.items()})
        assert payload["jobId"] == job_id and payload["status"] == "SUCCESS"
    finally:
        receiver.close()
