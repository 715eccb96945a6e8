"""The bundled model's seconds per image by torch thread count, alone and with the other cores busy.

    python bench/threads.py [--images 5] [--threads 1 2]

Each configuration runs in a fresh interpreter: the bundled pipeline (shipped catalog entry for flux-dev,
256x256, 20 steps, true CFG 4) makes ``--images`` images; the median is printed. "busy" starts one
spinning process per core but one next to it, as another busy process on a shared machine would be.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

RUN = """
import statistics, sys, time, torch
torch.set_num_threads({threads})
from fluxserve.core.catalog import load_catalog
from fluxserve.engines.registry import EngineRegistry
from fluxserve.engines.base import EngineHooks, EngineRequest
from fluxserve.core.params import GenerationParams
engine = EngineRegistry(load_catalog(), "/tmp/fluxserve-bench-models").get("flux-dev")
prompt = "a large red heart in the center on a blue background"
params = GenerationParams(model="flux-dev", prompt=prompt, steps=20)
times = []
for seed in range({images} + 1):
    started = time.perf_counter()
    engine.generate(EngineRequest(params, params.prompt, 256, 256, seed), EngineHooks())
    times.append(time.perf_counter() - started)
print(statistics.median(times[1:]))
"""


def seconds_per_image(threads: int, images: int) -> float:
    script = RUN.format(threads=threads, images=images)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    spinners = max(1, (os.cpu_count() or 2) - 1)
    for threads in args.threads:
        alone = seconds_per_image(threads, args.images)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spinners)]
        try:
            loaded = seconds_per_image(threads, args.images)
        finally:
            for process in busy:
                process.kill()
        print(f"{threads} torch thread(s): {alone:.2f} s alone, {loaded:.2f} s with {spinners} core(s) busy")


if __name__ == "__main__":
    main()
