"""The operator's commands as a new user meets them: keys, credits, jobs, the database they use, --version.

In-process (typer's runner) on real SQLite databases: the commands are thin, a subprocess proves nothing more.
"""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from PIL import Image
from sqlalchemy import insert, select
from typer.testing import CliRunner, Result

from fluxserve import __version__
from fluxserve.accounts.keys import KeyStore
from fluxserve.cli import app, inline_image, inline_image_protocol
from fluxserve.db.connection import MIGRATIONS, migrate, open_database, utcnow
from fluxserve.db.tables import api_keys, jobs


@pytest.fixture(autouse=True)
def _no_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLUXSERVE_DATA_DIR", "FLUXSERVE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


class Cli:
    """``fluxserve ...`` on one data dir (and a database elsewhere when given)."""

    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.env = {"FLUXSERVE_DATABASE_URL": database_url} if database_url else {}
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(app, [*args, "--data-dir", str(self.data_dir)], env=self.env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args).stdout)

    def key(self, name: str, credits: str | None = None) -> dict[str, Any]:
        extra = [] if credits is None else ["--credits", credits]
        return self.json("keys", "create", "--name", name, "--json", *extra)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"fluxserve {__version__}"


@pytest.mark.parametrize("command", [["keys", "list"], ["keys"], ["credits"], ["jobs"], ["prune"]])
def test_from_another_folder_a_command_names_the_missing_database_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, command)
    expected = tmp_path / "data" / "fluxserve.db"
    assert result.exit_code == 1
    assert f"no fluxserve database at {expected}" in result.stderr and "--data-dir" in result.stderr
    assert not (tmp_path / "data").exists()


def test_every_command_says_which_database_it_used(cli: Cli) -> None:
    created = cli("keys", "create", "--name", "a")
    listed = cli("keys", "list")
    url = f"database: sqlite:///{(cli.data_dir / 'fluxserve.db').resolve()}"
    assert url in created.stderr and url in listed.stderr
    assert "database" not in listed.stdout  # stdout stays machine-readable


def test_a_name_names_one_live_key(tmp_path: Path, database_url: str) -> None:
    """On SQLite and PostgreSQL: the live-name index (migration 0005) is a partial index on both."""
    cli = Cli(tmp_path / "data", database_url)
    first = cli.key("alice", "5")
    refused = cli("keys", "create", "--name", "alice", code=1)
    assert "a live key is already named 'alice'" in refused.stderr
    cli("keys", "revoke", "alice")
    again = cli("keys", "revoke", "alice", code=1)
    assert "already revoked" in again.stderr
    second = cli.key("alice", "1")
    topped = cli.json("credits", "add", "alice", "1")
    assert topped["id"] == second["id"] and topped["credits"] == "2"
    old = cli.json("keys", "show", first["id"])
    assert old["credits"] == "5" and old["active"] is False


def test_credits_of_a_revoked_key_cannot_change(cli: Cli) -> None:
    cli.key("gone", "5")
    cli("keys", "revoke", "gone")
    for args in (("add", "gone", "1"), ("take", "gone", "1"), ("set", "gone", "9")):
        assert "gone is revoked" in cli("credits", *args, code=1).stderr
    assert cli.json("keys", "show", "gone")["credits"] == "5"


def test_credits_add_on_an_unlimited_key_fails_and_changes_nothing(cli: Cli) -> None:
    cli.key("free")
    result = cli("credits", "add", "free", "10", code=1)
    assert "free has unlimited credits" in result.stderr and "credits set free" in result.stderr
    assert cli.json("keys", "show", "free")["credits"] is None


def test_credits_can_be_set_taken_and_shown(cli: Cli) -> None:
    cli.key("bob", "10")
    assert cli.json("credits", "take", "bob", "2.5")["credits"] == "7.5"
    refused = cli("credits", "take", "bob", "8", code=1)
    assert "bob has 7.5 credits: cannot take 8" in refused.stderr
    assert cli.json("credits", "set", "bob", "3")["credits"] == "3"
    assert cli.json("credits", "show", "bob", "--json")["balances"] == {"bob": "3"}
    assert cli.json("credits", "set", "bob", "unlimited")["credits"] is None
    for bad in (("add", "bob", "0"), ("take", "bob", "-1"), ("set", "bob", "lots")):
        assert cli("credits", *bad, code=2).exit_code == 2
    assert "no key named 'nobody'" in cli("credits", "show", "nobody", code=1).stderr


def test_keys_list_hides_webhook_secrets_unless_asked(cli: Cli) -> None:
    created = cli.key("carol")
    listed = cli("keys", "list").stdout
    assert created["webhook_secret"] not in listed and "webhook_secret" not in listed
    assert cli.json("keys", "show", "carol", "--secret")["webhook_secret"] == created["webhook_secret"]
    assert "webhook_secret" not in cli.json("keys", "show", "carol")


