"""Live expert re-placement through the app (real Ray, real Serve, real HTTP).

One disaggregated app on the session cluster: a CPU prefill unit (the single-process engine: its
tracker measures, never migrates) and a decode unit of 1 node x 2 simulated GPUs (attention DP2,
EP2, 8 redundant expert slots) on a tiny checkpoint whose gate bias makes experts 0-3 win nearly
every token. The decode tracker re-plans every 2 s but with a `min_gain` no plan reaches, so it
only counts skips until `POST /v1/experts/rebalance` forces a migration under load.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
APP = "raymoe-experts"
HOT = 4
PROMPTS = [f"Request {i} keeps decoding while its experts move" for i in range(6)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def hot_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raymoe.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("hot") / "tiny-hot", hot_experts=HOT, progress=False)


@pytest.fixture(scope="module")
def app(serve_http: Any, hot_checkpoint: Path) -> Any:
    from ray import serve

    from raymoe.serve.app import build_app

    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["model"].update(path=str(hot_checkpoint), name="tiny-hot", max_model_len=512)
    args["stream_interval_ms"] = 0
    args["prefill"].update(torch_threads=1, eplb={"enabled": True, "poll_s": 1, "interval_s": 3600})
    args["prefill"]["engine"].update(kv_cache_tokens=2048, max_num_seqs=8)
    args["prefill"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.1
    args["decode"].update(
        parallel={"nodes": 1, "gpus_per_node": 2, "attention_tp": 1, "redundant_experts": 8, "node_limited": False},
        torch_threads=1,
        eplb={"enabled": True, "poll_s": 1, "interval_s": 2, "min_gain": 1000.0},
    )
    args["decode"]["engine"].update(kv_cache_tokens=2048, max_num_seqs=8)
    args["decode"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.1
    args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.05
    try:
        serve.run(build_app(args), name=APP, route_prefix="/experts")
        yield f"{serve_http.base}/experts"
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(hot_checkpoint: Path) -> dict[str, list[int]]:
    """Greedy outputs of the single-process engine, the answers every request must match."""
    from raymoe import LLM, SamplingParams

    with LLM(model=str(hot_checkpoint), max_model_len=512, kv_cache_tokens=4096) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}


def _complete(base: str, prompt: str) -> httpx.Response:
    body = {"model": "tiny-hot", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=300)


def _experts(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/experts", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _unit(body: dict[str, Any], role: str) -> dict[str, Any]:
    rows = [u for u in body["units"] if u["role"] == role]
    assert len(rows) == 1, body
    return rows[0]


def _wait(pred: Any, timeout: float, what: str) -> Any:
    t0 = time.monotonic()
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_experts_shape_and_trackers_measure(app: str) -> None:
    """`GET /v1/experts`: the issue's shape; the CPU unit's tracker reports load and imbalance without
    migrating; the decode tracker re-plans on its interval and skips (gain below min_gain)."""
    assert _complete(app, PROMPTS[0]).status_code == 200  # load on both units
    body = _wait(lambda: (b := _experts(app)) and all(
        (b["trackers"].get(r) or {}).get("imbalance") for r in ("prefill", "decode")) and
        b["trackers"]["decode"]["skipped"] >= 1 and b, 60, "both trackers to measure, decode to skip")
    assert set(body) >= {"units", "trackers"}
    for u in body["units"]:
        assert u["role"] in ("prefill", "decode") and isinstance(u["replica"], str) and u["replica"]
        assert isinstance(u["placement_version"], int) and isinstance(u["imbalance"], float)
        assert isinstance(u["migrations"], int) and u["last_migration"] is None
    prefill, decode = _unit(body, "prefill"), _unit(body, "decode")
    assert prefill["expert_parallel"] is False and prefill["placement_version"] == 0
    # experts 0-3 take half of every token's 8 picks: one expert per GPU would be very uneven
    assert prefill["imbalance"] > 4.0
    assert decode["expert_parallel"] is True and decode["placement_version"] == 0 and decode["imbalance"] > 1.05
    t = body["trackers"]
    assert t["prefill"]["migrations"] == 0 and t["prefill"]["replans"] == 0
    assert t["decode"]["migrations"] == 0 and t["decode"]["skipped"] >= 1
    assert "min_gain" in t["decode"]["last_replan"]["reason"]
    assert t["decode"]["projected_imbalance"] < t["decode"]["imbalance"]


def test_rebalance_under_load_migrates_without_failing_requests(app: str, reference: dict[str, list[int]]) -> None:
    """Bounded concurrent load; a forced rebalance of decode meanwhile: 0 failed requests, the
    version rises, copies moved, outputs of requests spanning the switch equal the engine's."""
    before = _unit(_experts(app), "decode")
    results: dict[str, tuple[float, float, httpx.Response]] = {}

    def run(prompt: str) -> None:
        t0 = time.monotonic()
        r = _complete(app, prompt)
        results[prompt] = (t0, time.monotonic(), r)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for th in threads:
        th.start()
    time.sleep(1.0)  # the requests are decoding
    t_post = time.monotonic()
    r = httpx.post(f"{app}/v1/experts/rebalance", json={"role": "decode"}, timeout=300)
    t_done = time.monotonic()
    for th in threads:
        th.join(300)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 1 and res[0]["role"] == "decode" and res[0]["error"] is None, res
    assert res[0]["placement_version"] == before["placement_version"] + 1 and res[0]["moved"] > 0
    for prompt, (_, _, resp) in results.items():
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["token_ids"] == reference[prompt], prompt
    spanning = [p for p, (t0, t1, _) in results.items() if t0 < t_post and t1 > t_done]
    assert spanning, "no request spanned the migration"
    after = _unit(_experts(app), "decode")
    assert after["placement_version"] == before["placement_version"] + 1 and after["migrations"] == 1
    last = after["last_migration"]
    assert last["moved"] == res[0]["moved"] and last["bytes"] > 0
    assert last["stage_s"] >= 0 and last["commit_s"] >= 0
    assert after["imbalance"] < before["imbalance"]
    # the same prompts once more on the new placement
    again = _complete(app, PROMPTS[0])
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == reference[PROMPTS[0]]


