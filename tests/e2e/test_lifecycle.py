"""Fetch shapes for every status, cancellation, credits and limits, and each failure path."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import Api, ServerProcess, catalog_env

SLOW_CATALOG = """
[models."flux-dev"]
max_pixels = 0
"""


def slow_env(tmp_path: Path) -> dict[str, str]:
    """flux-dev at full size and 50 steps: slow enough on the tiny model to be seen running."""
    catalog = tmp_path / "slow.toml"
    catalog.write_text(SLOW_CATALOG)
    return catalog_env(catalog)


SLOW_JOB = {"prompt": "slow", "width": 1440, "height": 1440, "steps": 50}


def wait_for(client: Api, job_id: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.fetch(job_id)
        if body["status"] == status and (status != "ON_QUEUE" or body["data"]["progress"] > 0):
            return body
        time.sleep(0.02)
    raise AssertionError(f"{job_id} never reached {status}: {body}")


def credits_of(server: ServerProcess, name: str) -> str:
    for line in server.cli("keys", "list").splitlines():
        key = json.loads(line)
        if key["name"] == name:
            return key["credits"]
    raise AssertionError(name)


def test_pending_shape_without_workers(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server()
    server.start("--no-workers")
    client = Api(server.base_url, server.create_key()["key"])
    job_id = client.job("flux-kontext-pro", {"prompt": "queued", "webhook_url": "https://example.com/hook"})
    body = client.fetch(job_id)
    assert body == {
        "status": "PENDING_QUEUE",
        "message": "",
        "jobId": job_id,
        "data": {
            "mode": "flux-kontext-pro",
            "jobId": job_id,
            "prompt": "queued",
            "quota": "4",
            "size": "1024x1024",  # kontext without an input image: 1:1, known at submit
            "seed": body["data"]["seed"],
            "imageUrl": None,
            "hookUrl": "https://example.com/hook",
            "progress": 0.0,
            "queuePosition": 0,  # an added field: the queued jobs created before it
        },
    }
    assert body["data"]["seed"].isdigit()


def test_running_shape_progress_and_cancel(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(slow_env(tmp_path))
    server.start()
    client = Api(server.base_url, server.create_key("c", credits="10")["key"])
    job_id = client.job("flux-dev", SLOW_JOB)
    queued = client.job("flux-dev", SLOW_JOB)
    body = wait_for(client, job_id, "ON_QUEUE")
    assert 0 < body["data"]["progress"] < 1
    assert body["data"]["imageUrl"] is None and body["message"] == ""
    assert credits_of(server, "c") == "5"  # both held
    # a queued job is canceled at once, the running one at its next step
    assert client.http.post("/flux/cancel", json={"jobId": queued}).json()["status"] == "FAILED"
    client.http.post("/flux/cancel", json={"jobId": job_id})
    ended = client.wait(job_id)
    assert ended["status"] == "FAILED" and "Canceled" in ended["message"]
    assert ended["data"]["quota"] == "0"
    assert credits_of(server, "c") == "10"  # refunded


def test_credits_402_and_active_limit_429(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server({"FLUXSERVE_MAX_ACTIVE_JOBS": "2"})
    server.start("--no-workers")
    poor = Api(server.base_url, server.create_key("poor", credits="3")["key"])
    assert poor.submit("flux-dev", {"prompt": "x"}).status_code == 200
    response = poor.submit("flux-dev", {"prompt": "x"})
    assert response.status_code == 402, response.text
    assert response.json()["status"] == "FAILED" and "credits" in response.json()["message"]
    rich = Api(server.base_url, server.create_key("rich")["key"])
    assert rich.submit("flux-dev", {"prompt": "x"}).status_code == 200
    assert rich.submit("flux-dev", {"prompt": "x"}).status_code == 200
    response = rich.submit("flux-dev", {"prompt": "x"})
    assert response.status_code == 429
    assert "active jobs" in response.json()["message"]


def test_bad_url_input_fails_the_job_and_refunds(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server()
    server.start()
    client = Api(server.base_url, server.create_key("k", credits="8")["key"])
    job_id = client.job(
        "flux-kontext-pro", {"prompt": "edit", "input_image": f"{server.base_url}/files/missing.png"}
    )
    body = client.wait(job_id)
    assert body["status"] == "FAILED"
    assert body["message"].startswith("input_image: ")
    assert body["data"]["quota"] == "0" and body["data"]["imageUrl"] is None
    assert credits_of(server, "k") == "8"


def test_private_url_input_is_refused_without_the_operator_switch(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server({"FLUXSERVE_ALLOWED_PRIVATE_NETWORKS": ""})
    server.start()
    client = Api(server.base_url, server.create_key()["key"])
    job_id = client.job("flux-kontext-pro", {"prompt": "edit", "input_image": f"{server.base_url}/healthz"})
    body = client.wait(job_id)
    assert body["status"] == "FAILED"
    assert "input_image" in body["message"] and "not allowed" in body["message"]


def test_engine_failure_fails_the_job_with_a_message(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog = tmp_path / "broken.toml"
    catalog.write_text(f'[models."flux-pro"]\nweights = "{tmp_path / "no-such-model"}"\n')
    server: ServerProcess = make_server(catalog_env(catalog))
    server.start()
    client = Api(server.base_url, server.create_key("k", credits="5")["key"])
    body = client.wait(client.job("flux-pro", {"prompt": "x", "steps": 1}))
    assert body["status"] == "FAILED"
    assert body["message"] and "Traceback" not in body["message"]
    assert credits_of(server, "k") == "5"
    # the server keeps serving other models
    ok = client.wait(client.job("flux-dev", {"prompt": "x", "steps": 1}))
    assert ok["status"] == "SUCCESS"
