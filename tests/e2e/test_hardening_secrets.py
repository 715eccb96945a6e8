"""Secrets stay out of logs and other users' reach: redacted log lines, private files, and the relay's key
sent only to the hosts the operator allows."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import text

from fluxserve.accounts.keys import KEY_PREFIX, KeyStore
from fluxserve.cli import FIRST_KEY_FILE
from fluxserve.core.catalog import ModelEntry
from fluxserve.db.connection import open_database
from fluxserve.engines.base import EngineHooks
from fluxserve.engines.relay.engine import RelayEngine, RelayOptions
from fluxserve.engines.relay.vendor_api import default_key_hosts
from fluxserve.errors import EngineError
from fluxserve.logs import configure_logging, redact_text
from fluxserve.settings import Settings
from tests.conftest import Api, ServerProcess
from tests.support.engine_fixtures import request
from tests.support.fake_vendor import FAKE_KEY, FakeVendor

SIGNATURE = "c2lnbmF0dXJlLXNob3VsZC1uZXZlci1iZS1sb2dnZWQ"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0: a file or directory is only private when it was created so, not by the umask's grace."""
    previous = os.umask(0)
    yield
    os.umask(previous)


# -- log redaction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "kept", "gone"),
    [
        (
            f'127.0.0.1:5 - "GET /files/results/a.png?expires=17&signature={SIGNATURE} HTTP/1.1" 200',
            ["GET /files/results/a.png?expires=[redacted]&signature=[redacted] HTTP/1.1", "200"],
            [SIGNATURE, "=17"],
        ),
        ("GET /flux/fetch?jobId=abc123&x=1", ["/flux/fetch?jobId=[redacted]&x=[redacted]"], ["abc123"]),
        (
            "https://user:pa55@hooks.example/h?token=t0k",
            ["https://[redacted]@hooks.example/h"],
            ["pa55", "t0k"],
        ),
        ("http://a@b@c.example/x", ["http://[redacted]@c.example/x"], ["a@b"]),
        ("body signature=s1g&other=1", ["signature=[redacted]"], ["s1g"]),
        ("http://h.example/x?opaque#frag", ["?[redacted]#frag"], ["opaque"]),
        ("what? nothing = here", ["what? nothing = here"], []),
    ],
)
def test_redact_text(line: str, kept: list[str], gone: list[str]) -> None:
    redacted = redact_text(line)
    for part in kept:
        assert part in redacted, redacted
    for part in gone:
        assert part not in redacted, redacted


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_uvicorn = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
    }
    stream = io.StringIO()
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    for name, (handlers, propagate) in saved_uvicorn.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


@pytest.mark.parametrize("as_json", [False, True])
def test_every_log_line_is_redacted(captured_logs: io.StringIO, as_json: bool) -> None:
    configure_logging(json=as_json)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured_logs)
    # uvicorn's access log line, as uvicorn formats it
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        f"/files/results/x.png?expires=1&signature={SIGNATURE}",
        "1.1",
        200,
    )
    # our own line with a url field, and an exception whose text holds a URL
    logging.getLogger("fluxserve.webhooks").info(
        "webhook attempt", extra={"url": "https://u:pw-secret@hooks.example/h?token=tok-secret", "attempt": 1}
    )
    try:
        raise ValueError(f"cannot fetch https://cdn.example/r.png?sig={SIGNATURE}")
    except ValueError:
        logging.getLogger("fluxserve.worker").exception("job crashed")
    output = captured_logs.getvalue()
    assert output.count("\n") >= 3 and "webhook attempt" in output and "job crashed" in output
    assert "signature=[redacted]" in output and "hooks.example/h?token=[redacted]" in output
    for secret in (SIGNATURE, "pw-secret", "tok-secret"):
        assert secret not in output, output
    if as_json:
        assert all(json.loads(line) for line in output.splitlines() if line.startswith("{"))


# -- file modes -----------------------------------------------------------------------------------------


