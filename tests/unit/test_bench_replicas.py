"""bench/replicas.py's own arithmetic and its ceiling app, in process: wrong merging of two wrk processes'
histograms, or a bare app answering fluxserve's paths with 404s, would make every figure it prints wrong."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.replicas import BARE, ONE, SUBMIT_BODY, TWO, Case, Cpu, Load, Measure, bare_app, cases, report
from fastapi.testclient import TestClient


def _wrk_result(path: Path, requests: int, seconds: float, failed: int, latency: dict[int, int]) -> Path:
    """A result file as bench/replicas.lua writes it."""
    lines = [f"requests {requests}", f"duration_us {int(seconds * 1e6)}", f"status_errors {failed}"]
    lines += ["socket_errors 0", *(f"latency_us {us} {count}" for us, count in latency.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_wrk_processes_are_merged_exactly(tmp_path: Path) -> None:
    load = Load()
    load.add(_wrk_result(tmp_path / "a", 100, 1.0, 10, {1000: 90, 5000: 10}))  # 100/s, 10 refused
    load.add(_wrk_result(tmp_path / "b", 50, 2.0, 0, {2000: 50}))  # 25/s
    assert load.requests == 150 and load.failed == 10
    assert load.rate == 125.0
    assert load.ok_rate == 125.0 * 140 / 150
    assert load.percentile_ms(50) == 1.0  # the 75th of 150 latencies: the 90 at 1 ms come first
    assert load.percentile_ms(90) == 2.0  # the 135th: after 90 at 1 ms and 50 at 2 ms
    assert load.percentile_ms(99) == 5.0


def test_bare_app_answers_fluxserve_paths_and_validates() -> None:
    client = TestClient(bare_app())
    submitted = client.post(
        "/bfl/v1/flux-dev", content=SUBMIT_BODY, headers={"Content-Type": "application/json"}
    )
    assert submitted.status_code == 200 and submitted.json()["data"]["jobId"]
    assert client.get("/flux/fetch", params={"jobId": "abc"}).json()["data"]["jobId"] == "abc"
    assert client.post("/bfl/v1/flux-dev", json={"no": "prompt"}).status_code == 422


def test_report_takes_ratios_within_each_round(tmp_path: Path) -> None:
    every = cases(16)
    assert Case("submit", ONE, 16) in every and Case("submit", ONE, 16) not in cases(1)
    assert {case.server for case in cases(16, replicas=1)} == {BARE, ONE}
    rates = {BARE: [1000.0, 800.0], ONE: [100.0, 100.0], TWO: [150.0, 200.0]}
    measures = []
    for case in every:
        for round_, rate in enumerate(rates[case.server]):
            load = Load()
            load.add(_wrk_result(tmp_path / f"{case}-{round_}", int(rate * 10), 10.0, 0, {1000: 1}))
            measures.append(Measure(case, round_, load, Cpu(80.0, 10.0, 5.0, 100.0), None))
    args = argparse.Namespace(database="sqlite", connections=16, duration=10, rounds=2)
    table = report(measures, args)
    assert "| fluxserve 1 replica / bare | submit | 0.10, 0.12 | **0.11** |" in table
    assert "| 2 replicas / 1 replica | fetch | 1.50, 2.00 | **1.75** |" in table
    assert "| 1 replica: many keys / one key | submit | 1.00, 1.00 | **1.00** |" in table
    assert "| fluxserve 1 replica, many keys / bare | submit | 0.10, 0.12 | **0.11** |" in table
    assert "| fetch | fluxserve, 1 replica | 100 | 0 | 1.0 | 1.0 | 80 | 10 | 5 | 100 | 8.00 |  |" in table
