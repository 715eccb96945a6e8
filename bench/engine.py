"""fluxserve overhead against diffusers called directly, on the same local FLUX pipeline folder.

    python bench/engine.py [--weights FOLDER] [--size 512] [--steps 8] [--rounds 3]
                           [--poll 0.05] [--max-batch 1]

Without --weights it builds the tiny pipeline the test suite runs on. For 1 and for 8
concurrent requests it times (a) the pipeline called directly, the requests one after another in this
process, and (b) the same requests submitted at once to a `fluxserve serve` subprocess over HTTP and
polled until every image is stored; it prints the ratio (fluxserve / direct) per round and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from diffusers import FluxPipeline

from fluxserve.engines.tiny import build_tiny_flux


def direct(pipe: FluxPipeline, count: int, size: int, steps: int) -> float:
    started = time.perf_counter()
    for seed in range(count):
        pipe(
            prompt=f"benchmark image {seed}",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=min(512, pipe.tokenizer_2.model_max_length),  # as the engine does
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0].save(os.devnull, format="PNG")
    return time.perf_counter() - started


def through_api(base: str, key: str, count: int, size: int, steps: int, poll: float) -> float:
    headers = {"TT-API-KEY": key}
    body = {"width": size, "height": size, "steps": steps, "guidance": 3.5}

    def one(seed: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
            job = client.post(
                "/bfl/v1/flux-dev", json={**body, "prompt": f"benchmark image {seed}", "seed": seed}
            )
            job_id = job.json()["data"]["jobId"]
            while True:
                result = client.get("/flux/fetch", params={"jobId": job_id}).json()
                if result["status"] == "SUCCESS":
                    return
                if result["status"] == "FAILED":
                    raise RuntimeError(result["message"])
                time.sleep(poll)

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def start_server(weights: Path, data: Path, max_batch: int = 1) -> tuple[subprocess.Popen[bytes], str, str]:
    data.mkdir(parents=True, exist_ok=True)
    catalog = data / "catalog.toml"
    catalog.write_text(
        f'[models."flux-dev"]\nweights = "{weights}"\nmax_pixels = 0\n'
        f"options = {{ max_batch = {max_batch} }}\n"
    )
    env = {**os.environ, "FLUXSERVE_CATALOG": str(catalog), "FLUXSERVE_POLL_SECONDS": "0.02"}
    return serve(data, env)


def serve(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    """A key made in ``data``, then ``fluxserve serve`` on a free loopback port with ``env``: the process,
    its base URL and the key, once it answers /healthz (within two minutes)."""
    create = ["keys", "create", "--name", "bench", "--data-dir", str(data), "--json"]
    key = subprocess.run(
        [sys.executable, "-m", "fluxserve", *create], env=env, capture_output=True, text=True, check=True
    ).stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "fluxserve", "serve", "--port", str(port), "--data-dir", str(data)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, base, json.loads(key)["key"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, help="a diffusers FLUX folder (default: the tiny pipeline)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=1, help="the catalog's options.max_batch")
    parser.add_argument(
        "--poll", type=float, default=0.05, help="seconds between a client's fetches (each of 8 polls)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        weights = args.weights or build_tiny_flux(data / "tiny")
        pipe = FluxPipeline.from_pretrained(weights)
        pipe.set_progress_bar_config(disable=True)
        server, base, key = start_server(weights.resolve(), data / "server", args.max_batch)
        try:
            direct(pipe, 1, args.size, args.steps)  # warm-up both sides
            through_api(base, key, 1, args.size, args.steps, args.poll)
            threads = torch.get_num_threads()
            setup = f"size={args.size} steps={args.steps} torch_threads={threads} poll={args.poll}"
            print(f"weights={weights.name} {setup} max_batch={args.max_batch}")
            for count in (1, 8):
                ratios = []
                for round_ in range(args.rounds):
                    d = direct(pipe, count, args.size, args.steps)
                    f = through_api(base, key, count, args.size, args.steps, args.poll)
                    ratios.append(f / d)
                    timing = f"direct {d:.3f} s, fluxserve {f:.3f} s, ratio {f / d:.3f}"
                    print(f"  {count} request(s) round {round_ + 1}: {timing}")
                print(f"{count} request(s): median ratio fluxserve/direct = {statistics.median(ratios):.3f}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
