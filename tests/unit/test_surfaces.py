"""The surfaces in process: which one owns a path (unknown paths included), every refusal rendered by every
surface with the exception's own status, each job stored with its surface and rendered by it (its webhook
body), and migration 0013 keeping every job's surface where it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from fluxserve.api.deps import Services
from fluxserve.api.errors import DATABASE_AWAY, RETRY_AFTER_SECONDS, database_unavailable
from fluxserve.app import Runtime, create_app
from fluxserve.core.models import SurfaceName
from fluxserve.db.connection import MIGRATIONS, migrate, open_database, utcnow
from fluxserve.errors import (
    IdempotencyConflict,
    InvalidFields,
    InvalidInput,
    KeyRefused,
    QuotaExceeded,
    Refused,
    RequestRefused,
    ServerBusy,
    TooManyActiveJobs,
)
from fluxserve.settings import Settings
from fluxserve.surfaces import SURFACES, Surface, for_path, named, owner

SHAPE = {  # where each surface's error message is
    SurfaceName.RESELLER: lambda body: body["message"] if body["status"] == "FAILED" else None,
    SurfaceName.RESELLER_NATIVE: lambda body: body["message"] if body["status"] == "FAILED" else None,
    SurfaceName.VENDOR: lambda body: body["detail"],
    SurfaceName.OPENAI: lambda body: body["error"]["message"],
    SurfaceName.REPLICATE: lambda body: body["detail"] if body["title"] and body["status"] else None,
}


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/bfl/v1/flux-dev", SurfaceName.RESELLER),
        ("/flux/fetch", SurfaceName.RESELLER),
        ("/flux/events", SurfaceName.RESELLER),
        ("/flux/generate", SurfaceName.RESELLER_NATIVE),
        ("/flux/edits", SurfaceName.RESELLER_NATIVE),
        ("/v1/flux-dev", SurfaceName.VENDOR),
        ("/v1/get_result", SurfaceName.VENDOR),
        ("/v1/no-such-route", SurfaceName.VENDOR),  # every /v1/ path that is not OpenAI's
        ("/v1/images/generations", SurfaceName.OPENAI),  # the longer prefix wins over /v1/
        ("/v1/images/edits", SurfaceName.OPENAI),
        ("/v1/predictions", SurfaceName.REPLICATE),  # Replicate's prefixes are longer than /v1/ too
        ("/v1/predictions/abc/cancel", SurfaceName.REPLICATE),
        ("/v1/models/black-forest-labs/flux-dev/predictions", SurfaceName.REPLICATE),
        ("/v1/models/nobody/nothing", SurfaceName.REPLICATE),
        ("/v1/files/abc", SurfaceName.REPLICATE),
        ("/v1/webhooks/default/secret", SurfaceName.REPLICATE),
    ],
)
def test_the_longest_prefix_owns_a_path(path: str, name: SurfaceName) -> None:
    surface = owner(path)
    assert surface is not None and surface.name is name
    assert for_path(path) is surface


@pytest.mark.parametrize("path", ["/files/abc", "/healthz", "/playground/", "/", "/nope", "/bfl/v2/x"])
def test_a_path_no_surface_owns_is_answered_in_the_resellers_envelope(path: str) -> None:
    assert owner(path) is None
    assert for_path(path) is named(SurfaceName.RESELLER)


def test_every_surface_is_registered_once_under_its_name() -> None:
    assert sorted(surface.name for surface in SURFACES) == sorted(SurfaceName)
    for surface in SURFACES:
        assert named(surface.name) is surface


def _refusals(surface: Surface) -> list[RequestRefused]:
    return [
        Refused(418, "a router's own words", param="field", code="teapot"),
        InvalidInput("seed", "must be an integer"),
        KeyRefused(missing=True, status_code=surface.auth_status),
        KeyRefused(missing=False, status_code=surface.auth_status),
        QuotaExceeded(Decimal("2.5"), "flux-dev"),
        QuotaExceeded(None, "flux-2-pro", count=2, balance=Decimal(1)),
        IdempotencyConflict(),
        TooManyActiveJobs(),
        ServerBusy("the queue is full"),
    ]


@pytest.mark.parametrize("surface", SURFACES, ids=lambda surface: surface.name.value)
def test_every_surface_renders_every_refusal_with_its_status_in_its_shape(surface: Surface) -> None:
    for refused in _refusals(surface):
        response = surface.refusal(refused, {"connection": "close"})
        body = json.loads(response.body)
        # An input that failed a deeper check is a field's error: the vendor answers those 422, as FastAPI.
        expected = surface.invalid_status if isinstance(refused, InvalidInput) else refused.status_code
        assert response.status_code == expected, (refused, body)
        assert response.headers["connection"] == "close"
        if isinstance(body.get("detail"), list):  # the vendor's field errors name the field
            (item,) = body["detail"]
            assert item["msg"] == str(refused) and item["loc"][-1] in ("seed", "Idempotency-Key")
            continue
        message = SHAPE[surface.name](body)
        assert message, body
        if isinstance(refused, QuotaExceeded):
            assert refused.model in message and "credits" in message.lower()
        if isinstance(refused, ServerBusy):
            assert message == "Server busy: the queue is full"


def test_openai_refusals_carry_their_param_and_code() -> None:
    openai = named(SurfaceName.OPENAI)
    body = json.loads(openai.refusal(InvalidInput("image", "not a decodable image")).body)
    assert body["error"] == {
        "message": "image: not a decodable image",
        "type": "invalid_request_error",
        "param": "image",
        "code": None,
    }
    quota = json.loads(openai.refusal(QuotaExceeded(Decimal(4), "flux-dev", count=2)).body)["error"]
    assert (
        quota["message"] == "Not enough credits: 2 x flux-dev costs 8"
        and quota["code"] == "insufficient_quota"
    )
    busy = json.loads(openai.error(503, "later").body)["error"]
    assert busy["type"] == "server_error"


def test_replicate_refusals_are_problem_details_and_inputs_at_fault_are_listed() -> None:
    replicate = named(SurfaceName.REPLICATE)
    fields = [("num_outputs", "less_than_equal", "must be at most 4"), ("prompt", "required", "is required")]
    answer = replicate.refusal(InvalidFields(fields))
    body = json.loads(answer.body)
    assert answer.status_code == 422 and body["title"] == "Input validation failed" and body["status"] == 422
    assert body["invalid_fields"] == [
        {"type": "less_than_equal", "field": "num_outputs", "description": "must be at most 4"},
        {"type": "required", "field": "prompt", "description": "is required"},
    ]
    single = json.loads(replicate.refusal(InvalidInput("image", "not a decodable image")).body)
    assert single["invalid_fields"] == [
        {"type": "invalid", "field": "image", "description": "not a decodable image"}
    ]
    # A request that failed its schema: the same 422, each field named.
    failed = json.loads(
        replicate.validation_error([{"loc": ("body", "input"), "type": "missing", "msg": "x"}]).body
    )
    assert [item["field"] for item in failed["invalid_fields"]] == ["input"]
    # The quota's words name the model as Replicate spells it.
    quota = json.loads(replicate.refusal(QuotaExceeded(Decimal(4), "flux-pro-1.1", count=2)).body)
    assert quota == {
        "title": "Insufficient credit",
        "detail": "Not enough credits: 2 x flux-1.1-pro costs 8",
        "status": 402,
    }
    assert json.loads(replicate.error(418, "short and stout").body)["title"] == "I'm a Teapot"


@pytest.mark.parametrize(
    ("authorization", "key"),
    [
        ("Bearer fs_a", "fs_a"),
        ("Token fs_a", "fs_a"),
        ("token  fs_a ", "fs_a"),
        ("Basic fs_a", None),
        ("", None),
    ],
)
def test_replicate_takes_a_bearer_or_a_token(authorization: str, key: str | None) -> None:
    assert named(SurfaceName.REPLICATE).read_key({"authorization": authorization}) == key


class World:
    def __init__(self, client: TestClient, services: Services, runtime: Runtime) -> None:
        self.client = client
        self.services = services
        self.runtime = runtime
        self.key = services.keys.create("surfaces", Decimal(1000)).key


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("surfaces"), workers=0, openai_wait_seconds=0.2)
    app = create_app(settings)
    with TestClient(app) as client:
        yield World(client, app.state.services, app.state.runtime)


def _submit(world: World, name: SurfaceName) -> str:
    """One job through ``name``'s submit route; its id."""
    prompt = {"prompt": f"a job of {name}"}
    if name is SurfaceName.RESELLER:
        answer = world.client.post("/bfl/v1/flux-dev", json=prompt, headers={"TT-API-KEY": world.key})
        return str(answer.json()["data"]["jobId"])
    if name is SurfaceName.RESELLER_NATIVE:
        body = {**prompt, "mode": "flux1-dev"}
        answer = world.client.post("/flux/generate", json=body, headers={"TT-API-KEY": world.key})
        return str(answer.json()["data"]["jobId"])
    if name is SurfaceName.VENDOR:
        return str(world.client.post("/v1/flux-dev", json=prompt, headers={"x-key": world.key}).json()["id"])
    if name is SurfaceName.REPLICATE:  # a prediction of one output: its one job
        path = "/v1/models/black-forest-labs/flux-dev/predictions"
        answer = world.client.post(
            path, json={"input": prompt}, headers={"Authorization": f"Token {world.key}"}
        )
        assert answer.status_code == 201, answer.text
        prediction = world.services.predictions.get(answer.json()["id"])
        assert prediction is not None
        (job,) = prediction.jobs
        return job.id
    # No worker: the synchronous request gives up after its wait (504) naming the job it made.
    bearer = {"Authorization": f"Bearer {world.key}"}
    answer = world.client.post("/v1/images/generations", json={**prompt, "model": "flux-dev"}, headers=bearer)
    assert answer.status_code == 504, answer.text
    return str(answer.json()["error"]["message"]).rsplit("(ids: ", 1)[1].rstrip(")")


