"""A Serve replica that is a multi-GPU deployment unit: the serve layer passes the unit shape through.

The non-disaggregated app with a decode unit of 1 node x 2 simulated GPUs (attention DP2, EP2):
the replica's engine drives the expert-parallel runtime's worker actors; answers match the
single-process engine token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ep_server(serve_http: Any) -> Any:
    from ray import serve

    from raymoe.serve.app import build_app

    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["disaggregated"] = False
    args["decode"].update(parallel={"nodes": 1, "gpus_per_node": 2, "attention_tp": 1}, torch_threads=1)
    args["decode"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.1
    args["decode"]["engine"].update(kv_cache_tokens=2048, max_num_seqs=8)
    args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.05
    try:
        serve.run(build_app(args), name="raymoe-ep", route_prefix="/ep")
        yield f"{serve_http.base}/ep"
    finally:
        serve.delete("raymoe-ep")


def test_expert_parallel_unit_behind_the_same_api(ep_server: str) -> None:
    from raymoe import LLM, SamplingParams
    from raymoe.model.tiny import default_checkpoint

    prompt = "Experts on two GPUs"
    ref = LLM(model=default_checkpoint(), max_model_len=2048, kv_cache_tokens=2048).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False
    )[0]
    body = {"model": "tiny-deepseek-v3", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{ep_server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == ref.token_ids
    stats = httpx.get(f"{ep_server}/v1/stats", timeout=30).json()["llm"]
    assert stats["dp_size"] == 2 and stats["kv_blocks_used"] == 0


def _worker_pids() -> set[int]:
    """Live GPU worker processes, from the GCS (the test cluster runs no dashboard)."""
    from ray._private import state

    return {a["Pid"] for a in state.actors().values() if a["ActorClassName"] == "GPUWorker" and a["State"] == "ALIVE"}


def test_dead_worker_fails_fast_then_the_unit_restarts_as_a_whole(ep_server: str) -> None:
    """A GPU worker that dies: requests get 503 + Retry-After at once (no hang), the health check
    hands the replica to Serve, which restarts it and with it every worker of the unit (gang)."""
    import os
    import signal
    import time

    body = {"model": "tiny-deepseek-v3", "prompt": "After the crash", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    before = httpx.post(f"{ep_server}/v1/completions", json=body, timeout=120)
    assert before.status_code == 200, before.text
    old = _worker_pids()
    assert len(old) == 2
    os.kill(next(iter(old)), signal.SIGKILL)

    t0 = time.monotonic()
    r = httpx.post(f"{ep_server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 503, r.text
    assert time.monotonic() - t0 < 60
    assert "Retry-After" in r.headers and r.json()["error"]["message"]

    deadline = time.monotonic() + 240
    while True:
        r = httpx.post(f"{ep_server}/v1/completions", json=body, timeout=120)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, "the unit was not restarted"
        time.sleep(2)
    assert r.json()["choices"][0]["token_ids"] == before.json()["choices"][0]["token_ids"]
    new = _worker_pids()
    assert len(new) == 2 and not (new & old), "every worker of the unit is new"
