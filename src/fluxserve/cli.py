"""The ``fluxserve`` command: serve, worker, jobs, keys, credits, usage, migrate, prune."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import uvicorn
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from fluxserve import __version__
from fluxserve.accounts.keys import ApiKey, KeyStore, NewKey
from fluxserve.core.catalog import Catalog, load_catalog
from fluxserve.core.job import JobStatus
from fluxserve.core.models import MODELS, SurfaceName
from fluxserve.core.notes import NOTE, READ_AS
from fluxserve.db.connection import migrate, open_database
from fluxserve.errors import KeyProblem
from fluxserve.finetunes.store import FinetuneStore
from fluxserve.logs import configure_logging
from fluxserve.settings import Settings
from fluxserve.worker.beacon import Beacon, Liveness
from fluxserve.worker.served import served_models
from fluxserve.worker.stack import local_stack_problem, moderates
from fluxserve.worker.supervisor import BEACON_ENV

app = typer.Typer(help="fluxserve: a self-hosted FLUX image API server.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: `fluxserve keys` shows them with their balances.")
credits_app = typer.Typer(
    help="Credits (1 credit = 0.01 USD): `fluxserve credits` shows balances and usage per key, model and day."
)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
finetunes_app = typer.Typer(
    help="Finetunes: LoRA adapters keys use by name (finetune_id) on the finetuned routes.",
    no_args_is_help=True,
)
app.add_typer(finetunes_app, name="finetunes")
console = Console()

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (FLUXSERVE_DATA_DIR).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the key.")]
Days = Annotated[int, typer.Option(min=1, help="Usage of the last DAYS days.")]


class Grouping(StrEnum):
    DAY = "day"
    MODEL = "model"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fluxserve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """fluxserve: a self-hosted FLUX image API server."""


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    values: dict[str, Any] = {name: value for name, value in overrides.items() if value is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)


def _database(settings: Settings, create: bool = False) -> Engine:
    """The database ``serve`` would use with these settings, migrated; which one is said on stderr.

    Commands that only read or change existing keys refuse a SQLite file that does not exist, rather than
    making an empty one wherever they happen to be run.
    """
    url = make_url(settings.database)
    typer.echo(f"database: {url.render_as_string(hide_password=True)}", err=True)
    if not create and url.get_backend_name() == "sqlite" and url.database:
        path = Path(url.database)
        if not path.exists():
            typer.echo(
                f"error: no fluxserve database at {path}: run this where `fluxserve serve` runs, or pass "
                "--data-dir (or set FLUXSERVE_DATA_DIR or FLUXSERVE_DATABASE_URL) as you do for serve",
                err=True,
            )
            raise typer.Exit(1)
    database = open_database(settings.database)
    migrate(database)
    return database


@contextmanager
def _keys(data_dir: Path | None, create: bool = False) -> Iterator[KeyStore]:
    """The key store of the data dir; a :class:`KeyProblem` ends the command with its message."""
    try:
        yield KeyStore(_database(_settings(data_dir), create))
    except KeyProblem as problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1) from problem


def _credits(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        credits = Decimal(value)
    except InvalidOperation as error:
        raise typer.BadParameter(f"{value!r} is not a number") from error
    if credits < 0 or not credits.is_finite():
        raise typer.BadParameter("must be zero or more")
    return credits


def _amount(value: str) -> Decimal:
    credits = _credits(value)
    if not credits:
        raise typer.BadParameter("must be more than zero")
    return credits


def _key_json(key: ApiKey, secret: bool = False) -> dict[str, object]:
    """A key as the commands print it; its webhook secret only when asked for."""
    shown: dict[str, object] = {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "credits": None if key.credits is None else str(key.credits),
        "active": key.active,
    }
    if secret:
        shown["webhook_secret"] = key.webhook_secret
    return shown


def _balance(key: ApiKey) -> str:
    return "unlimited" if key.credits is None else str(key.credits)


FIRST_KEY_FILE = "first-api-key"


def _first_key(settings: Settings, keys: KeyStore, terminal: bool) -> Callable[[], None]:
    """Make the first key, unlimited; returns what shows it once the server is up. Shown only on a
    terminal: stdout otherwise goes to journald or a container log, where anyone who reads logs would hold
    it; then it goes to a 0600 file in the data directory, and only that file's path is printed."""
    new = keys.create("default")
    if terminal:
        return lambda: _show_first_key(new.key, settings)
    path = settings.data_dir.resolve() / FIRST_KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # on PostgreSQL nothing else made it
    path.unlink(missing_ok=True)  # left from an earlier database: a file we create is 0600 from birth
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(new.key + "\n")
    return lambda: typer.echo(
        f"\n{_RULE}\nFirst start: created API key 'default', written to {path} (mode 0600); read it, "
        f"then delete it\n{_RULE}\n"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (FLUXSERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FLUXSERVE_PORT).")] = None,
    data_dir: DataDir = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes to start and supervise (FLUXSERVE_WORKERS).")
    ] = None,
    no_workers: Annotated[bool, typer.Option("--no-workers", help="Serve the API only.")] = False,
    public_url: Annotated[
        str | None, typer.Option(help="Base of result URLs (FLUXSERVE_PUBLIC_URL).")
    ] = None,
) -> None:
    """Start the API with its workers on the embedded defaults (SQLite, local disk)."""
    settings = _settings(
        data_dir, host=host, port=port, workers=0 if no_workers else workers, public_url=public_url
    )
    if settings.workers and (
        problem := local_stack_problem(load_catalog(settings.catalog_files), None, moderates(settings))
    ):
        typer.echo(f"error: {problem}; or serve the API alone with --no-workers", err=True)
        raise typer.Exit(1)
    configure_logging(json=settings.log_json)
    listener = _listen(settings.host, settings.port, settings.http_backlog)  # before workers or "ready"
    keys = KeyStore(_database(settings, create=True))
    first = _first_key(settings, keys, terminal=sys.stdout.isatty()) if keys.count() == 0 else None
    from fluxserve.api.limits import http_protocol
    from fluxserve.app import create_app

    # httptools (the C parser), with the head limit and the timeouts uvicorn lacks added by our protocol;
    # uvicorn's access log off (its per-request formatting is costly): the guard writes one line a request.
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        http=http_protocol(
            settings.http_max_header_bytes,
            settings.http_header_timeout_seconds,
            settings.http_body_timeout_seconds,
        ),
        timeout_keep_alive=settings.http_keep_alive_seconds,
        limit_concurrency=settings.http_max_connections,
        backlog=settings.http_backlog,
    )
    server = uvicorn.Server(config)
    # After the start-up logs, not among them; if it stops before it is ready, the key was made: shown anyway.
    announce_now = _when_ready(server, listener, first) if first else None
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is a normal way to stop
        server.run(sockets=[listener])
    if announce_now:
        announce_now()
    if not server.started:  # the app failed to start (its error is logged): exit as uvicorn.run does
        raise typer.Exit(3)


