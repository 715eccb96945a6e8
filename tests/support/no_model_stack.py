"""fluxserve processes run as if the ``local`` extra were not installed: a ``sitecustomize`` module, first on
their PYTHONPATH, puts an import hook before every other that refuses torch, diffusers, transformers and the
rest, as a virtualenv without them would (``ModuleNotFoundError``). Children of such a process inherit it."""

from __future__ import annotations

import os
from pathlib import Path

from fluxserve.worker.stack import LOCAL_MODULES

BLOCKED = (*LOCAL_MODULES, "torchao")

SITECUSTOMIZE = f"""
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class NoModelStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NoModelStack())
"""


def without_model_stack(folder: Path) -> dict[str, str]:
    """The environment (over ``os.environ``) of a subprocess that cannot import the model stack; the hook
    is written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
