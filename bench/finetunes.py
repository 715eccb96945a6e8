"""What a finetune costs a worker, on the bundled model with the shipped ``outlines`` adapter and two more
of the same shape: a generation without an adapter, loading one into a free slot, generating with it,
changing only its strength, and hot-swapping another into a used slot.

    python -m bench.finetunes [--repeats 5]

Prints each figure in milliseconds (median of the repeats) and as a ratio to a plain generation, all from
one run on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from safetensors.torch import load, save

from fluxserve.core.catalog import BUNDLED_WEIGHTS, load_catalog
from fluxserve.engines.base import Adapter
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.flux.options import LoadOptions
from fluxserve.finetunes.store import BUILTIN_DIR
from tests.support.engine_fixtures import Recorder, request


def median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shipped = (BUILTIN_DIR / "outlines.safetensors").read_bytes()
    # Adapters of the same layers and rank as the shipped one (its weights scaled): what a hot swap takes.
    others = [save({k: v * (2 + i) for k, v in load(shipped).items()}) for i in range(args.repeats + 1)]
    model = FluxModel(BUNDLED_WEIGHTS, LoadOptions(max_adapters=1))
    engine = DiffusersFluxEngine(BUNDLED_WEIGHTS, load_catalog().entry("flux-pro-finetuned"), model)

    def generate(finetune: Adapter | None) -> object:
        job = request("flux-pro-finetuned", width=128, height=128, steps=20, adapter=finetune)
        return engine.generate(job, Recorder().hooks)

    outlines = Adapter("outlines", "builtin:outlines", 1.0, lambda: shipped)
    generate(None)  # warm
    plain = median_ms(lambda: generate(None), args.repeats)
    with model.lock:
        first = median_ms(lambda: model.adapters.use(outlines), 1)  # into the free slot
    with_adapter = median_ms(lambda: generate(outlines), args.repeats)
    strengths = iter([0.5, 1.0] * args.repeats)
    with model.lock:
        reweight = median_ms(
            lambda: model.adapters.use(
                Adapter("outlines", "builtin:outlines", next(strengths), lambda: shipped)
            ),
            args.repeats,
        )
    swaps = iter(enumerate(others))
    with model.lock:
        hotswap = median_ms(
            lambda: model.adapters.use(
                Adapter("other", f"other:{(item := next(swaps))[0]}", 1.0, lambda: item[1])
            ),
            args.repeats,
        )
    figures = {
        "generation, no adapter (128x128, 20 steps, true CFG)": plain,
        "generation with the adapter": with_adapter,
        "load the adapter into a free slot": first,
        "change only its strength": reweight,
        "hot-swap another adapter into the used slot": hotswap,
    }
    for name, ms in figures.items():
        print(json.dumps({"what": name, "ms": round(ms, 2), "ratio_to_plain": round(ms / plain, 4)}))


if __name__ == "__main__":
    main()