@pytest.mark.parametrize("name", list(SurfaceName), ids=str)
def test_a_job_is_stored_with_its_surface_and_its_webhook_is_that_surfaces_rendering(
    world: World, name: SurfaceName
) -> None:
    job_id = _submit(world, name)
    job = world.services.jobs.get(job_id)
    assert job is not None and job.surface is name
    payload = world.runtime.webhook_payload(job)
    assert payload.body == named(name).render_job(job, world.services)
    if name is SurfaceName.VENDOR:
        assert payload.body["id"] == job_id and payload.body["status"] == "Pending"
    elif name is SurfaceName.REPLICATE:  # the job's whole prediction, as its GET shows it
        assert payload.body["id"] == job.prediction_id and payload.body["status"] == "starting"
        fetched = world.client.get(
            f"/v1/predictions/{job.prediction_id}", headers={"Authorization": f"Bearer {world.key}"}
        )
        assert fetched.json() == payload.body
    else:  # the reseller, its own format and OpenAI's (which has no job object): the fetch JSON
        assert payload.body["jobId"] == job_id and payload.body["status"] == "PENDING_QUEUE"
        fetched = world.client.get("/flux/fetch", params={"jobId": job_id}, headers={"TT-API-KEY": world.key})
        assert fetched.json() == payload.body


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/nope", lambda body: body == {"status": "FAILED", "message": "Not Found", "data": None}),
        ("/flux/nope", lambda body: body["message"] == "Not Found"),
        ("/v1/nope", lambda body: body == {"detail": "Not Found"}),
        ("/v1/images/nope", lambda body: body["error"]["message"] == "Not Found"),
        (
            "/v1/models/a/b/c/d",
            lambda body: body == {"title": "Not found", "detail": "Not Found", "status": 404},
        ),
    ],
)
def test_an_unknown_path_is_a_404_in_its_owners_shape(world: World, path: str, message: Any) -> None:
    answer = world.client.get(path)
    assert answer.status_code == 404 and message(answer.json()), answer.text


