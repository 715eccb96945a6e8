"""The parts of the Replicate surface below HTTP: a prediction's jobs admitted together (all or none), its
webhooks written by the claim and finish transactions (start once, an output per image, completed once),
the key's list page by page, how a prediction's status is read from its jobs, and Replicate's inputs
made into this server's fields."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, func, insert, select

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.api.replicate import _wait_seconds
from fluxserve.api.requests import SCHEMAS, size_fields
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.core.prediction import Prediction
from fluxserve.db.connection import MIGRATIONS, migrate, open_database, utcnow
from fluxserve.db.tables import credit_ledger, jobs, webhook_deliveries
from fluxserve.errors import InvalidFields, QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.predictions import PredictionStore
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.safety.moderation import effective_tolerance
from fluxserve.storage.local import LocalBlobStore
from fluxserve.surfaces.replicate import REPLICATE, render
from fluxserve.surfaces.replicate_inputs import INPUTS, SERVED
from fluxserve.wiring import make_stores

HOOK = "http://127.0.0.1:9/hook"
DEV = GenerationParams(model="flux-dev", prompt="p", width=512, height=512)


class World:
    def __init__(self, url: str, tmp_path: Path, max_active: int = 8) -> None:
        self.database: Engine = open_database(url)
        migrate(self.database)
        self.stores = make_stores(self.database)
        limits = Limits(max_active, {}, 2**20, 2**22)
        policy = NetworkPolicy(parse_networks("127.0.0.0/8"))  # the webhook's loopback target
        self.submitter = Submitter(
            self.stores.submissions, LocalBlobStore(tmp_path / "files"), limits, policy
        )
        self.keys = KeyStore(self.database)
        self.predictions = PredictionStore(self.database, self.stores.reads)

    def prediction(self, key: ApiKey, outputs: int, events: str | None = None) -> Prediction:
        made = self.predictions.create(
            Prediction(id=uuid.uuid4().hex[:26], key_id=key.id, model="flux-dev", input={},
                       outputs=outputs, webhook=HOOK, webhook_events=events)
        )  # fmt: skip
        made.jobs = self.submitter.submit_group(
            key, DEV, [None] * outputs, SurfaceName.REPLICATE, HOOK, made.id
        )
        return made

    def deliveries(self, job_id: str | None = None) -> int:
        query = select(func.count()).select_from(webhook_deliveries)
        if job_id is not None:
            query = query.where(webhook_deliveries.c.job_id == job_id)
        with self.database.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count(self, table: Any) -> int:
        with self.database.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_group_the_key_cannot_pay_for_whole_writes_nothing(database_url: str, tmp_path: Path) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("short", Decimal("4")).record
    entries = world.count(credit_ledger)
    with pytest.raises(QuotaExceeded) as refused:
        world.submitter.submit_group(key, DEV, [None, None], SurfaceName.REPLICATE)
    assert refused.value.price == Decimal("2.5")  # one job's quote (the 402 says "2 x")
    assert world.count(jobs) == 0 and world.count(credit_ledger) == entries
    assert world.keys.get(key.id).credits == Decimal("4")  # type: ignore[union-attr]
    assert len(world.submitter.submit_group(key, DEV, [None], SurfaceName.REPLICATE)) == 1


def test_a_group_over_the_keys_limit_writes_nothing(database_url: str, tmp_path: Path) -> None:
    world = World(database_url, tmp_path, max_active=2)
    key = world.keys.create("busy", Decimal("100")).record
    with pytest.raises(TooManyActiveJobs):
        world.submitter.submit_group(key, DEV, [1, 2, 3], SurfaceName.REPLICATE)
    assert world.count(jobs) == 0 and world.keys.get(key.id).credits == Decimal("100")  # type: ignore[union-attr]


def test_start_once_then_completed_once_with_that_filter(database_url: str, tmp_path: Path) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("hooks", Decimal("100")).record
    made = world.prediction(key, 2, "start,completed")
    first = world.stores.claims.claim("w1")
    assert first is not None and world.deliveries() == 1 and world.deliveries(first.id) == 1
    second = world.stores.claims.claim("w2")
    assert second is not None and world.deliveries() == 1  # the prediction started once
    assert world.stores.claims.finish(first.id, "w1", JobStatus.SUCCEEDED, result_key="a.png")
    assert world.deliveries() == 1  # an output, which this filter leaves out
    assert world.stores.claims.finish(second.id, "w2", JobStatus.SUCCEEDED, result_key="b.png")
    assert world.deliveries() == 2 and world.deliveries(second.id) == 1  # completed, by the last job
    assert world.predictions.get(made.id, key.id) is not None


def test_default_filter_sends_each_output_and_a_failure_only_when_it_ends_the_prediction(
    database_url: str, tmp_path: Path
) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("defaults", Decimal("100")).record
    world.prediction(key, 3)
    claimed = [world.stores.claims.claim(f"w{index}") for index in range(3)]
    assert all(job is not None for job in claimed) and world.deliveries() == 0  # no start by default
    first, second, third = (job.id for job in claimed if job is not None)
    world.stores.claims.finish(first, "w0", JobStatus.SUCCEEDED, result_key="a.png")
    world.stores.claims.finish(second, "w1", JobStatus.FAILED, error="boom")
    assert (world.deliveries(first), world.deliveries(second)) == (1, 0)  # an output; a failure is none
    world.stores.claims.finish(third, "w2", JobStatus.FAILED, error="boom")
    assert world.deliveries(third) == 1  # the last: completed, whatever its end


def test_canceling_queued_jobs_completes_the_prediction(database_url: str, tmp_path: Path) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("cancel", Decimal("10")).record
    made = world.prediction(key, 2, "completed")
    for job in made.jobs:
        world.stores.submissions.cancel(job.id, key.id)
    assert world.deliveries() == 1 and world.keys.get(key.id).credits == Decimal("10")  # type: ignore[union-attr]
    shown = _shown(world, made.id, key)
    assert shown["status"] == "canceled" and shown["output"] is None and shown["completed_at"] is not None


def _shown(world: World, prediction_id: str, key: ApiKey) -> dict[str, Any]:
    prediction = world.predictions.get(prediction_id, key.id)
    assert prediction is not None
    return render(prediction, _Links(), "http://here")


class _Links:
    base_url = "http://here"

    def __init__(self, prediction: Prediction | None = None) -> None:
        self.prediction = prediction

    def result_url(self, key: str | None) -> str | None:
        return None if key is None else f"http://here/files/{key}"

    def queue_position(self, job_id: str) -> int | None:
        return 0

    def prediction_of(self, job: JobRecord) -> Prediction | None:
        return self.prediction


def test_a_jobs_rendering_is_its_whole_prediction_or_alone_when_the_row_is_gone(
    database_url: str, tmp_path: Path
) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("render", Decimal("100")).record
    made = world.prediction(key, 2)
    prediction = world.predictions.get(made.id, key.id)
    assert prediction is not None
    first = made.jobs[0]
    whole = REPLICATE.render_job(first, _Links(prediction))
    assert whole == render(prediction, _Links(), "http://here") and len(whole["logs"].splitlines()) == 2
    alone = REPLICATE.render_job(first, _Links(None))
    assert alone["id"] == made.id and alone["status"] == "starting" and alone["logs"].count("\n") == 0
    assert alone["urls"]["get"] == f"http://here/v1/predictions/{made.id}"


def test_the_list_is_the_keys_own_newest_first_page_by_page(database_url: str, tmp_path: Path) -> None:
    world = World(database_url, tmp_path)
    key = world.keys.create("lists", Decimal("100")).record
    other = world.keys.create("other", Decimal("100")).record
    made = [world.prediction(key, 1).id for _ in range(3)]
    world.prediction(other, 1)
    page, more = world.predictions.page(key.id, None, 2)
    assert [item.id for item in page] == made[::-1][:2] and more
    rest, more = world.predictions.page(key.id, page[-1].id, 2)
    assert [item.id for item in rest] == made[:1] and not more
    assert world.predictions.page(key.id, "unknown", 2) == ([], False)


def _job(status: JobStatus, result_key: str | None = None) -> JobRecord:
    now = datetime.now(UTC)
    ended = status.is_terminal
    return JobRecord(
        id=f"j{status.value}", key_id="k", model="flux-dev", params={}, seed=1, output_format="png",
        prompt="p", cost=Decimal(1), status=status, result_key=result_key,
        error="boom" if status is JobStatus.FAILED else None,
        started_at=now if status is not JobStatus.QUEUED else None, finished_at=now if ended else None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("statuses", "started", "expected"),
    [
        ([JobStatus.QUEUED, JobStatus.QUEUED], False, "starting"),
        ([JobStatus.RUNNING, JobStatus.QUEUED], True, "processing"),
        ([JobStatus.SUCCEEDED, JobStatus.QUEUED], True, "processing"),
        ([JobStatus.SUCCEEDED, JobStatus.SUCCEEDED], True, "succeeded"),
        ([JobStatus.SUCCEEDED, JobStatus.FAILED], True, "failed"),
        ([JobStatus.CANCELED, JobStatus.SUCCEEDED], True, "canceled"),
        ([], False, "failed"),
    ],
)
def test_a_predictions_status_is_read_from_its_jobs(
    statuses: list[JobStatus], started: bool, expected: str
) -> None:
    prediction = Prediction(
        id="p", key_id="k", model="flux-dev", input={}, outputs=max(len(statuses), 1),
        created_at=datetime.now(UTC), started_at=datetime.now(UTC) if started else None,
        jobs=[_job(status, "r.png" if status is JobStatus.SUCCEEDED else None) for status in statuses],
    )  # fmt: skip
    shown = render(prediction, _Links(), "http://here")
    assert shown["status"] == expected
    assert (shown["error"] is not None) == (expected == "failed")
    succeeded = statuses.count(JobStatus.SUCCEEDED)
    assert shown["output"] == (["http://here/files/r.png"] * succeeded if succeeded else None)


def test_a_single_output_model_answers_one_url() -> None:
    prediction = Prediction(
        id="p", key_id="k", model="flux-pro-1.1", input={}, outputs=1, created_at=datetime.now(UTC),
        jobs=[_job(JobStatus.SUCCEEDED, "r.png")],
    )  # fmt: skip
    assert render(prediction, _Links(), "h")["output"] == "http://here/files/r.png"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("wait", 60), ("wait=5", 5), ("wait=600", 60), ("wait=0", 1), ("respond-async", None),
     ("respond-async, wait=3", 3), ("wait=soon", None)],
)  # fmt: skip
def test_prefer_wait(header: str | None, seconds: float | None) -> None:
    assert _wait_seconds(header) == seconds


def _fields(model: str, values: dict[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS[SurfaceName.VENDOR][model]
    return INPUTS[model].model_validate(values).fields(partial(size_fields, schema))


def test_inputs_become_this_servers_fields() -> None:
    dev = _fields("flux-dev", {"prompt": "x", "prompt_strength": 0.8, "output_format": "jpg", "unknown": 1})
    assert dev["image_prompt_strength"] == pytest.approx(0.2) and dev["output_format"] == "jpeg"
    assert (dev["width"], dev["height"]) == (1024, 1024)
    # steps and guidance not given are left to the model's schema: Replicate's defaults (28, 3), and a
    # catalog entry's own steps and guidance may take their place, as on the other surfaces
    assert "steps" not in dev and "guidance" not in dev
    params = SCHEMAS[SurfaceName.VENDOR]["flux-dev"].model_validate({**dev, "prompt": "x"}).to_params()
    assert (params.steps, params.guidance, params.defaulted) == (28, 3, ["steps", "guidance"])
    named = _fields("flux-dev", {"prompt": "x", "num_inference_steps": 12, "guidance": 2})
    assert (named["steps"], named["guidance"]) == (12, 2)
    assert _fields("flux-2-pro", {"prompt": "x", "aspect_ratio": "match_input_image"})["width"] == 1024
    assert "width" not in _fields("flux-2-pro", {"prompt": "x", "aspect_ratio": "match_input_image",
                                                 "input_images": ["http://a/b.png"]})  # fmt: skip
    assert _fields("flux-kontext-pro", {"prompt": "x"})["aspect_ratio"] == "1:1"  # nothing to match
    assert _fields("flux-pro-1.1", {"prompt": "x", "aspect_ratio": "custom", "width": 1000})["width"] == 992
    assert _fields("flux-2-flex", {"prompt": "x"})["prompt_upsampling"] is True


def test_each_served_model_has_its_inputs_and_a_stable_version() -> None:
    from fluxserve.surfaces.replicate import version_id

    assert set(SERVED) == {
        "flux-dev", "flux-1.1-pro", "flux-1.1-pro-ultra", "flux-kontext-pro", "flux-kontext-max",
        "flux-2-pro", "flux-2-max", "flux-2-flex",
    }  # fmt: skip
    versions = [version_id(spec) for spec in SERVED.values()]
    assert len(set(versions)) == len(SERVED)  # pro and max share their inputs, not their version
    assert versions == [version_id(spec) for spec in SERVED.values()]


def _alembic(engine: Engine, verb: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        getattr(command, verb)(config, revision)


def test_migration_0015_keeps_every_job_where_it_was_both_ways(database_url: str) -> None:
    engine = open_database(database_url)
    _alembic(engine, "upgrade", "0014")
    key = KeyStore(engine).create("before").record
    row = {
        "key_id": key.id, "model": "flux-dev", "surface": "reseller", "params": {}, "seed": 1,
        "output_format": "png", "prompt": "p", "cost_hundredths": 250, "progress": 0.0, "details": {},
        "attempts": 0, "cancel_requested": False, "created_at": utcnow(), "turn": 0, "worker_id": "w",
    }  # fmt: skip
    statuses = {"q": "queued", "r": "running", "s": "succeeded"}
    with engine.begin() as conn:
        conn.execute(
            insert(jobs), [{**row, "id": job_id, "status": status} for job_id, status in statuses.items()]
        )

    def kept() -> dict[str, str]:
        with engine.connect() as conn:
            return {job_id: status for job_id, status in conn.execute(select(jobs.c.id, jobs.c.status))}

    migrate(engine)
    assert kept() == statuses
    stores = make_stores(engine)
    assert all(stores.reads.get(job_id).prediction_id is None for job_id in statuses)  # type: ignore[union-attr]
    assert stores.claims.finish("r", "w", JobStatus.SUCCEEDED, result_key="x.png")  # of no prediction: ends
    _alembic(engine, "downgrade", "0014")
    assert kept() == {**statuses, "r": "succeeded"}


def test_disable_safety_checker_reaches_the_jobs_params_and_renamed_errors_name_replicates_inputs() -> None:
    from typing import cast

    from fluxserve.api.deps import Services
    from fluxserve.api.replicate import _request

    key = ApiKey("k", "k", "p", "whsec_x", None, True)
    no_images = cast(Services, None)  # only an uploaded file's input reads the services
    dev = INPUTS["flux-dev"]
    asked = dev.model_validate({"prompt": "x", "disable_safety_checker": True})
    relaxed = _request(SERVED["flux-dev"], asked, key, no_images)
    assert relaxed.safety_tolerance == 6 and (relaxed.steps, relaxed.guidance) == (28, 3)
    assert effective_tolerance(relaxed.safety_tolerance, 2) == 2  # the worker's cap: the operator's floor
    plain = _request(SERVED["flux-dev"], dev.model_validate({"prompt": "x"}), key, no_images)
    assert plain.safety_tolerance == 2
    with pytest.raises(InvalidFields) as refused:  # this server's guidance is 1.5..5; steps are named too
        _request(SERVED["flux-dev"], dev.model_validate({"prompt": "x", "guidance": 9}), key, no_images)
    assert refused.value.status_code == 422 and [field for field, _, _ in refused.value.fields] == [
        "guidance"
    ]
