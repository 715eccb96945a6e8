"""End to end through the event stream against the bundled engine called directly, in the same run.

    python -m bench.stream [--rounds 3] [--steps 20] [--size 256] [--worker-poll 5] [--postgres]

(a) direct: the bundled model's engine (shipped catalog entry for flux-dev), built in this process with one
torch thread, makes the requests one after another and PNG-encodes each image, as a worker does.
(b) fluxserve: a `fluxserve serve` subprocess (one worker process, one torch thread, the same catalog and
model files) gets the same requests at once from `fluxserve.client.Client.generate` (one client thread
each): submit, follow /flux/events to the result, download the PNG. Printed per round and as medians of
the ratio fluxserve / direct, for 1 and for 8 concurrent jobs. Then where a lone job's time goes (the
vendor dialect's result carries the worker's start and end): submit to claim, the run, result to client.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.engine import serve
from fluxserve.client import Client
from fluxserve.core.catalog import load_catalog
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import Engine, EngineHooks, EngineRequest
from fluxserve.engines.registry import EngineRegistry
from tests.support.pg_server import PostgresCluster, required_binaries

PROMPT = "a large red heart in the center on a blue background"


def direct(engine: Engine, count: int, size: int, steps: int) -> float:
    started = time.perf_counter()
    for seed in range(count):
        params = GenerationParams(
            model="flux-dev", prompt=PROMPT, width=size, height=size, steps=steps, guidance=2.5
        )
        result = engine.generate(EngineRequest(params, PROMPT, size, size, seed), EngineHooks())
        result.image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - started


def through_stream(base: str, key: str, count: int, size: int, steps: int) -> float:
    def one(seed: int) -> None:
        with Client(base, key) as client:
            client.generate("flux-dev", PROMPT, seed=seed, width=size, height=size, steps=steps, guidance=2.5)

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def breakdown(base: str, key: str, size: int, steps: int) -> tuple[float, float, float]:
    """One job through the vendor dialect, whose result carries the worker's start and end times: (submit
    to claim, claim to stored result, stored result to the image in the client's hands), in seconds."""
    with Client(base, key, dialect="vendor") as client:
        submitted = time.time()
        made = client.generate("flux-dev", PROMPT, seed=1, width=size, height=size, steps=steps, guidance=2.5)
        done = time.time()
    result = made.job.raw["result"]
    return (
        result["start_time"] - submitted,
        result["end_time"] - result["start_time"],
        done - result["end_time"],
    )


def start_server(data: Path, models: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    environment = {**os.environ, "FLUXSERVE_MODELS_DIR": str(models), "FLUXSERVE_TORCH_THREADS": "1", **env}
    return serve(data, environment)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker-poll", type=float, default=5.0, help="FLUXSERVE_POLL_SECONDS (idle claims)")
    parser.add_argument(
        "--postgres", action="store_true", help="on a throwaway PostgreSQL cluster (tests/support)"
    )
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 8], help="concurrent jobs per round")
    parser.add_argument("--models", type=Path, default=Path("/tmp/fluxserve-bench-models"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = EngineRegistry(load_catalog(), args.models).get("flux-dev")
    env = {"FLUXSERVE_POLL_SECONDS": str(args.worker_poll)}
    with contextlib.ExitStack() as stack:
        if args.postgres:
            cluster = PostgresCluster(required_binaries())
            cluster.start()
            stack.callback(cluster.stop)
            env["FLUXSERVE_DATABASE_URL"] = cluster.database()
        measure(engine, env, args)


def measure(engine: Engine, env: dict[str, str], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        server, base, key = start_server(Path(scratch), args.models, env)
        try:
            direct(engine, 1, args.size, args.steps)  # warm-up both sides (the worker loads its model)
            through_stream(base, key, 1, args.size, args.steps)
            print(f"bundled flux-dev {args.size}x{args.size} steps={args.steps} {env}")
            for count in args.jobs:
                ratios = []
                for round_ in range(args.rounds):
                    d = direct(engine, count, args.size, args.steps)
                    f = through_stream(base, key, count, args.size, args.steps)
                    ratios.append(f / d)
                    print(f"  {count} job(s) round {round_ + 1}: direct {d:.3f} s, stream {f:.3f} s")
                print(f"{count} job(s): median ratio stream/direct = {statistics.median(ratios):.3f}")
            parts = [breakdown(base, key, args.size, args.steps) for _ in range(args.rounds)]
            wait, run, tail = (statistics.median(part) * 1000 for part in zip(*parts, strict=True))
            print(
                f"one job (medians): to claim {wait:.0f} ms, run {run:.0f} ms, result to client {tail:.0f} ms"
            )
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
