"""``pip install fluxserve`` without an extra, for real: a new virtualenv, the package built from this
checkout and its dependencies from the package index. It holds no torch (nor any of the ``local`` extra),
stays under 400 MB, runs the CLI, and a worker there says in one line what to install. Needs the package
index (CI has it); about a minute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fluxserve.worker.stack import INSTALL_LOCAL, LOCAL_MODULES

CHECKOUT = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 400 * 2**20  # docs/install.md and BENCHMARKS.md: an API replica's virtualenv


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # the new venv only
    return subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=900)


def test_the_plain_install_has_no_model_stack_and_runs_the_api_and_the_cli(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        CHECKOUT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = _run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", source)
    assert installed.returncode == 0, installed.stderr

    torch = _run(venv / "bin" / "pip", "show", "torch")
    assert torch.returncode == 1 and "not found" in torch.stderr
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    found = _run(venv / "bin" / "python", "-c", probe, *LOCAL_MODULES)
    assert found.stdout.strip() == "[]"
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < LIMIT_BYTES, f"{size / 2**20:.0f} MB"

    help_text = _run(venv / "bin" / "fluxserve", "--help")
    assert help_text.returncode == 0 and "serve" in help_text.stdout
    app = "from fluxserve.app import create_app; create_app(); print('ok')"
    data = {"FLUXSERVE_DATA_DIR": str(tmp_path / "data")}
    built = subprocess.run(
        [venv / "bin" / "python", "-c", app], env={"PATH": os.environ["PATH"], **data},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.stdout.strip() == "ok", built.stderr
    worker = _run(venv / "bin" / "fluxserve", "worker", "--data-dir", tmp_path / "data")
    assert worker.returncode == 1
    [line] = worker.stderr.splitlines()
    assert INSTALL_LOCAL in line and "torch" in line