@pytest.mark.parametrize(
    ("path", "status", "where"),
    [
        ("/bfl/v1/flux-dev", 401, lambda body: body["message"]),
        ("/flux/generate", 401, lambda body: body["message"]),
        ("/v1/flux-dev", 403, lambda body: body["detail"]),
        ("/v1/images/generations", 401, lambda body: body["error"]["message"]),
        ("/v1/models/black-forest-labs/flux-dev/predictions", 401, lambda body: body["detail"]),
    ],
)
def test_the_guard_and_the_route_refuse_a_wrong_key_alike(
    world: World, path: str, status: int, where: Any
) -> None:
    """The guard answers a submit route before its body; the route's own dependency answers the others:
    both through the surface, in the same words."""
    wrong = {"TT-API-KEY": "fs_wrong", "x-key": "fs_wrong", "Authorization": "Bearer fs_wrong"}
    guarded = world.client.post(path, json={"prompt": "p"}, headers=wrong)
    assert guarded.status_code == status
    surface = for_path(path)
    expected = json.loads(surface.refusal(KeyRefused(missing=False, status_code=status)).body)
    assert guarded.json() == expected and where(expected)


def test_migration_0013_keeps_each_jobs_surface(tmp_path: Path) -> None:
    """Jobs of the release before (``dialect``) keep their value as ``surface``; OpenAI and own-format
    jobs made before the upgrade were stored as reseller jobs, and read so."""
    engine = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    now = utcnow()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0012")
        conn.execute(
            text(
                "INSERT INTO api_keys (id, name, key_prefix, key_hash, webhook_secret, active, created_at) "
                "VALUES ('k', 'k', 'p', 'h', 's', 1, :now)"
            ),
            {"now": now},
        )
        for job_id, dialect, status in [("a", "reseller", "queued"), ("b", "vendor", "succeeded")]:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, key_id, model, dialect, status, params, seed, output_format, "
                    "prompt, cost_hundredths, progress, details, attempts, cancel_requested, created_at) "
                    "VALUES (:id, 'k', 'flux-dev', :dialect, :status, '{}', 1, 'jpeg', 'p', 250, 0, '{}', 0, "
                    "0, :now)"
                ),
                {"id": job_id, "dialect": dialect, "status": status, "now": now},
            )
    migrate(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, surface, status FROM jobs ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [("a", "reseller", "queued"), ("b", "vendor", "succeeded")]


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("/bfl/v1/flux-dev", lambda body: body["message"]),
        ("/flux/generate", lambda body: body["message"]),
        ("/v1/get_result", lambda body: body["detail"]),
        ("/v1/images/generations", lambda body: body["error"]["message"]),
        ("/v1/predictions", lambda body: body["detail"]),
        ("/healthz", lambda body: body["message"]),  # no surface owns it: the reseller's envelope
    ],
)
def test_the_database_away_is_a_503_with_retry_after_in_the_paths_shape(path: str, where: Any) -> None:
    away = OperationalError("SELECT 1", {}, Exception("connection refused"))
    answer = database_unavailable(path, away)
    assert answer.status_code == 503 and answer.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert where(json.loads(answer.body)) == DATABASE_AWAY