def test_the_database_and_its_new_directory_are_private(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "new" / "fluxserve.db"
    database = open_database(f"sqlite:///{path}")
    with database.begin() as conn:
        conn.execute(text("CREATE TABLE t (secret TEXT)"))
        conn.execute(text("INSERT INTO t VALUES ('whsec_x')"))
    with database.connect() as conn:  # a reader keeps the -wal and -shm files in place
        assert conn.execute(text("SELECT secret FROM t")).scalar() == "whsec_x"
        for suffix in ("", "-wal", "-shm"):
            assert mode(path.with_name(path.name + suffix)) == 0o600, suffix
    database.dispose()
    assert mode(path.parent) == 0o700


def test_an_existing_world_readable_database_is_narrowed(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "fluxserve.db"
    path.touch()
    path.chmod(0o644)
    open_database(f"sqlite:///{path}").dispose()
    assert mode(path) == 0o600
    assert mode(tmp_path) == 0o755  # a directory fluxserve did not create is left as it is


def test_the_secret_is_created_private_at_once_and_the_same_for_racing_processes(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created 0600 (never chmod-ed after the write) and whole: threads racing to make it all read one."""

    def no_chmod(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the secret must be created private, not chmod-ed after it was written")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    settings = Settings(data_dir=tmp_path / "data")
    barrier = threading.Barrier(8)
    secrets: list[str] = []

    def make() -> None:
        barrier.wait()
        secrets.append(settings.secret())

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(secrets) == 8 and len(set(secrets)) == 1 and len(secrets[0]) >= 32
    assert mode(settings.data_dir / "secret.key") == 0o600
    assert mode(settings.data_dir) == 0o700
    assert sorted(os.listdir(settings.data_dir)) == ["secret.key"]  # no temporary file left behind
    assert Settings(data_dir=tmp_path / "data").secret() == secrets[0]


def test_serve_keeps_signatures_out_of_its_log_and_its_files_private(
    make_server: Any, tmp_path: Path
) -> None:
    server: ServerProcess = make_server(data_dir=tmp_path / "fresh" / "data")
    key = server.create_key("private")["key"]  # the CLI creates the data dir and the database
    server.start()
    api = Api(server.base_url, key)
    webhook = "http://hook-user:hook-pass@127.0.0.1:9/hook?token=hook-token-secret"
    job_id = api.job("flux-dev", {"prompt": "a red circle", "steps": 1, "webhook_url": webhook})
    body = api.wait(job_id)
    assert body["status"] == "SUCCESS", body
    image_url = body["data"]["imageUrl"]
    signature = parse_qs(urlsplit(image_url).query)["signature"][0]
    assert api.image(body).size  # the signed URL is served: its path and query reach the access log
    forged = httpx.get(f"{server.base_url}/files/x.png?expires=1&signature={SIGNATURE}", timeout=10)
    assert forged.status_code in (403, 404)
    deadline = time.monotonic() + 30
    while "webhook attempt" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)

    data = server.data_dir
    assert mode(data) == 0o700
    for name in ("fluxserve.db", "fluxserve.db-wal", "fluxserve.db-shm", "secret.key"):
        assert mode(data / name) == 0o600, name
    server.stop()
    log = server.log_path.read_text()
    assert "webhook attempt" in log and "[redacted]@127.0.0.1:9/hook?token=[redacted]" in log
    assert "signature=[redacted]" in log  # the access log lines are there, redacted
    for secret in (signature, SIGNATURE, "hook-pass", "hook-token-secret"):
        assert secret not in log, secret


# -- the first key ---------------------------------------------------------------------------------------


def test_the_first_key_goes_to_a_private_file_not_to_a_log(make_server: Any, tmp_path: Path) -> None:
    """stdout is a file here (as under journald or docker): the log names the file, never the key."""
    server: ServerProcess = make_server(data_dir=tmp_path / "data")
    server.start()
    deadline = time.monotonic() + 120  # said once the server is ready, after its start-up logs
    while "First start" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stop()
    log = server.log_path.read_text()
    path = server.data_dir / FIRST_KEY_FILE
    assert f"First start: created API key 'default', written to {path.resolve()}" in log
    assert mode(path) == 0o600
    key = path.read_text().strip()
    assert key.startswith(KEY_PREFIX) and key not in log and KEY_PREFIX not in log
    assert KeyStore(open_database(Settings(data_dir=server.data_dir).database)).authenticate(key) is not None


def test_the_first_key_is_shown_on_a_terminal_and_written_nowhere(tmp_path: Path, models_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", models_dir)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "fluxserve", "serve", "--no-workers", "--port", str(server.port),
         "--data-dir", str(server.data_dir)],
        env=server.env, stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    try:
        while b"TT-API-KEY" not in shown:  # the "Try it" lines follow the key
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, shown.decode(errors="replace")
            shown += os.read(controller, 65536)
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.close(controller)
    assert b"(shown once): " + KEY_PREFIX.encode() in shown
    assert not (server.data_dir / FIRST_KEY_FILE).exists()


# -- the relay's key hosts ------------------------------------------------------------------------------


def relay(base_url: str, **options: Any) -> RelayEngine:
    entry = ModelEntry(
        engine="relay",
        options={"base_url": base_url, "api_key_env": "HARDENING_KEY", "poll_interval": 0.01, **options},
    )
    return RelayEngine(entry, "flux-dev", environ={"HARDENING_KEY": FAKE_KEY})


def test_key_hosts_default_and_validation() -> None:
    options = RelayOptions(base_url="https://x.co.uk")
    assert (
        options.allowed_key_hosts == ("x.co.uk", "*.bfl.ai", "bfl.ai") == default_key_hosts("https://x.co.uk")
    )
    custom = RelayOptions(base_url="https://api.bfl.ai", key_hosts=["api.bfl.ai", "*.eu.bfl.ai", "10.0.0.5"])
    assert custom.allowed_key_hosts == ("api.bfl.ai", "*.eu.bfl.ai", "10.0.0.5")
    for bad in (["*"], ["*.*.bfl.ai"], ["api.bfl.ai/v1"], ["user@api.bfl.ai"], ["a..b"], ["host:443"]):
        with pytest.raises(EngineError, match="key_hosts"):
            relay("https://api.bfl.ai", key_hosts=bad)


def test_the_relay_sends_its_key_only_to_allowed_hosts() -> None:
    with FakeVendor() as vendor:
        result = relay(vendor.base_url).generate(request("flux-dev", prompt="p", seed=1), EngineHooks())
        assert result.image.size
        assert vendor.seen.submits[-1][2].get("x-key") == FAKE_KEY  # the base host is allowed by default
        with pytest.raises(EngineError, match="refused the operator's API key"):
            relay(vendor.base_url, key_hosts=["*.bfl.ai"]).generate(
                request("flux-dev", prompt="p", seed=2), EngineHooks()
            )
        assert "x-key" not in {name.lower() for name in vendor.seen.submits[-1][2]}
