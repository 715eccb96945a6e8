"""Copy a run's best pipeline into the package: `python -m training.export --run training/runs/main`.

The run's `best/` folder is already a complete diffusers folder (EMA weights, tokenizers, scheduler); this
replaces the shipped one with it and checks that it loads and stays under the package size budget.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "fluxserve" / "weights" / "bundled"
LIMIT_BYTES = 40 * 2**20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a training output folder with best/")
    ap.add_argument("--to", type=Path, default=BUNDLED)
    args = ap.parse_args()
    src = args.run / "best"
    size = folder_bytes(src)
    if size > LIMIT_BYTES:
        raise SystemExit(f"{src} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB budget")
    from diffusers import FluxKontextPipeline, FluxPipeline

    FluxPipeline.from_pretrained(str(src), local_files_only=True)
    FluxKontextPipeline.from_pretrained(str(src), local_files_only=True)
    tmp = args.to.with_name(args.to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(args.to, ignore_errors=True)
    tmp.rename(args.to)
    print(f"exported {src} -> {args.to} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
