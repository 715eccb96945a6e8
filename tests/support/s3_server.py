"""An S3-compatible server on loopback for the tests: moto's server mode, in a thread of the test process.

One server per test process (started on first use); each test module gets its own bucket and each test its
own prefix in it, so tests never see one another's objects. Fixtures here are imported by the modules that
use them (``from s3_server import blob_url``).
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from moto.server import ThreadedMotoServer

from tests.conftest import free_port

# moto accepts any credentials; the tests' own, so that nothing asks a metadata endpoint for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fluxserve-test",
    "AWS_SECRET_ACCESS_KEY": "fluxserve-test-secret",
    "AWS_REGION": "us-east-1",
}


@functools.cache
def endpoint() -> str:
    """The server's base URL; it runs until the test process exits (its thread is a daemon)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


class MotoProcess:
    """moto's server in a process of its own, for fault tests: ``pause()`` (SIGSTOP) makes it an S3 that
    takes connections and never answers, ``resume()`` (SIGCONT) brings it back with its objects."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        """``port``: that of a stopped one, to stand in for it (empty: moto keeps nothing)."""
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process does not act on SIGTERM
        self.process.terminate()
        self.process.wait(timeout=20)
        self._log.close()


def create_bucket(server: str | None = None, name: str | None = None) -> str:
    """A bucket (a new name unless ``name``) on this process's server or on the one at ``server``."""
    name = name or f"fluxserve-{uuid.uuid4().hex[:12]}"
    response = httpx.put(f"{server or endpoint()}/{name}", timeout=10)
    assert response.status_code == 200, response.text
    return name


def storage_url(bucket: str, prefix: str, urls: str = "presigned", server: str | None = None) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={server or endpoint()}&region=us-east-1&urls={urls}"


def object_keys(bucket: str, prefix: str = "", server: str | None = None) -> list[str]:
    """The bucket's keys under ``prefix``, read with moto's own listing (not through the code under test),
    of this process's server or of the one at ``server``."""
    response = httpx.get(
        f"{server or endpoint()}/{bucket}", params={"list-type": "2", "prefix": prefix}, timeout=10
    )
    assert response.status_code == 200, response.text
    return sorted(part.split("</Key>")[0] for part in response.text.split("<Key>")[1:])


@pytest.fixture(scope="module")
def s3_bucket() -> str:
    """A bucket of this test module's own."""
    return create_bucket()


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def blob_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL of each kind: a folder of this test, or a prefix of this test in the module's bucket."""
    if request.param == "file":
        yield (tmp_path / "files").as_uri()
        return
    request.getfixturevalue("s3_credentials")
    yield storage_url(request.getfixturevalue("s3_bucket"), f"t-{uuid.uuid4().hex[:8]}")
