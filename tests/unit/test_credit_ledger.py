"""The credit ledger on a real database (SQLite, and PostgreSQL when it runs): every change to a key's
credits is an entry naming its job or operator, and a finite balance is the sum of its key's entries."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import insert, select

from fluxserve.accounts.keys import OPERATOR
from fluxserve.core.job import JobStatus
from fluxserve.db import ledger
from fluxserve.db.connection import MIGRATIONS, migrate, open_database, utcnow
from fluxserve.db.tables import api_keys, credit_ledger
from fluxserve.jobs.fetching import InputFetcher
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from tests.e2e.test_fetch_stage import origin  # noqa: F401 - the loopback image origin fixture
from tests.unit import test_worker_inprocess
from tests.unit.test_cli import Cli
from tests.unit.test_worker_inprocess import World

world = test_worker_inprocess.world
blobs = test_worker_inprocess.blobs


def entries(world: World, key_id: str) -> list[tuple[str, int, str | None, str | None]]:
    database = world.keys.database
    query = (
        select(credit_ledger.c.kind, credit_ledger.c.amount_hundredths, credit_ledger.c.job_id,
               credit_ledger.c.operator)
        .where(credit_ledger.c.key_id == key_id)
        .order_by(credit_ledger.c.id)
    )  # fmt: skip
    with database.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


def assert_balanced(world: World, key_id: str) -> None:
    with world.keys.database.connect() as conn:
        balance = conn.execute(select(api_keys.c.credits_hundredths).where(api_keys.c.id == key_id)).scalar()
        assert balance == ledger.entries_sum(conn, key_id)


def test_every_change_is_an_entry_and_the_entries_add_up_to_the_balance(world: World, origin: str) -> None:  # noqa: F811
    key = world.key("100")
    kept = world.submit(key, steps=1)  # flux-dev: 2.5 credits
    refunded = world.submit(key, steps=1)
    canceled = world.submit(key, steps=1)
    assert world.end(kept, JobStatus.SUCCEEDED, result_key="r.png")
    assert world.end(refunded, JobStatus.FAILED, error="boom")
    assert world.stores.submissions.cancel(canceled.id, key.id) is not None
    url = {"field": "input_image", "ref": f"{origin}/png/64x64"}  # held at the 4 MP bound, then repriced
    fetched = world.submit(key, model="flux-2-max", input_images=[url], width=1024, height=1024, steps=None)
    stage = InputFetcher(
        world.stores.fetches, world.blobs, NetworkPolicy(parse_networks("127.0.0.0/8")), max_bytes=2**20,
        max_pixels=2**22, timeout=5, concurrency=1, per_key=1,
    )  # fmt: skip
    (leased,) = world.stores.fetches.lease(stage.owner, 1, 1)
    asyncio.run(stage.fetch(leased))
    world.keys.add_credits(key, Decimal("10"), operator="cli:alice")
    world.keys.take_credits(world.keys.get(key.id), Decimal("3"), operator="cli:bob")  # type: ignore[arg-type]
    assert_balanced(world, key.id)
    world.keys.set_credits(world.keys.get(key.id), Decimal("42"), operator="cli:carol")  # type: ignore[arg-type]
    assert_balanced(world, key.id)
    assert world.balance(key) == Decimal(42)
    assert entries(world, key.id) == [
        ("set", 10000, None, OPERATOR),  # the starting balance
        ("hold", -250, kept.id, None),
        ("hold", -250, refunded.id, None),
        ("hold", -250, canceled.id, None),
        ("settle", 0, kept.id, None),
        ("refund", 250, refunded.id, None),
        ("refund", 250, canceled.id, None),
        ("hold", -1900, fetched.id, None),  # 1.05 + 4.19 (the URL's bound) = 5 MP: 7 + 4 x 3
        ("refund", 1200, fetched.id, None),  # 1.05 + 0.004 (the 64x64 fetched) = 1 MP: 7
        ("topup", 1000, None, "cli:alice"),
        ("take", -300, None, "cli:bob"),
        ("set", 4200 - (10000 - 750 + 500 - 700 + 1000 - 300), None, "cli:carol"),
    ]


def test_an_unlimited_key_that_gets_a_balance_is_balanced_from_then_on(world: World) -> None:
    key = world.keys.create("unlimited").record
    job = world.submit(key, steps=1)
    assert world.end(job, JobStatus.FAILED, error="boom")  # its hold and refund: entries
    world.keys.set_credits(key, Decimal("5"))
    assert_balanced(world, key.id)
    world.keys.set_credits(world.keys.get(key.id), None)  # type: ignore[arg-type]
    world.keys.set_credits(world.keys.get(key.id), Decimal("7"))  # type: ignore[arg-type]
    assert_balanced(world, key.id)


def test_the_migration_opens_each_finite_balance_with_a_set_entry(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0011")
        row = {"name": "n", "key_prefix": "p", "webhook_secret": "s", "active": True, "created_at": utcnow()}
        conn.execute(insert(api_keys), [
            {**row, "id": "finite", "key_hash": "h1", "name": "a", "credits_hundredths": 1234},
            {**row, "id": "unlimited", "key_hash": "h2", "name": "b", "credits_hundredths": None},
        ])  # fmt: skip
    migrate(database)
    with database.connect() as conn:
        rows = conn.execute(
            select(credit_ledger.c.key_id, credit_ledger.c.kind, credit_ledger.c.amount_hundredths)
        )
        assert [tuple(row) for row in rows] == [("finite", "set", 1234)]


def test_usage_reports_from_the_ledger_and_survives_pruning_job_rows(world: World, tmp_path: Path) -> None:
    key = world.key("100")
    kept, refunded = world.submit(key, steps=1), world.submit(key, steps=1)
    assert world.end(kept, JobStatus.SUCCEEDED, result_key="r.png")
    assert world.end(refunded, JobStatus.FAILED, error="boom")
    world.keys.add_credits(key, Decimal("10"))
    cli = Cli(tmp_path / "data", world.database_url)
    expected = [
        {"group": "(operator)", "key": key.name, "charged": "0", "jobs": 0, "operator": "110"},
        {"group": "flux-dev", "key": key.name, "charged": "2.5", "jobs": 1, "operator": "0"},
    ]
    assert cli.json("usage", "--by", "model", "--key", key.name, "--json") == expected
    (today,) = cli.json("usage", "--key", key.name, "--json")
    assert today["charged"] == "2.5" and today["operator"] == "110"

    assert "removed 2 job record(s)" in cli("prune", "--rows-older-than", "0").stdout
    assert world.stores.reads.get(kept.id) is None and world.stores.reads.get(refunded.id) is None
    assert cli.json("usage", "--by", "model", "--key", key.name, "--json") == expected
    assert_balanced(world, key.id)
    assert [kind for kind, *_ in entries(world, key.id)] == ["set", "topup", "summary"]


def test_usage_refuses_a_since_that_is_no_date(world: World, tmp_path: Path) -> None:
    result = Cli(tmp_path / "data", world.database_url)("usage", "--since", "yesterday", code=2)
    assert "--since: 'yesterday' is not a date" in result.stderr