_RULE = "-" * 78


def _show_first_key(key: str, settings: Settings) -> None:
    """The key ``serve`` made on its first start, set apart, with two commands to try it."""
    # Plain echo, not rich: a wrapped key or curl line could not be pasted back.
    typer.echo(f"\n{_RULE}\nFirst start: created API key 'default' (shown once): {key}")
    typer.echo(
        "Try it:\n"
        f"  curl -s -X POST {settings.base_url}/bfl/v1/flux-dev -H 'TT-API-KEY: {key}' "
        "-H 'Content-Type: application/json' "
        '-d \'{"prompt": "a large red heart in the top left corner on a light blue background"}\'\n'
        f"  curl -s '{settings.base_url}/flux/fetch?jobId=<jobId>' -H 'TT-API-KEY: {key}'\n{_RULE}\n"
    )


def _when_ready(
    server: uvicorn.Server, listener: socket.socket, announce: Callable[[], None], wait: float = 120.0
) -> Callable[[], None]:
    """Run ``announce`` once the server answers ``/readyz`` (its workers are up), or after ``wait`` seconds.
    Returns a function that runs it now unless it has run."""
    done = threading.Lock()  # held once announced

    def once() -> None:
        if done.acquire(blocking=False):
            announce()

    def watch() -> None:
        import httpx

        host, port = listener.getsockname()[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if server.started:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=5).status_code == 200:
                        break
            time.sleep(0.5)
        once()

    threading.Thread(target=watch, name="first-key", daemon=True).start()
    return once


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """The API's listening socket, bound first: uvicorn would start the app (its workers, "fluxserve ready")
    before binding, so a taken port would fail only after all that."""
    try:
        return socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=backlog
        )
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        typer.echo(
            f"error: cannot listen on {host}:{port}: {reason}; is another server running there? "
            "Choose another with --port (or FLUXSERVE_PORT), or `make serve PORT=8001`",
            err=True,
        )
        raise typer.Exit(1) from error


