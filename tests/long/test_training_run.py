"""`training.train` is deterministic and resumable: a resumed run ends where an unbroken one does, with
steps rendered on the fly too (aspect buckets, two-object scenes), several-object scenes from their table,
and captions that name no background."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fluxserve.engines.registry import BUNDLED_WEIGHTS
from training.scenes import all_scenes

ROOT = Path(__file__).parents[2]


def seeded_table(out: Path, source: Path | None) -> None:
    """The latent table the trainer caches, made up front: random latents are data enough for this test,
    and encoding the 8,100 real scenes would take minutes."""
    out.mkdir()
    if source is None:
        n = len(list(all_scenes(1)))
        gen = torch.Generator().manual_seed(0)
        torch.save(torch.randn(n, 16, 16, 16, generator=gen), out / "latents.pt")
        torch.save(torch.rand(n, 64, generator=gen), out / "coverage.pt")
    else:
        for name in ("latents.pt", "coverage.pt"):
            os.link(source / name, out / name)


def train(out: Path, max_steps: int, *extra: str) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "training.train", "--seed", "3", "--out", str(out),
            "--vae", str(BUNDLED_WEIGHTS / "vae"), "--jitters", "1", "--batch", "4",
            "--width", "32", "--heads", "2", "--double", "1", "--single", "1",
            "--decoder-every", "2", "--object-weight", "4", "--t-shift", "1",
            "--eval-n", "2", "--eval-edits", "1", "--eval-pairs", "1", "--eval-steps", "1",
            "--eval-every", "1000",
            "--bucket-frac", "0.5", "--pair-frac", "0.5", "--default-frac", "0.3",
            "--group-frac", "0.5", "--groups", "16",
            "--max-steps", str(max_steps), *extra,
        ],
        check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def test_a_resumed_run_ends_where_an_unbroken_one_does(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    seeded_table(whole, None)
    seeded_table(broken, whole)
    train(whole, 6)
    train(broken, 3)
    halfway = torch.load(broken / "ckpt.pt", weights_only=False)
    train(broken, 6, "--resume")
    a = torch.load(whole / "ckpt.pt", weights_only=False)
    b = torch.load(broken / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and halfway["step"] == 3
    for part in ("modules", "ema", "vae"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    # and the second half did train: the weights moved from where the first half left them
    assert any(not torch.equal(a["modules"][k], halfway["modules"][k]) for k in a["modules"])
    assert (whole / "best" / "model_index.json").exists()  # the run exported its evaluated weights
