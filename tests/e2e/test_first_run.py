"""A new user's first run: a taken port, start-up warnings, /docs without internet."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.engines.registry import BUNDLED_WEIGHTS
from fluxserve.engines.vocabulary import known_words, vocabulary_note
from fluxserve.settings import Settings
from fluxserve.worker.quiet import HARMLESS, quiet_model_stack_imports


def test_known_harmless_import_warnings_are_dropped_and_others_of_those_loggers_kept() -> None:
    quiet_model_stack_imports()
    for name, fragment in HARMLESS:
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=seen: seen.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning("before %s after", fragment)
            logger.warning("something else went wrong")
        finally:
            logger.removeHandler(handler)
        assert seen == ["something else went wrong"], name


def test_serve_on_a_taken_port_says_so_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fluxserve",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "d"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; is another server running there? "
        "Choose another with --port (or FLUXSERVE_PORT), or `make serve PORT=8001`"
    ]
    assert not (tmp_path / "d").exists()  # no database, no key, no worker: nothing ran before the bind


def test_docs_and_redoc_use_only_assets_served_by_the_server_itself(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, workers=0))
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            response = client.get(page)
            assert response.status_code == 200
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
            assert assets, page
            for asset in assets:
                assert asset.startswith("/") and not asset.startswith("//"), (page, asset)
                served = client.get(asset)
                assert served.status_code == 200 and len(served.content) > 1000, asset
            assert "http://" not in response.text and "https://" not in response.text, page
    # In a browser with other origins blocked both pages render; redoc's JS still asks a CDN for its
    # "API docs by Redocly" badge image (cdn.redoc.ly/redoc/logo-mini.svg), which is only decorative.


def test_the_bundled_vocabulary_is_its_tokenizers_whole_words_and_other_words_are_noted() -> None:
    tokenizer = json.loads((BUNDLED_WEIGHTS / "tokenizer_2" / "tokenizer.json").read_text())
    pieces = {piece[1:].lower() for piece, _ in tokenizer["model"]["vocab"] if piece.startswith("▁")}
    known = known_words(BUNDLED_WEIGHTS)
    # Every whole word of the tokenizer but those of the caption grammar the shipped weights never trained on
    # (they were tuned on v1's templates, training/RESULTS.md), so a prompt using one is told it is unknown.
    assert known == {word for word in pieces if word.isalpha()} - {"and", "draw", "over", "showing"}
    assert {"circle", "heart", "purple", "light", "blue", "top", "left", "background"} <= known
    assert vocabulary_note(BUNDLED_WEIGHTS, "A large red HEART, top-left; on light blue background 4k") == {}
    note = vocabulary_note(BUNDLED_WEIGHTS, "a purple giraffe and a Giraffe eating a circle")
    assert note["unknown_words"] == ["giraffe", "and", "eating"]
    assert "'giraffe', 'and', 'eating'" in note["note"]
    assert vocabulary_note(BUNDLED_WEIGHTS.parent, "a giraffe") == {}  # no vocabulary.txt: never noted


def readme() -> str:
    return (Path(__file__).parents[2] / "README.md").read_text()


def readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th ```bash block under ``heading`` in README.md, as a user would paste it."""
    section = readme().split(f"\n{heading}\n", 1)[1]
    return section.split("```bash\n")[index + 1].split("```", 1)[0]