@app.command()
def worker(
    data_dir: DataDir = None,
    threads: Annotated[int, typer.Option(min=1, help="Worker threads sharing this process's models.")] = 1,
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            help="Comma-separated catalog models this worker serves (default: all); it claims only their "
            "jobs, e.g. one GPU per model.",
        ),
    ] = None,
) -> None:
    """Run a worker process without the HTTP API: it claims jobs and runs them (e.g. one per GPU)."""
    stop = threading.Event()
    # Until it can take jobs there is nothing to finish: a stop while torch imports (seconds) ends it at
    # once, rather than after the imports (a supervisor would wait, then kill it).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_now)
    settings = _settings(data_dir)
    try:
        served = served_models(models, settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from None
    if problem := local_stack_problem(load_catalog(settings.catalog_files), served, moderates(settings)):
        typer.echo(f"error: {problem}; or serve only relay models (--models)", err=True)
        raise typer.Exit(1)
    configure_logging(json=settings.log_json)
    liveness = Liveness()
    beacon = Beacon(liveness.alive, settings.heartbeat_seconds)
    beacon_file = os.environ.get(BEACON_ENV)
    if beacon_file:  # before the model stack imports: a supervisor watches this file from the first second
        beacon.add(Path(beacon_file).touch)
    beacon.start()  # until the process exits, so that it is not killed as hung while it drains
    from fluxserve.worker.quiet import quiet_model_stack_imports

    quiet_model_stack_imports()
    from fluxserve.worker.process import run_worker_process

    for signum in (signal.SIGINT, signal.SIGTERM):  # from now on a stop lets running jobs end cleanly
        signal.signal(signum, lambda *_: stop.set())
    run_worker_process(settings, threads, liveness, beacon, stop, served)


def _exit_now(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


@app.command("migrate")
def migrate_command(data_dir: DataDir = None) -> None:
    """Bring the database schema up to date (serve does this on start, too)."""
    _database(_settings(data_dir), create=True)
    console.print("database is up to date")


@app.command()
def prune(
    data_dir: DataDir = None,
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than",
            min=0,
            help="Delete results of jobs that ended more than SECONDS ago "
            "(default FLUXSERVE_RESULT_TTL_SECONDS, itself defaulting to FLUXSERVE_URL_TTL_SECONDS).",
        ),
    ] = None,
    rows_older_than: Annotated[
        float | None,
        typer.Option(
            "--rows-older-than",
            min=0,
            help="Also delete the records of jobs that ended more than SECONDS ago; their credit history is "
            "kept as one summary per key, model and day.",
        ),
    ] = None,
) -> None:
    """Delete expired results and orphaned inputs now (the server does this every FLUXSERVE_SWEEP_SECONDS);
    the jobs' records are kept unless --rows-older-than is given."""
    from fluxserve.db.connection import utcnow
    from fluxserve.jobs.retention import Retention, prune_rows
    from fluxserve.wiring import make_blob_store, make_stores

    settings = _settings(data_dir)
    database = _database(settings)
    retention = Retention(
        make_stores(database).expiry,
        make_blob_store(settings.storage),
        settings.result_ttl if older_than is None else older_than,
        by_operator=True,
    )
    report = retention.sweep()
    typer.echo(
        f"removed {report.results} result(s) and {report.inputs} orphaned input file(s): {report.bytes} bytes"
    )
    if rows_older_than is not None:
        rows = prune_rows(database, utcnow() - timedelta(seconds=rows_older_than))
        typer.echo(f"removed {rows} job record(s); their credits are kept as summaries")