def _job(database: Any, key_id: str, model: str, status: str, cost: int, days_ago: float = 0) -> str:
    job_id = str(uuid.uuid4())
    with database.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=job_id, key_id=key_id, model=model, status=status, params={}, seed=1,
                output_format="png", prompt=f"{status} {model}", cost_hundredths=cost,
                width=512, height=512, created_at=utcnow() - timedelta(days=days_ago),
            )
        )  # fmt: skip
    return job_id


def test_jobs_and_usage_per_key_model_and_day(tmp_path: Path, database_url: str) -> None:
    """On SQLite and PostgreSQL (the day of a timestamp, sums of CASE)."""
    cli = Cli(tmp_path / "data", database_url)
    dave = cli.key("dave", "100")["id"]
    erin = cli.key("erin")["id"]
    database = open_database(database_url)
    ok = _job(database, dave, "flux-dev", "succeeded", 250)
    _job(database, dave, "flux-dev", "failed", 250)
    _job(database, dave, "flux-kontext-pro", "succeeded", 400, days_ago=1)
    _job(database, erin, "flux-dev", "queued", 250)
    _job(database, dave, "flux-dev", "succeeded", 250, days_ago=30)  # outside the last 7 days

    mine = [
        json.loads(line)
        for line in cli("jobs", "--key", "dave", "--status", "succeeded", "--json").stdout.splitlines()
    ]
    assert mine[0]["id"] == ok and {job["status"] for job in mine} == {"succeeded"}
    assert len(mine) == 3 and all(job["key"] == "dave" for job in mine)
    assert len(cli("jobs", "--limit", "2", "--json").stdout.splitlines()) == 2
    assert "--status" in cli("jobs", "--status", "done", code=2).stderr

    report = cli.json("credits", "--json")
    assert report["balances"] == {"dave": "100", "erin": None}
    today = {
        (line["key"], line["model"]): line
        for line in report["usage"]
        if line["day"] == report["usage"][0]["day"]
    }
    assert today[("dave", "flux-dev")] | {"day": None} == {
        "day": None, "key": "dave", "model": "flux-dev", "jobs": 2, "images": 1, "credits": "2.5",
    }  # fmt: skip
    assert today[("erin", "flux-dev")]["credits"] == "0"
    assert len(report["usage"]) == 3  # the 30-day-old job is outside the default 7 days

    keys = {line["name"]: line for line in map(json.loads, cli("keys", "--json").stdout.splitlines())}
    assert keys["dave"]["spent"] == "6.5" and keys["dave"]["jobs"] == 3  # the 30-day-old job just outside
    table = cli("keys").stdout
    assert "dave" in table and "unlimited" in table and "live" in table
    assert "flux-kontext-pro" in cli("credits", "show", "dave").stdout