def test_first_steps_run_twice_fail_cleanly_and_rotate_gives_a_working_key(
    make_server: Any, tmp_path: Path
) -> None:
    """README's first steps verbatim, on a real server: `.venv/bin/activate` here puts a `fluxserve` that
    is this test's Python on the PATH, and the server's data dir and port come from the environment."""
    server = make_server()
    server.start()
    home = tmp_path / "home"
    (home / ".venv" / "bin").mkdir(parents=True)
    command = home / ".venv" / "bin" / "fluxserve"
    command.write_text(f'#!/bin/sh\nexec {sys.executable} -m fluxserve "$@"\n')
    command.chmod(0o755)
    (home / ".venv" / "bin" / "activate").write_text(f'PATH="{command.parent}:$PATH"\n')
    env = {**server.env, "FLUXSERVE_DATA_DIR": str(server.data_dir), "FLUXSERVE_PORT": str(server.port)}
    env.pop("FLUXSERVE_KEY", None)

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=300
        )

    steps = readme_block("## First steps")
    first = bash(steps + 'echo "$KEY" > key.txt\n')
    assert first.returncode == 0, first.stderr
    assert (
        first.stdout == "saved circle.png (seed 1, 1024x768, 2.5 credits)\n"
        and (home / "circle.png").stat().st_size > 0
    )
    old_key = (home / "key.txt").read_text().strip()

    again = bash(steps)
    assert again.returncode == 1 and again.stdout == "" and "Traceback" not in again.stderr
    assert "a live key is already named 'me'" in again.stderr and "fluxserve keys rotate me" in again.stderr
    assert "error: no API key" in again.stderr

    rotate = re.search(r"`(export KEY=\$\(fluxserve keys rotate me --quiet\))`", readme())
    assert rotate is not None
    activate, _, generate = steps.splitlines()
    rotated = bash(f"{activate}\n{rotate.group(1)}\n{generate}\n")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout == "saved circle.png (seed 1, 1024x768, 2.5 credits)\n"
    body = {"prompt": "a red circle"}
    refused = httpx.post(f"{server.base_url}/bfl/v1/flux-dev", json=body, headers={"TT-API-KEY": old_key})
    assert refused.status_code in (401, 403), refused.text
    tried = bash(
        f"{activate}\n{rotate.group(1)}\n"
        + readme_block("## First steps", 1).replace(":8000", f":{server.port}")
    )
    assert tried.returncode == 0, tried.stderr
    saved = [line.split(" (")[0] for line in tried.stdout.splitlines()[:2]]
    assert saved == ["saved star.png", "saved heart.jpg"] and '"status":"SUCCESS"' in tried.stdout
    keys = [json.loads(line) for line in server.cli("keys", "list").splitlines()]
    assert [key["name"] for key in keys].count("me") == 1  # the same key, with a new secret


def test_the_first_key_is_printed_after_the_start_up_logs_set_apart_without_colour_escapes(
    make_server: Any,
) -> None:
    server = make_server()
    server.start()
    deadline = time.monotonic() + 120
    while "First start" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = server.log_path.read_text().splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("First start"))
    assert lines[first - 2 : first] == ["", "-" * 78]
    # Not a terminal (a log file, as under journald or docker): the key goes to a private file, and only its
    # path is said (on a terminal the key itself, with two commands to try it).
    path = server.data_dir.resolve() / "first-api-key"
    assert lines[first] == (
        f"First start: created API key 'default', written to {path} (mode 0600); read it, then delete it"
    )
    assert lines[first + 1] == "-" * 78
    before = "\n".join(lines[:first])
    assert "Application startup complete" in before and "worker started" in before
    assert "\x1b[" not in server.log_path.read_text()  # not a terminal: no colours, uvicorn's included


def test_logs_have_colours_on_a_terminal_only() -> None:
    code = "import logging, fluxserve.logs as logs; logs.configure_logging(); logging.warning('hi')"
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hi" in piped.stderr and "\x1b[" not in piped.stderr
    leader, follower = pty.openpty()
    subprocess.run([sys.executable, "-c", code], stderr=follower, check=True, timeout=60)
    os.close(follower)
    assert b"\x1b[" in os.read(leader, 65536)
    os.close(leader)


def test_make_serve_installs_only_when_pyproject_or_the_checkout_changed(tmp_path: Path) -> None:
    """`make -n` (print, run nothing) on a virtualenv in tmp_path: its stamp file decides."""
    checkout = Path(__file__).parents[2]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    stamp = tmp_path / ".fluxserve-installed-runtime"

    def planned() -> str:
        make = ["make", "-n", "-C", str(checkout), f"VENV={tmp_path}", "install-runtime"]
        return subprocess.run(make, capture_output=True, text=True, check=True).stdout

    assert "pip install --quiet --disable-pip-version-check -e '.[local]'" in planned()  # never installed
    stamp.write_text(f"{checkout}\n")
    assert "pip" not in planned()  # nothing changed: serve starts at once
    stamp.write_text("/another/checkout\n")
    assert "pip install" in planned()
    stamp.write_text(f"{checkout}\n")
    os.utime(stamp, (0, 0))  # older than pyproject.toml
    assert "pip install" in planned()
