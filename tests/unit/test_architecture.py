"""The import rules of docs/architecture.md, checked on the source: what each part may import, and that the
API process never imports torch, diffusers or transformers, nor the moderation classifiers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fluxserve

PACKAGE = Path(fluxserve.__file__).parent
HEAVY = {
    "torch",
    "diffusers",
    "transformers",
    "torchao",
    "accelerate",
    "onnxruntime",
    "sklearn",
    "profanity_check",
}

# Each part (a top-level package or module of fluxserve) and the parts it may import. Keep this table and
# docs/architecture.md in step.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "settings": set(),
    "logs": set(),
    "core": {"errors"},
    "db": set(),
    "storage": {"core", "errors"},
    "safety": {"errors"},
    "client": {"errors"},
    "accounts": {"db", "errors", "webhooks"},
    "surfaces": {"core", "errors"},  # below api/ and webhooks (app.py wires its renderer into them)
    "webhooks": {"core", "db", "errors", "jobs", "safety"},
    "jobs": {"accounts", "core", "db", "errors", "safety", "storage"},
    "wiring": {"db", "jobs", "settings", "storage"},
    "finetunes": {"core", "db", "errors", "storage"},
    "api": {"accounts", "core", "errors", "finetunes", "jobs", "storage", "surfaces"},
    "engines": {"core", "errors", "safety"},
    "worker": {"core", "engines", "errors", "finetunes", "jobs", "safety", "settings", "storage", "wiring"},
    "app": {
        "accounts",
        "api",
        "core",
        "finetunes",
        "jobs",
        "safety",
        "settings",
        "storage",
        "surfaces",
        "webhooks",
        "wiring",
        "worker",
    },
    "cli": {"accounts", "core", "db", "errors", "finetunes", "logs", "settings", "worker"},
    "settings_docs": {"settings"},
    "__main__": {"cli"},
    "__init__": set(),
}
# Modules of the API process (and what it starts with), and those of a worker that only relays: no model
# stack, not even indirectly.
LIGHT_MODULES = (
    "fluxserve.app",
    "fluxserve.cli",
    "fluxserve.engines.relay.engine",
    "fluxserve.worker.supervisor",
)


def _module_imports(path: Path) -> list[str]:
    """The modules imported at module level (function bodies, where lazy imports live, are skipped)."""
    names: list[str] = []
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def _sources() -> list[Path]:
    return [
        path
        for path in PACKAGE.rglob("*.py")
        if "weights" not in path.parts and "migrations" not in path.parts
    ]


@pytest.mark.parametrize("path", _sources(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_each_part_imports_only_what_architecture_allows(path: Path) -> None:
    part = path.relative_to(PACKAGE).with_suffix("").parts[0]
    assert part in ALLOWED, f"{part}: a new part; add it to ALLOWED and docs/architecture.md"
    for name in _module_imports(path):
        top = name.split(".")
        if top[0] != "fluxserve" or len(top) == 1:
            continue
        assert top[1] == part or top[1] in ALLOWED[part], f"{path.name} may not import {name}"


def test_the_api_process_never_imports_the_model_stack() -> None:
    script = (
        f"import sys\nfor name in {LIGHT_MODULES!r}: __import__(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_import_check_sees_lazy_and_top_level_imports_apart(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom fluxserve.core import x\ndef f():\n    import torch\n")
    assert _module_imports(sample) == ["os", "fluxserve.core"]