@app.command()
def usage(
    data_dir: DataDir = None,
    key: Annotated[str | None, typer.Option("--key", help="One key (name or id); default every key.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="A UTC date (YYYY-MM-DD); default 30 days ago.")
    ] = None,
    by: Annotated[Grouping, typer.Option("--by", help="Group by UTC day or by model.")] = Grouping.DAY,
    as_json: AsJson = False,
) -> None:
    """Credits charged for jobs (refunds netted out) and changed by operators, from the credit ledger."""
    from fluxserve.db import ledger
    from fluxserve.db.connection import utcnow

    try:
        start = (
            utcnow() - timedelta(days=30)
            if since is None
            else datetime.fromisoformat(since).replace(tzinfo=UTC)
        )
    except ValueError:
        typer.echo(f"error: --since: {since!r} is not a date like 2026-01-31", err=True)
        raise typer.Exit(2) from None
    with _keys(data_dir) as store:
        key_id = None if key is None else store.resolve(key).id
        with store.database.connect() as conn:
            lines = ledger.usage(conn, start, by.value, key_id)
    if as_json:
        typer.echo(json.dumps([line.as_json() for line in lines]))
        return
    table = Table(
        by.value, "key", "jobs", "charged", "operator", title=f"Usage since {start:%Y-%m-%d %H:%M} UTC"
    )
    for line in lines:
        table.add_row(line.group, line.key, str(line.jobs), str(line.charged), str(line.operator))
    console.print(table if lines else "no credit entries in that time")


@keys_app.callback(invoke_without_command=True)
def keys_overview(
    ctx: typer.Context, data_dir: DataDir = None, days: Days = 30, as_json: AsJson = False
) -> None:
    """Every key with its balance and what it spent lately."""
    if ctx.invoked_subcommand is not None:
        return
    from fluxserve.jobs.reports import totals, usage

    with _keys(data_dir) as store:
        keys = store.list()
        spent = usage(store.database, days=days)
    if as_json:
        for key in keys:
            typer.echo(json.dumps({**_key_json(key), **totals(spent, key.id)}))
        return
    table = Table("name", "prefix", "balance", f"jobs ({days} d)", f"spent ({days} d)", "state")
    for key in keys:
        summary = totals(spent, key.id)
        table.add_row(
            key.name,
            key.prefix + "...",
            _balance(key),
            str(summary["jobs"]),
            str(summary["spent"]),
            "live" if key.active else "revoked",
        )
    console.print(table)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key's owner, unique among live keys.")],
    credits: Annotated[str | None, typer.Option(help="Starting credits; unlimited when omitted.")] = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    with _keys(data_dir, create=True) as store:
        new = store.create(name, _credits(credits))
    _print_new_key(new, as_json, quiet)


@keys_app.command("rotate")
def keys_rotate(
    name_or_id: str, data_dir: DataDir = None, as_json: AsJson = False, quiet: Quiet = False
) -> None:
    """Give a live key a new secret and print it once; the old one stops working now. The key keeps its
    id, credits, jobs and webhook secret."""
    with _keys(data_dir) as store:
        new = store.rotate(store.resolve(name_or_id))
    _print_new_key(new, as_json, quiet)


def _print_new_key(new: NewKey, as_json: bool, quiet: bool) -> None:
    """A key just made: only the key with --quiet (for ``KEY=$(...)``: an error leaves stdout empty)."""
    if quiet:
        typer.echo(new.key)
    elif as_json:
        typer.echo(json.dumps({"key": new.key, **_key_json(new.record, secret=True)}))
    else:
        typer.echo(f"key: {new.key}\nwebhook secret: {new.record.webhook_secret}")


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys as JSON lines: prefixes, never the keys; no webhook secrets (`keys show --secret`)."""
    with _keys(data_dir) as store:
        for key in store.list():
            typer.echo(json.dumps(_key_json(key)))


@keys_app.command("show")
def keys_show(
    name_or_id: str,
    secret: Annotated[bool, typer.Option("--secret", help="Include the webhook signing secret.")] = False,
    data_dir: DataDir = None,
) -> None:
    """One key as JSON; with --secret, the secret its webhooks are signed with."""
    with _keys(data_dir) as store:
        typer.echo(json.dumps(_key_json(store.resolve(name_or_id), secret=secret)))


@keys_app.command("revoke")
def keys_revoke(name_or_id: str, data_dir: DataDir = None) -> None:
    """Stop a key from working; its jobs and results stay, and its name is free again."""
    with _keys(data_dir) as store:
        key = store.resolve(name_or_id)
        if not key.active:
            raise KeyProblem(f"{key.name} is already revoked")
        store.revoke(key.id)
    console.print(f"revoked {key.name} ({key.prefix}...)")


@credits_app.callback(invoke_without_command=True)
def credits_overview(
    ctx: typer.Context, data_dir: DataDir = None, days: Days = 7, as_json: AsJson = False
) -> None:
    """Balances of the live keys, and jobs, images and credits charged per day, key and model."""
    if ctx.invoked_subcommand is not None:
        return
    from fluxserve.jobs.reports import usage

    with _keys(data_dir) as store:
        keys = [key for key in store.list() if key.active]
        _print_usage(keys, [line.as_json() for line in usage(store.database, days=days)], days, as_json)


@credits_app.command("show")
def credits_show(name_or_id: str, data_dir: DataDir = None, days: Days = 7, as_json: AsJson = False) -> None:
    """One key's balance and its usage per day and model."""
    from fluxserve.jobs.reports import usage

    with _keys(data_dir) as store:
        key = store.resolve(name_or_id)
        lines = usage(store.database, key_id=key.id, days=days)
        _print_usage([key], [line.as_json() for line in lines], days, as_json)


def _print_usage(keys: list[ApiKey], lines: list[dict[str, object]], days: int, as_json: bool) -> None:
    """Balances, then usage per day, key and model (``UsageLine.as_json`` rows)."""
    if as_json:
        balances = {key.name: None if key.credits is None else str(key.credits) for key in keys}
        typer.echo(json.dumps({"balances": balances, "usage": lines}))
        return
    table = Table("key", "balance", title="Balances")
    for key in keys:
        table.add_row(key.name, _balance(key))
    console.print(table)
    columns = ("day", "key", "model", "jobs", "images", "credits")
    spent = Table(*columns, title=f"Usage, last {days} days (UTC)")
    for line in lines:
        spent.add_row(*(str(line[column]) for column in columns))
    console.print(spent if lines else f"no jobs in the last {days} days")


AmountArg = Annotated[str, typer.Argument(help="Credits (1 credit = 0.01 USD).")]


@credits_app.command("add")
def credits_add(name_or_id: str, amount: AmountArg, data_dir: DataDir = None) -> None:
    """Add credits to a live key with a finite balance."""
    with _keys(data_dir) as store:
        typer.echo(json.dumps(_key_json(store.add_credits(store.resolve(name_or_id), _amount(amount)))))


@credits_app.command("take")
def credits_take(name_or_id: str, amount: AmountArg, data_dir: DataDir = None) -> None:
    """Take credits from a live key's finite balance (never below zero)."""
    with _keys(data_dir) as store:
        typer.echo(json.dumps(_key_json(store.take_credits(store.resolve(name_or_id), _amount(amount)))))


@credits_app.command("set")
def credits_set(
    name_or_id: str,
    amount: Annotated[str, typer.Argument(help="The new balance, or 'unlimited'.")],
    data_dir: DataDir = None,
) -> None:
    """Set a live key's balance outright, or make it unlimited."""
    credits = None if amount.strip().lower() == "unlimited" else _credits(amount)
    with _keys(data_dir) as store:
        typer.echo(json.dumps(_key_json(store.set_credits(store.resolve(name_or_id), credits))))


@app.command("jobs")
def jobs_command(
    key: Annotated[str | None, typer.Option("--key", help="Only this key's jobs (name or id).")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only jobs in this status: queued, running, succeeded, failed, canceled, ..., or the API's "
            "words for them (SUCCESS, PENDING_QUEUE, Ready, Pending...)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Recent jobs, newest first."""
    from fluxserve.jobs.reports import recent_jobs

    wanted = () if status is None else _statuses(status)
    with _keys(data_dir) as store:
        key_id = None if key is None else store.resolve(key).id
        lines = recent_jobs(store.database, key_id=key_id, statuses=wanted, limit=limit)
    if as_json:
        for line in lines:
            typer.echo(
                json.dumps(
                    {
                        "id": line.id,
                        "key": line.key,
                        "model": line.model,
                        "status": line.status.value,
                        "size": line.size,
                        "cost": str(line.cost),
                        "prompt": line.prompt,
                        "created_at": line.created_at.isoformat(),
                        "finished_at": line.finished_at and line.finished_at.isoformat(),
                    }
                )
            )
        return
    table = Table("created (UTC)", "id", "key", "model", "status", "size", "prompt")
    for line in lines:
        prompt = line.prompt if len(line.prompt) <= 40 else line.prompt[:39] + "…"
        table.add_row(
            f"{line.created_at:%Y-%m-%d %H:%M:%S}", line.id, line.key, line.model, line.status.value,
            line.size or "", prompt,
        )  # fmt: skip
    console.print(table if lines else "no jobs")


def _statuses(word: str) -> set[JobStatus]:
    """The statuses a word names: one of ours (``succeeded``), or all that a surface shows with it (the
    reseller's ``FAILED`` is also moderated and canceled jobs; the vendor's ``Pending``, queued and running);
    exact words first, then any case."""
    from fluxserve.surfaces import reseller, vendor

    words: dict[str, set[JobStatus]] = {status.value: {status} for status in JobStatus}
    for table in (reseller.STATUS, vendor.STATUS):
        for status, name in table.items():
            words.setdefault(name, set()).add(status)
    found = words.get(word) or next(
        (statuses for name, statuses in words.items() if name.casefold() == word.strip().casefold()), None
    )
    if found is None:
        raise typer.BadParameter(f"{word!r}: one of {', '.join(words)}", param_hint="--status")
    return found


def _fields(model: str, given: dict[str, Any], extra: list[str]) -> tuple[SurfaceName, dict[str, Any]]:
    """The surface to ask for ``model`` (the reseller's where it has the model, else the vendor's) and the
    request's fields: the options given, and each ``NAME=VALUE`` (a JSON value, else text), checked
    against the model's fields on that route so that a typo is named here, not ignored."""
    spec = MODELS.get(model)
    if spec is None:
        raise typer.BadParameter(f"unknown model {model!r}: one of {', '.join(MODELS)}", param_hint="--model")
    if not spec.own_routes:  # flux-schnell: the reseller serves it through its own format only
        raise typer.BadParameter(
            f"{model} has no route of its own; POST /flux/generate with its mode (flux1-schnell) asks for it",
            param_hint="--model",
        )
    surface = SurfaceName.RESELLER if SurfaceName.RESELLER in spec.fields else SurfaceName.VENDOR
    fields = {name: value for name, value in given.items() if value is not None}
    for item in extra:
        name, equals, text = item.partition("=")
        if not equals or not name.strip():
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE, e.g. steps=20", param_hint="--field")
        try:
            fields[name.strip()] = json.loads(text)
        except ValueError:
            fields[name.strip()] = text
    known = spec.fields[surface]
    for name in fields:
        if name not in known:
            raise typer.BadParameter(
                f"{model} takes no {name!r}; its fields: {', '.join(known)}",
                param_hint="--" + name.replace("_", "-") if name in given else "--field",
            )
    return surface, fields


def inline_image_protocol(environ: Mapping[str, str], is_terminal: bool) -> str | None:
    """The inline-image protocol of the terminal the environment names (``kitty``, or ``iterm2`` for
    iTerm2 and WezTerm, which speak its escape), None when it shows none or the output is no terminal."""
    if not is_terminal:
        return None
    if environ.get("TERM") == "xterm-kitty" or environ.get("KITTY_WINDOW_ID"):
        return "kitty"
    if environ.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm") or environ.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    return None


def inline_image(data_uri: str, protocol: str, first: bool = True) -> str:
    """The escape sequence that shows a preview (a JPEG data URI) in the terminal. kitty takes PNG, in
    chunks of 4096 base64 characters, under one image id: later previews replace the first one in place
    (transmitted, not placed again). iTerm2 takes the file as it is, below the previous one."""
    import base64
    import io

    from PIL import Image

    data = base64.b64decode(data_uri.partition(",")[2])
    if protocol == "iterm2":
        return f"\x1b]1337;File=inline=1;size={len(data)}:{base64.b64encode(data).decode()}\a"
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    chunks = [encoded[start : start + 4096] for start in range(0, len(encoded), 4096)]
    action = "T" if first else "t"
    parts = []
    for index, chunk in enumerate(chunks):
        more = int(index < len(chunks) - 1)
        keys = f"a={action},f=100,i=1,q=2,m={more}" if index == 0 else f"m={more}"
        parts.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(parts)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="The API model, e.g. flux-dev, flux-2-klein-4b.")
    ] = "flux-dev",
    seed: Annotated[int | None, typer.Option(help="Seed; random when omitted.")] = None,
    width: Annotated[
        int | None, typer.Option(help="Width in pixels; the model's default when omitted.")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels.")] = None,
    aspect_ratio: Annotated[
        str | None, typer.Option("--aspect-ratio", help="e.g. 16:9, for models sized by ratio.")
    ] = None,
    field: Annotated[
        list[str] | None,
        typer.Option(
            "--field", "-f", help="Any other field of the model as NAME=VALUE (steps=20, raw=true); repeat."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save the image; default <job id>.png.")
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Option("--image", help="A reference image (kontext and FLUX.2 models); repeat for more."),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="Server URL; default the local one (FLUXSERVE_PUBLIC_URL or HOST:PORT)."),
    ] = None,
    key: Annotated[str | None, typer.Option(envvar="FLUXSERVE_KEY", help="API key (FLUXSERVE_KEY).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Make one image through a server, with a live progress bar; prints where it was saved, its seed, size
    and cost, and the model's note about words it did not know."""
    import httpx
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fluxserve.client import Client, Event, FluxserveError

    given = {"seed": seed, "width": width, "height": height, "aspect_ratio": aspect_ratio}
    surface, fields = _fields(model, given, field or [])
    base_url = server or _settings(data_dir).base_url
    errors = Console(stderr=True)
    if not key:
        errors.print("error: no API key: pass --key or set FLUXSERVE_KEY (`fluxserve keys create` makes one)")
        raise typer.Exit(1)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=errors, transient=True) as progress:
        task = progress.add_task("submitting", total=1.0)

        protocol = inline_image_protocol(os.environ, errors.is_terminal)
        shown: list[int] = []

        def show(event: Event) -> None:
            if event.kind == "queued":
                progress.update(task, description=f"queued, {event.position or 0} ahead")
            elif event.kind == "running":
                progress.update(task, description="running", completed=event.progress or 0.0)
            elif event.kind == "preview":
                if protocol is not None and event.preview:
                    errors.file.write(inline_image(event.preview, protocol, first=not shown) + "\n")
                    errors.file.flush()
                    shown.append(1)
            else:
                progress.update(task, description="done", completed=1.0)

        try:
            wire: Literal["reseller", "vendor"] = "reseller" if surface is SurfaceName.RESELLER else "vendor"
            with Client(base_url, key, dialect=wire) as client, Client(base_url, key) as reseller:
                made = client.generate(model, prompt, images=images or (), on_event=show, **fields)
                # The reseller's fetch JSON says what the job cost, whichever surface made it.
                job = made.job if surface is SurfaceName.RESELLER else reseller.fetch(made.job.id)
        except FluxserveError as error:
            errors.print(f"error: {error.message}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except httpx.TransportError as error:
            errors.print(f"error: cannot reach {base_url} ({error}); is `fluxserve serve` running there?")
            raise typer.Exit(1) from None
    jpeg = made.image.startswith(b"\xff\xd8")
    path = output or Path(f"{made.job.id}.{'jpg' if jpeg else 'png'}")
    path.write_bytes(made.image)
    data = job.raw.get("data") or {}
    typer.echo(f"saved {path} (seed {made.seed}, {data.get('size')}, {data.get('quota')} credits)")
    details = job.raw.get("details") or {}
    for key, label in ((NOTE, "note"), (READ_AS, "read as")):
        if details.get(key):
            errors.print(f"{label}: {details[key]}", markup=False, highlight=False)


@contextmanager
def _finetunes(data_dir: Path | None) -> Iterator[tuple[FinetuneStore, Settings, Catalog]]:
    """The finetunes of the data dir (with its shipped ones); a problem ends the command with its message."""
    from fluxserve.core.catalog import load_catalog
    from fluxserve.errors import EngineError
    from fluxserve.finetunes.check import AdapterProblem
    from fluxserve.finetunes.store import FinetuneProblem, FinetuneStore, builtin_finetunes
    from fluxserve.wiring import make_blob_store

    settings = _settings(data_dir)
    try:
        catalog = load_catalog(settings.catalog_files)
        blobs = make_blob_store(settings.storage)
        yield FinetuneStore(_database(settings), blobs, builtin_finetunes(catalog)), settings, catalog
    except (FinetuneProblem, AdapterProblem, KeyProblem, EngineError, ValueError) as problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1) from problem


@finetunes_app.command("add")
def finetunes_add(
    name: Annotated[str, typer.Argument(help="Its finetune_id: lowercase letters, digits, '-' and '_'.")],
    file: Annotated[Path, typer.Argument(help="A LoRA in diffusers' format (.safetensors).")],
    model: Annotated[
        str, typer.Option(help="The model it was trained for: flux-pro (FLUX.1), flux-2-klein-4b or -9b.")
    ],
    key: Annotated[
        str | None, typer.Option(help="The key (name or id) that alone may use it; default: every key.")
    ] = None,
    comment: Annotated[str | None, typer.Option(help="A note shown in its details.")] = None,
    max_mb: Annotated[int, typer.Option(min=1, help="The largest file accepted, in MiB.")] = 1024,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Check a LoRA file against the model's transformer (layer names and shapes, from the headers) and
    store it where every worker reads it."""
    from fluxserve.core.models import finetune_target
    from fluxserve.finetunes.check import check_fits, inspect

    with _finetunes(data_dir) as (store, settings, catalog):
        target = finetune_target(model)
        if not file.is_file():
            raise ValueError(f"{file}: no such file")
        info = inspect(file, max_mb * 1024 * 1024)
        entry = catalog.entry(target)
        if entry.engine == "diffusers":  # a relayed model's finetunes are the vendor's to check
            from fluxserve.engines.registry import EngineRegistry  # torch: only to find built-in weights

            check_fits(info, EngineRegistry(catalog, settings.models).resolve_weights(target, entry), name)
        key_id = None if key is None else KeyStore(store.database).resolve(key).id
        added = store.add(name, file.read_bytes(), target, info.rank, key_id, comment)
    if as_json:
        typer.echo(json.dumps(added.details()))
    else:
        typer.echo(f"added {added.name} for {added.model} (rank {added.rank}, {added.size_bytes} bytes)")


@finetunes_app.command("list")
def finetunes_list(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Every finetune, the shipped ones first, with who may use it."""
    with _finetunes(data_dir) as (store, _, _):
        found = store.visible(None)
        names = {key.id: key.name for key in KeyStore(store.database).list()}
    if as_json:
        for finetune in found:
            typer.echo(json.dumps({**finetune.details(), "key": names.get(finetune.key_id or "")}))
        return
    table = Table("finetune_id", "model", "key", "rank", "bytes", "comment")
    for finetune in found:
        owner = "(every key)" if finetune.key_id is None else names.get(finetune.key_id, finetune.key_id)
        table.add_row(
            finetune.name,
            finetune.model,
            owner,
            str(finetune.rank),
            str(finetune.size_bytes),
            finetune.comment,
        )
    console.print(table)


@finetunes_app.command("remove")
def finetunes_remove(name: str, data_dir: DataDir = None) -> None:
    """Forget a finetune and delete its file; queued jobs that use it fail saying so."""
    with _finetunes(data_dir) as (store, _, _):
        store.remove(name)
    console.print(f"removed {name}")
