"""The long scenario of test_gpu_path.py (make test-long)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_gpu_path import ROOT


def test_the_gpu_benchmark_runs_at_tiny_dimensions(tmp_path: Path) -> None:
    """The minimal set's code path (build from the configurations, direct call, through the API) for the
    plain variant; a model folder built here is what the GPU run builds at full size."""
    out = tmp_path / "runs.json"
    command = ["-m", "bench.gpu", "--tiny", "--variants", "bf16", "--root", str(tmp_path), "--out", str(out)]
    run = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = json.loads(out.read_text())
    measured = {
        (r["family"], r["path"], r["batch"]) for r in runs if r["seconds_per_image"] and not r["error"]
    }
    assert measured == {
        *(("flux1-dev", path, batch) for path in ("direct", "fluxserve") for batch in (1, 2)),
        ("flux2-klein-4b", "direct", 1),
        ("flux2-klein-4b", "fluxserve", 1),
    }, runs
    assert "text encoders: published widths" in run.stdout and "fluxserve/direct" in run.stdout