def test_migration_renames_live_keys_that_share_a_name(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'old.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    with database.begin() as conn:
        for index, (prefix, active) in enumerate((("fs_a", True), ("fs_b", True), ("fs_c", False))):
            conn.execute(
                insert(api_keys).values(
                    id=prefix, name="dup", key_hash=prefix, key_prefix=prefix, webhook_secret="s",
                    active=active, created_at=utcnow() + timedelta(seconds=index),
                )
            )  # fmt: skip
    migrate(database)
    with database.connect() as conn:
        names = dict(conn.execute(select(api_keys.c.id, api_keys.c.name)).all())
    assert names == {"fs_a": "dup", "fs_b": "dup-fs_b", "fs_c": "dup"}


def test_a_taken_name_says_how_to_get_a_new_secret_and_quiet_prints_only_the_key(cli: Cli) -> None:
    key = cli("keys", "create", "--name", "me", "--quiet").stdout
    assert re.fullmatch(r"fs_[\w-]{43}\n", key)
    taken = cli("keys", "create", "--name", "me", "--quiet", code=1)
    assert taken.stdout == ""  # KEY=$(...) gets nothing, not an error message or a half-printed key
    assert "a live key is already named 'me'" in taken.stderr
    assert "`fluxserve keys rotate me` gives it a new secret" in taken.stderr


def test_rotate_gives_a_new_secret_and_keeps_the_key_its_credits_and_jobs(
    tmp_path: Path, database_url: str
) -> None:
    """On SQLite and PostgreSQL."""
    cli = Cli(tmp_path / "data", database_url)
    old = cli.key("frank", "10")
    job = _job(open_database(database_url), old["id"], "flux-dev", "succeeded", 250)
    new = cli.json("keys", "rotate", "frank", "--json")
    assert new["key"] != old["key"] and new["prefix"] == new["key"][:10] != old["prefix"]
    assert {name: new[name] for name in ("id", "name", "credits", "webhook_secret")} == {
        name: old[name] for name in ("id", "name", "credits", "webhook_secret")
    }
    store = KeyStore(open_database(database_url))
    assert store.authenticate(old["key"]) is None
    authenticated = store.authenticate(new["key"])
    assert authenticated is not None and authenticated.id == old["id"]
    assert [
        line["id"] for line in map(json.loads, cli("jobs", "--key", "frank", "--json").stdout.splitlines())
    ] == [job]
    quiet = cli("keys", "rotate", old["id"], "-q").stdout.strip()
    store = KeyStore(open_database(database_url))  # a fresh cache (a serving process hears of it by its feed)
    assert store.authenticate(new["key"]) is None and store.authenticate(quiet) is not None


def test_rotate_refuses_a_revoked_key_and_an_unknown_name(cli: Cli) -> None:
    gone = cli.key("gone")
    cli("keys", "revoke", "gone")
    refused = cli("keys", "rotate", "gone", code=1)
    assert (
        refused.stdout == "" and "gone is revoked: `fluxserve keys create` makes a new key" in refused.stderr
    )
    assert (
        KeyStore(open_database(f"sqlite:///{cli.data_dir / 'fluxserve.db'}")).authenticate(gone["key"])
        is None
    )
    assert "no key named 'nobody'" in cli("keys", "rotate", "nobody", code=1).stderr


def test_jobs_status_takes_the_words_of_either_dialect(cli: Cli) -> None:
    grace = cli.key("grace")["id"]
    database = open_database(f"sqlite:///{cli.data_dir / 'fluxserve.db'}")
    made = {
        status: _job(database, grace, "flux-dev", status, 250)
        for status in ("queued", "running", "succeeded", "failed", "canceled", "content_moderated")
    }

    def ids(word: str) -> set[str]:
        return {
            json.loads(line)["id"] for line in cli("jobs", "--status", word, "--json").stdout.splitlines()
        }

    def of(*statuses: str) -> set[str]:
        return {made[status] for status in statuses}

    assert ids("SUCCESS") == ids("Ready") == ids("ready") == ids("succeeded") == of("succeeded")
    assert ids("PENDING_QUEUE") == ids("pending_queue") == of("queued")
    assert ids("ON_QUEUE") == of("running") and ids("Pending") == of("queued", "running")
    assert ids("FAILED") == of("failed", "canceled", "content_moderated")  # the reseller's word: all three
    assert ids("failed") == of("failed") and ids("Error") == of("failed", "canceled")
    assert ids("Content Moderated") == ids("content_moderated") == of("content_moderated")
    refused = cli("jobs", "--status", "done", code=2).stderr
    assert "--status" in refused and "SUCCESS" in refused and "Ready" in refused


def test_inline_previews_follow_the_terminal_the_environment_names() -> None:
    assert inline_image_protocol({"TERM": "xterm-kitty"}, True) == "kitty"
    assert inline_image_protocol({"TERM_PROGRAM": "iTerm.app"}, True) == "iterm2"
    assert inline_image_protocol({"TERM_PROGRAM": "WezTerm"}, True) == "iterm2"
    assert inline_image_protocol({"TERM": "xterm-256color"}, True) is None  # shows no images: nothing
    assert inline_image_protocol({"TERM": "xterm-kitty"}, False) is None  # piped: nothing


def test_inline_previews_are_the_protocols_escapes_of_the_image() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((200, 100), 64).convert("RGB").save(buffer, format="JPEG")  # > 4096 base64 as PNG
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    iterm = inline_image(uri, "iterm2")
    assert iterm.startswith("\x1b]1337;File=inline=1;size=") and iterm.endswith("\a")
    assert base64.b64decode(iterm.split(":", 1)[1][:-1]) == buffer.getvalue()
    kitty = inline_image(uri, "kitty")
    chunks = kitty.split("\x1b\\")[:-1]
    assert len(chunks) > 1 and chunks[0].startswith("\x1b_Ga=T,f=100,i=1,q=2,m=1;")
    assert chunks[-1].startswith("\x1b_Gm=0;")
    png = base64.b64decode("".join(chunk.split(";", 1)[1] for chunk in chunks))
    assert Image.open(io.BytesIO(png)).size == (200, 100)
    assert inline_image(uri, "kitty", first=False).startswith("\x1b_Ga=t,")  # replaces the image shown


def test_generate_refuses_flux_schnell_naming_the_route_that_takes_it() -> None:
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", "flux-schnell", "--key", "k"])
    assert result.exit_code == 2 and "no route of its own" in result.output
    assert "flux1-schnell" in result.output
