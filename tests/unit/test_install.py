"""``pip install fluxserve`` without the ``local`` extra: the API, the client and the CLI work without torch,
diffusers or transformers, and a worker that would need them says in one line what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxserve.core.catalog import Catalog
from fluxserve.worker import stack
from fluxserve.worker.stack import INSTALL_LOCAL, local_stack_problem
from tests.conftest import free_port
from tests.support.no_model_stack import BLOCKED, without_model_stack

IMPORT_AND_BUILD = """
import sys
from pathlib import Path

import fluxserve.app, fluxserve.cli, fluxserve.client
from fluxserve.app import create_app
from fluxserve.settings import Settings

app = create_app(Settings(data_dir=Path(sys.argv[1]), workers=0))
print(type(app).__name__, sorted({name.partition(".")[0] for name in sys.modules} & set(sys.argv[2:])))
"""


def _fluxserve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m fluxserve ARGS`` where the model stack cannot be imported."""
    return subprocess.run(
        [sys.executable, "-m", "fluxserve", *args, "--data-dir", str(tmp_path / "data")],
        env=without_model_stack(tmp_path / "hook"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_hook_refuses_the_model_stack(tmp_path: Path) -> None:
    """The other tests of this file mean something only if the hook works."""
    hooked = without_model_stack(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=hooked, capture_output=True, text=True)
    assert probe.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch' (blocked by the test)" in probe.stderr


def test_the_api_the_client_and_the_cli_import_and_the_app_builds_without_the_model_stack(
    tmp_path: Path,
) -> None:
    built = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_BUILD, str(tmp_path / "data"), *BLOCKED],
        env=without_model_stack(tmp_path / "hook"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == "FastAPI []"


def test_a_worker_without_the_local_extra_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    worker = _fluxserve(tmp_path, "worker")
    assert worker.returncode == 1
    assert worker.stdout == ""
    [line] = worker.stderr.splitlines()
    assert line.startswith("error: the worker's models run on local engines, which need torch, diffusers")
    assert INSTALL_LOCAL in line
    assert "--models" in line


def test_serve_with_workers_without_the_local_extra_says_so_before_it_listens(tmp_path: Path) -> None:
    serve = _fluxserve(tmp_path, "serve", "--workers", "1", "--port", str(free_port()))
    assert serve.returncode == 1
    [line] = serve.stderr.splitlines()
    assert INSTALL_LOCAL in line
    assert "--no-workers" in line
    assert not (tmp_path / "data").exists()  # nothing started, nothing made


def _catalog(**engines: str) -> Catalog:
    return Catalog.model_validate({"models": {name: {"engine": engine} for name, engine in engines.items()}})


def test_only_a_worker_that_runs_a_local_model_needs_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "LOCAL_MODULES", ("json", "fluxserve_no_such_module"))
    mixed = _catalog(**{"flux-kontext-max": "relay", "flux-dev": "diffusers"})
    assert local_stack_problem(_catalog(**{"flux-kontext-max": "relay"}), None, True) is None
    assert local_stack_problem(mixed, ["flux-kontext-max"], True) is None
    problem = local_stack_problem(mixed, None, True)
    assert problem == (
        "the worker's models run on local engines, which need fluxserve_no_such_module (not installed): "
        f"{INSTALL_LOCAL}"
    )
    assert local_stack_problem(mixed, ["flux-dev"], True) == problem


def test_an_install_with_the_extra_has_nothing_to_say() -> None:
    assert stack.missing_local_modules() == []  # this test environment installs .[local,test]
    assert local_stack_problem(_catalog(**{"flux-dev": "diffusers"}), None, True) is None
