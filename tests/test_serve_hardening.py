"""No request can hurt anything but itself: the hardened HTTP edge and request isolation, through
real HTTP against apps on the session Serve instance (plus the replica's own path in-process).

Every bad case is followed by a normal request that must succeed. One disaggregated app
(`/hard`, max_model_len 256) takes the client mistakes, the poisoned requests, the large prompts
and the cut streams; a unified app (`/keys`) runs with API keys from the YAML args and from
RAYMOE_API_KEY. The schema-driven fuzz run (schemathesis) goes against `/hard`'s own OpenAPI.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from raymoe.engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-deepseek-v3"
MAX_MODEL_LEN = 256
INT64_MAX = 2**63 - 1


def _args(**overrides: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["model"]["max_model_len"] = MAX_MODEL_LEN
    for unit in ("prefill", "decode"):
        args[unit].update(torch_threads=1, max_waiting_requests=16)
        args[unit]["deployment"]["ray_actor_options"]["num_cpus"] = 0.25
        args[unit]["engine"].update(kv_cache_tokens=4096, max_num_seqs=16)
    args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.05
    args["metrics_interval_s"] = 0.25
    args["kv_ticket_ttl_s"] = 5.0
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def apps(serve_http: Any) -> Iterator[dict[str, str]]:
    from ray import serve

    from raymoe.serve.app import build_app

    keyed = _args(disaggregated=False)
    keyed["ingress"]["api_keys"] = ["k-yaml"]
    # what `RAYMOE_API_KEY=... raymoe serve` gives the ingress replica's process
    keyed["ingress"]["deployment"]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"RAYMOE_API_KEY": "k-env1, k-env2"}
    }
    try:
        serve.run(build_app(_args()), name="raymoe-hard", route_prefix="/hard")
        serve.run(build_app(keyed), name="raymoe-keys", route_prefix="/keys")
        yield {"hard": f"{serve_http.base}/hard", "keys": f"{serve_http.base}/keys"}
    finally:
        for app in ("raymoe-hard", "raymoe-keys"):
            serve.delete(app)


@pytest.fixture(scope="module")
def hard(apps: dict[str, str]) -> str:
    return apps["hard"]


def _complete(base: str, timeout: float = 60, **body: Any) -> httpx.Response:
    """json.dumps as Python writes it: lone surrogates escaped, inf as Infinity (httpx's json= refuses both)."""
    return httpx.post(f"{base}/v1/completions", content=json.dumps({"model": MODEL, **body}).encode(),
                      headers={"content-type": "application/json"}, timeout=timeout)


def _ok(base: str, headers: dict[str, str] | None = None) -> None:
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def _assert_error(r: httpx.Response, status: int, type: str = "invalid_request_error") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == type, err
    assert "Error" not in err["message"] and "replica" not in err["message"].lower(), err  # no internals
    return err


# a prompt of 250 token ids leaves exactly 6 tokens of max_model_len 256
PROMPT_250 = [7] * 250
BOUNDS = [
    ({"top_k": INT64_MAX}, 200, None),
    ({"top_k": -1}, 200, None),
    ({"top_k": 2**63}, 400, "top_k"),
    ({"top_k": 10**30}, 400, "top_k"),
    ({"top_k": -2}, 400, "top_k"),
    ({"top_p": 1.0}, 200, None),
    ({"top_p": 1e-30}, 200, None),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.0000001}, 400, "top_p"),
    ({"temperature": 2}, 200, None),
    ({"temperature": 0}, 200, None),
    ({"temperature": 2.0001}, 400, "temperature"),
    ({"temperature": -1e-9}, 400, "temperature"),
    ({"temperature": 1e308}, 400, "temperature"),
    ({"seed": INT64_MAX}, 200, None),
    ({"seed": -(2**63)}, 200, None),
    ({"seed": 2**63}, 400, "seed"),
    ({"seed": -(2**63) - 1}, 400, "seed"),
    ({"seed": 10**30}, 400, "seed"),
    ({"prompt": PROMPT_250, "max_tokens": 6}, 200, None),
    ({"prompt": PROMPT_250, "max_tokens": 7}, 400, "max_tokens"),
    ({"max_tokens": INT64_MAX}, 400, "max_tokens"),
    ({"max_tokens": 2**63}, 400, "max_tokens"),
    ({"max_tokens": 10**30}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"stop": ["a", "b", "c", "d"]}, 200, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": "x" * 1024}, 200, None),
    ({"stop": "x" * 1025}, 400, "stop"),
    ({"stop_token_ids": [INT64_MAX]}, 200, None),
    ({"stop_token_ids": [2**63]}, 400, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, 400, "stop_token_ids"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BOUNDS, ids=[json.dumps(b[0])[:40] for b in BOUNDS])
