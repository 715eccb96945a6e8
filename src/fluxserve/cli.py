"""The ``fluxserve`` command: serve, worker, keys, credits, migrate, prune."""

from __future__ import annotations

import json
import os
import signal
import threading
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.db.connection import make_engine, migrate
from fluxserve.logs import configure_logging
from fluxserve.settings import Settings
from fluxserve.worker.beacon import Liveness, start_beacon
from fluxserve.worker.supervisor import BEACON_ENV

app = typer.Typer(help="fluxserve: a self-hosted FLUX image API server.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Top up a key's credits.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
console = Console()

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (FLUXSERVE_DATA_DIR).")]


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    values: dict[str, Any] = {name: value for name, value in overrides.items() if value is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)


def _key_store(settings: Settings) -> KeyStore:
    engine = make_engine(settings.database)
    migrate(engine)
    return KeyStore(engine)


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


def _key_json(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "credits": None if key.credits is None else str(key.credits),
        "webhook_secret": key.webhook_secret,
        "active": key.active,
    }


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
    configure_logging(json=settings.log_json)
    keys = _key_store(settings)
    if keys.count() == 0:
        new = keys.create("default")
        # Plain echo, not rich: a wrapped key or curl line could not be pasted back.
        typer.echo(f"First start: created API key 'default' (shown once): {new.key}")
        typer.echo(
            "Try it:\n"
            f"  curl -s -X POST {settings.base_url}/bfl/v1/flux-dev -H 'TT-API-KEY: {new.key}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"prompt": "a large red heart in the top left corner on a light blue background"}\'\n'
            f"  curl -s '{settings.base_url}/flux/fetch?jobId=<jobId>' -H 'TT-API-KEY: {new.key}'"
        )
    from fluxserve.api.limits import http_protocol
    from fluxserve.app import create_app

    # h11, not httptools: h11 bounds the request head (httptools has no limit), and our protocol adds the
    # header and body timeouts uvicorn lacks. README, "HTTP limits".
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        http=http_protocol(settings.http_header_timeout_seconds, settings.http_body_timeout_seconds),
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        timeout_keep_alive=settings.http_keep_alive_seconds,
        limit_concurrency=settings.http_max_connections,
        backlog=settings.http_backlog,
    )


@app.command()
def worker(
    data_dir: DataDir = None,
    threads: Annotated[int, typer.Option(min=1, help="Worker threads sharing this process's models.")] = 1,
) -> None:
    """Run a worker process without the HTTP API: it claims jobs and runs them (e.g. one per GPU)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    settings = _settings(data_dir)
    configure_logging(json=settings.log_json)
    liveness = Liveness()
    beacon = os.environ.get(BEACON_ENV)
    if beacon:  # before the model stack imports: a supervisor watches this file from the first second
        start_beacon(Path(beacon), liveness, settings.heartbeat_seconds, stop)
    from fluxserve.worker.process import run_worker_process

    run_worker_process(settings, threads, liveness, stop)


@app.command("migrate")
def migrate_command(data_dir: DataDir = None) -> None:
    """Bring the database schema up to date (serve does this on start, too)."""
    migrate(make_engine(_settings(data_dir).database))
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
) -> None:
    """Delete expired results and orphaned inputs now (the server does this every FLUXSERVE_SWEEP_SECONDS);
    the jobs' records are kept."""
    from fluxserve.jobs.retention import Retention
    from fluxserve.wiring import make_blob_store, make_job_store, open_database

    settings = _settings(data_dir)
    retention = Retention(
        make_job_store(open_database(settings)),
        make_blob_store(settings.storage),
        settings.result_ttl if older_than is None else older_than,
    )
    report = retention.sweep()
    typer.echo(
        f"removed {report.results} result(s) and {report.inputs} orphaned input file(s): {report.bytes} bytes"
    )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key's owner.")],
    credits: Annotated[str | None, typer.Option(help="Starting credits; unlimited when omitted.")] = None,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    new = _key_store(_settings(data_dir)).create(name, _credits(credits))
    if as_json:
        typer.echo(json.dumps({"key": new.key, **_key_json(new.record)}))
    else:
        typer.echo(f"key: {new.key}\nwebhook secret: {new.record.webhook_secret}")


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys (their prefixes, never the keys)."""
    for key in _key_store(_settings(data_dir)).list():
        typer.echo(json.dumps(_key_json(key)))


@keys_app.command("revoke")
def keys_revoke(name_or_id: str, data_dir: DataDir = None) -> None:
    """Stop a key from working; its jobs and results stay."""
    store = _key_store(_settings(data_dir))
    key = store.find(name_or_id)
    if key is None:
        raise typer.BadParameter(f"no key named {name_or_id!r}")
    store.revoke(key.id)
    console.print(f"revoked {key.name} ({key.prefix}...)")


@credits_app.command("add")
def credits_add(
    name_or_id: str,
    amount: Annotated[str, typer.Argument(help="Credits to add (1 credit = 0.01 USD).")],
    data_dir: DataDir = None,
) -> None:
    """Add credits to a key with a finite balance."""
    store = _key_store(_settings(data_dir))
    key = store.find(name_or_id)
    if key is None:
        raise typer.BadParameter(f"no key named {name_or_id!r}")
    updated = store.add_credits(key.id, _credits(amount) or Decimal(0))
    typer.echo(json.dumps(_key_json(updated)))  # type: ignore[arg-type]