def test_rebalance_requests_are_checked(app: str) -> None:
    bad = httpx.post(f"{app}/v1/experts/rebalance", json={"role": "expert"}, timeout=60)
    assert bad.status_code == 400 and "role" in bad.json()["error"]["message"]
    # the CPU unit hosts every expert: nothing to move, nothing fails
    cpu = httpx.post(f"{app}/v1/experts/rebalance", json={"role": "prefill"}, timeout=120)
    assert cpu.status_code == 200 and cpu.json()["results"] == []
    # no body: every unit kind; decode is balanced by now, whatever it still moves commits
    every = httpx.post(f"{app}/v1/experts/rebalance", timeout=300)
    assert every.status_code == 200, every.text
    assert all(r["role"] == "decode" and r["error"] is None for r in every.json()["results"])


def test_a_killed_tracker_restarts_and_serving_never_waits_for_it(app: str) -> None:
    import os
    import signal

    import ray

    from raymoe.eplb.tracker import find_tracker

    tracker = find_tracker(APP, "decode")
    assert tracker is not None
    old_pid = ray.get(tracker.pid.remote())
    os.kill(old_pid, signal.SIGKILL)
    r = _complete(app, PROMPTS[1])  # served while the tracker is down
    assert r.status_code == 200, r.text

    def back() -> bool:  # Ray restarts it under the same name, in a new process, and it polls again
        try:
            t = find_tracker(APP, "decode")
            return t is not None and ray.get(t.pid.remote(), timeout=10) != old_pid and \
                ray.get(t.report.remote(), timeout=10).polls >= 1
        except ray.exceptions.RayError:
            return False

    _wait(back, 90, "the tracker to come back")
    body = _experts(app)
    assert _unit(body, "decode")["placement_version"] >= 1  # the unit kept its placement
    assert body["trackers"]["decode"]["imbalance"] is not None


def test_trackers_end_with_their_app(app: str) -> None:
    from ray import serve

    from raymoe.eplb.tracker import find_tracker

    serve.delete(APP)
    _wait(lambda: find_tracker(APP, "decode") is None and find_tracker(APP, "prefill") is None, 60,
          "the trackers to end once their app is deleted")