def test_sampling_fields_at_and_past_their_bounds(hard: str, fields: dict[str, Any], status: int, param: str | None) -> None:
    body = {"prompt": "bounds", "max_tokens": 2, "temperature": 1.0, **fields}
    r = _complete(hard, **body)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert _assert_error(r, status)["param"] == param
    _ok(hard)


def _raw(base: str, path: str, content: bytes, content_type: str = "application/json", method: str = "POST",
         **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{base}{path}", content=content, headers={"content-type": content_type},
                         timeout=60, **kw)


def test_client_mistakes_are_4xx_in_the_openai_shape(hard: str) -> None:
    chat = "/v1/chat/completions"
    cases: list[tuple[httpx.Response, int]] = [
        (_raw(hard, "/v1/completions", b'{"model": "%s", "prompt": "a\\ud800b"}' % MODEL.encode()), 400),
        (_raw(hard, "/v1/completions", b'{"model": "%s", "prompt": ["\\udfff"]}' % MODEL.encode()), 400),
        (_raw(hard, chat, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x\udc00"}]}).encode()), 400),
        (_raw(hard, chat, json.dumps({"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}).encode()), 400),
        (_raw(hard, "/v1/completions", b"[" * 1000 + b"]" * 1000), 400),
        (_raw(hard, "/v1/completions", b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
        (_raw(hard, "/v1/completions", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL.encode()), 400),
        (_raw(hard, "/v1/completions", b'{"model": "m", "prompt": "x"}', content_type="text/plain"), 415),
        (_raw(hard, "/v1/completions", b"model=m&prompt=x", content_type="application/x-www-form-urlencoded"), 415),
        (httpx.get(f"{hard}/v1/completions", timeout=30), 405),
        (httpx.delete(f"{hard}/v1/chat/completions", timeout=30), 405),
        (httpx.post(f"{hard}/v1/nothing-here", json={}, timeout=30), 404),
        (httpx.get(f"{hard}/nowhere", timeout=30), 404),
    ]
    for r, status in cases:
        err = _assert_error(r, status)
        assert "detail" not in r.text
        if status == 400:
            assert err["message"]
        _ok(hard)
    assert "surrogate" in cases[0][0].json()["error"]["message"] and cases[0][0].json()["error"]["param"] == "prompt"
    assert cases[2][0].json()["error"]["param"] == "messages.0.content"


def test_a_body_over_the_limit_is_413_before_it_is_parsed(hard: str) -> None:
    big = b'{"model": "m", "prompt": "' + b"x" * (8 << 20) + b'"}'
    _assert_error(_raw(hard, "/v1/completions", big), 413)  # Content-Length says so
    _ok(hard)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while the body streams in
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = httpx.post(f"{hard}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    _assert_error(r, 413)
    _ok(hard)


def _stats(base: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/stats", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _greedy_ids(base: str, prompt: str) -> list[int]:
    r = _complete(base, prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True, return_token_ids=True)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_a_poisoned_request_among_good_ones_fails_alone(hard: str) -> None:
    from ray import serve

    from raymoe.serve.protocol import RequestRejected

    prompts = [f"good request {i}" for i in range(6)]
    reference = [_greedy_ids(hard, p) for p in prompts]
    before = _stats(hard)
    poisons: list[dict[str, Any]] = [
        {"prompt": "p", "top_k": 10**30}, {"prompt": "p", "seed": 2**64}, {"prompt": "p\ud800"},
        {"prompt": "p", "max_tokens": 10**30}, {"prompt": "p", "temperature": 1e400},
    ]
    # past the edge: params made unrepresentable after construction, straight to the prefill replica
    # (a pickled dataclass is not re-constructed there; the engine checks it again)
    prefill = serve.get_deployment_handle("PrefillServer", app_name="raymoe-hard")
    crafted = SamplingParams(max_tokens=4)
    crafted.top_k = 10**30

    def poison_direct() -> None:
        with pytest.raises(RequestRejected, match="top_k"):
            prefill.prefill.remote("poison-direct", [1, 2, 3], crafted).result()

    with ThreadPoolExecutor(12) as pool:
        good = [pool.submit(_greedy_ids, hard, p) for p in prompts]
        bad = [pool.submit(_complete, hard, **{"max_tokens": 4, **p}) for p in poisons]
        direct = pool.submit(poison_direct)
        assert [f.result() for f in good] == reference
        for f in bad:
            _assert_error(f.result(), 400)
        direct.result()
    after = _stats(hard)
    assert (after["prefill"]["replica"], after["decode"]["replica"]) == (before["prefill"]["replica"], before["decode"]["replica"])
    _ok(hard)


def _ingress_pid(app: str) -> int:
    """The ingress replica's process on this machine (Ray titles it `ray::ServeReplica:<app>:OpenAIIngress`)."""
    title = f"ServeReplica:{app}:OpenAIIngress".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if title in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
    raise AssertionError(f"no process titled {title!r}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_health_answers_fast_during_large_prompts_and_memory_stays_bounded(hard: str) -> None:
    pid = _ingress_pid("raymoe-hard")
    _ok(hard)
    rss_before = _rss_mb(pid)
    big = "lorem ipsum dolor sit amet " * ((4 << 20) // 27)  # ~4 MB of text
    # just under the no-tokenizer bound: really tokenized (on the prep threads), then too long
    tokenized = ("z" * 20 + " ") * ((22 * 4 * MAX_MODEL_LEN - 1) // 21)
    bodies = [
        ("/v1/completions", {"prompt": big}), ("/v1/completions", {"prompt": big}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
        ("/v1/completions", {"prompt": tokenized}),
    ]
    encoded = [(path, json.dumps({"model": MODEL, **b}).encode()) for path, b in bodies]  # before the clock runs
    latencies: list[float] = []
    done = False

    def poll_health() -> None:
        with httpx.Client(timeout=30) as client:
            while not done:
                t0 = time.perf_counter()
                r = client.get(f"{hard}/health")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.02)

    def send(path: str, content: bytes) -> httpx.Response:
        return httpx.post(f"{hard}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        poller = pool.submit(poll_health)
        time.sleep(0.2)
        results = [pool.submit(send, path, content) for path, content in encoded]
        for f in results:
            assert _assert_error(f.result(), 400)["code"] == "context_length_exceeded"
        done = True
        poller.result()
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies
    _ok(hard)
    growth = _rss_mb(pid) - rss_before
    assert growth < 200, f"ingress RSS grew by {growth:.0f} MB"


def test_cut_streams_release_their_kv_pins_at_once(hard: str) -> None:
    body = {"model": MODEL, "prompt": "a story " * 20, "max_tokens": 100, "ignore_eos": True, "stream": True}

    def cut(_: int) -> None:
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{hard}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for i, _line in enumerate(r.iter_lines()):
                if i >= 1:
                    break

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cut, range(16)))
    t_cut = time.monotonic()
    while True:
        s = _stats(hard)
        if s["prefill"]["pinned_kv_handoffs"] == 0 and s["decode"]["in_flight"] == 0:
            break
        assert time.monotonic() - t_cut < 1.5, s
        time.sleep(0.05)
    assert s["prefill"]["kv_blocks_used"] == 0
    _ok(hard)


def test_a_lost_release_expires_on_the_timer_while_idle(hard: str) -> None:
    """A pin nobody releases (its decode never came) expires after kv_ticket_ttl_s, with no new request."""
    from ray import serve

    prefill = serve.get_deployment_handle("PrefillServer", app_name="raymoe-hard")
    res = prefill.prefill.remote("orphan", [5, 6, 7, 8], SamplingParams(max_tokens=8, ignore_eos=True)).result()
    assert res.ticket is not None
    assert _stats(hard)["prefill"]["pinned_kv_handoffs"] == 1
    deadline = time.monotonic() + 5.0 + 3.0  # kv_ticket_ttl_s + the timer's period and slack
    while _stats(hard)["prefill"]["pinned_kv_handoffs"]:
        assert time.monotonic() < deadline, "the orphaned pin never expired"
        time.sleep(0.25)
    _ok(hard)


def test_api_keys_from_yaml_and_environment(apps: dict[str, str]) -> None:
    keys, hard = apps["keys"], apps["hard"]
    assert httpx.get(f"{keys}/health", timeout=30).status_code == 200  # open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-yaml"}, {"Authorization": "Basic k-yaml"}):
        for r in (httpx.get(f"{keys}/v1/models", headers=headers, timeout=30),
                  httpx.get(f"{keys}/v1/stats", headers=headers, timeout=30),
                  httpx.post(f"{keys}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers, timeout=30),
                  httpx.post(f"{keys}/v1/unknown", headers=headers, timeout=30)):
            assert _assert_error(r, 401)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        _ok(keys, {"Authorization": "Bearer k-yaml"})
    for key in ("k-yaml", "k-env1", "k-env2"):
        auth = {"Authorization": f"Bearer {key}"}
        _ok(keys, auth)
        assert _stats(keys, auth)["llm"]["role"] == "llm"
    from openai import AuthenticationError, OpenAI

    assert OpenAI(base_url=f"{keys}/v1", api_key="k-env2", max_retries=0).models.list().data[0].id == MODEL
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{keys}/v1", api_key="nope", max_retries=0).models.list()
    _ok(hard)  # keys off: no header needed
    assert httpx.get(f"{hard}/v1/models", timeout=30).status_code == 200


def test_openapi_describes_the_request_bodies(hard: str) -> None:
    schema = httpx.get(f"{hard}/openapi.json", timeout=30).json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        props = schema["components"]["schemas"][model]["properties"]
        assert props["top_k"]["maximum"] == INT64_MAX and "temperature" in props
    assert "ChatMessage" in schema["components"]["schemas"]


def test_schema_driven_fuzzing_finds_no_server_error(hard: str, tmp_path: Path) -> None:
    """schemathesis against the app's own /openapi.json: every generated request is answered without a 5xx."""
    exe = Path(sys.executable).with_name("schemathesis")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(exe), "run", f"{hard}/openapi.json", "--url", hard, "--checks", "not_a_server_error",
         "--max-examples", "40", "--workers", "2", "--request-timeout", "30", "--generation-deterministic",
         # not the coverage phase: its strategies' repr trips CPython 3.11's "AST constructor recursion
         # depth mismatch" SystemError inside hypothesis now and then (a runtime error, not a finding)
         "--phases", "examples,fuzzing"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " generated, " in out and "failed" not in out.split("Test cases:")[-1], out[-3000:]
    print(out[-1200:])
    assert time.monotonic() - t0 < 120, "keep the fuzz run bounded"
    _ok(hard)


def test_a_failed_row_in_the_replica_fails_its_request_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `LLMServer` over the real engine: a sampling failure of one request ends it with a
    `rejected` error delta (the ingress's 400-type error event); the others stream on, the unit lives."""
    from raymoe.engine import sampler as sampler_module
    from raymoe.serve.server import LLMServer

    real = sampler_module.row_generator

    def poisoned(seed: int, index: int, device: Any) -> Any:
        if seed == 666:
            raise RuntimeError("injected")
        return real(seed, index, device)

    monkeypatch.setattr(sampler_module, "row_generator", poisoned)
    config = {"model": {"dtype": "float32", "max_model_len": 128}, "disaggregated": False, "engine_process": False,
              "decode": {"engine": {"kv_cache_tokens": 1024, "max_num_seqs": 8}}}

    async def main() -> None:
        server = LLMServer(config)
        good = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        bad = SamplingParams(max_tokens=6, temperature=1.0, seed=666, ignore_eos=True)
        stream = server.stream_outputs("ing")
        await stream.__anext__()
        held = [server.generate(rid, [3, 4, 5], p, "ing") for rid, p in (("g1", good), ("bad", bad), ("g2", good))]
        for h in held:
            await h.__anext__()
        ends: dict[str, Any] = {}
        tokens: dict[str, list[int]] = {"g1": [], "g2": [], "bad": []}
        while len(ends) < 3:
            batch = await asyncio.wait_for(stream.__anext__(), timeout=60)
            for d in batch.deltas:
                tokens[d.request_id].extend(d.token_ids)
                if d.finished:
                    ends[d.request_id] = (d.finish_reason, d.error_kind, d.error)
        assert ends["bad"] == (None, "rejected", "sampling failed: injected")
        assert ends["g1"][:2] == ends["g2"][:2] == ("length", None)
        assert tokens["g1"] == tokens["g2"] and len(tokens["g1"]) == 6
        await server.check_health()  # the unit did not fail
        await stream.aclose()

    asyncio.run(main())


def test_unit_failure_and_overload_are_told_apart_without_internals() -> None:
    """A failed unit is 503 `unavailable` ("restarting"), a full queue 503 `overloaded`; neither body names
    a replica or an exception class; what the server cannot classify is a 500 `server_error`."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from raymoe.serve.ingress import OpenAIIngress
    from raymoe.serve.protocol import QueueFullError, UnitUnavailable

    ingress = SimpleNamespace(retry_after="3")
    cases = [
        (UnitUnavailable("decode replica abc123: its deployment unit failed (UnitFailure('rank 3'))"), 503, "unavailable"),
        (ActorDiedError(), 503, "unavailable"),
        (QueueFullError("prefill replica abc123: 80 requests in flight"), 503, "overloaded"),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "overloaded"),
        (KeyError("internal"), 500, "server_error"),
    ]
    for exc, status, kind in cases:
        err = OpenAIIngress._translate(ingress, exc)  # type: ignore[arg-type]
        body = json.dumps(err.body())
        assert (err.status, err.type) == (status, kind), exc
        assert "abc123" not in body and "Error" not in body and "UnitFailure" not in body, body
        if status == 503:
            assert err.headers["Retry-After"] == "3"
        if kind == "unavailable":
            assert "restarting" in err.message and "capacity" not in err.message
