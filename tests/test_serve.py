"""The serving app on the shared simulated cluster: OpenAI clients, errors, cancellation, metrics.

One disaggregated app from deployments/local.yaml (prefill + decode + ingress) and one
non-disaggregated app next to it, on a free HTTP port, shut down at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# Ray's processes read this when the session cluster starts (after collection): metrics reach the
# export endpoint within ~1 s instead of 10 s, which keeps the scrape test short.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Mixture of experts", "Hello, my name is", "1, 2, 3,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(**overrides: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    args = doc["applications"][0]["args"]
    for unit in ("prefill", "decode"):
        args[unit].update(torch_threads=1, max_waiting_requests=4)
        args[unit]["deployment"]["ray_actor_options"]["num_cpus"] = 0.25
        args[unit]["engine"].update(kv_cache_tokens=4096, max_num_seqs=8)
    args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.05
    args["metrics_interval_s"] = 0.5
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def server(serve_http: Any) -> Iterator[str]:
    from ray import serve

    from raymoe.serve.app import build_app

    try:
        serve.run(build_app(_args()), name="raymoe", route_prefix="/")
        serve.run(build_app(_args(disaggregated=False)), name="raymoe-unified", route_prefix="/unified")
        yield serve_http.base
    finally:
        for app in ("raymoe", "raymoe-unified"):
            serve.delete(app)


@pytest.fixture(scope="module")
def app_urls(server: str) -> dict[str, dict[str, str]]:
    """Both HTTP paths to both apps: Serve's proxy, and each ingress replica's own port (direct ingress)."""
    from raymoe.serve.runner import direct_ingress_urls

    direct = {"disaggregated": direct_ingress_urls("raymoe", "127.0.0.1"),
              "unified": direct_ingress_urls("raymoe-unified", "127.0.0.1")}
    assert all(len(u) == 1 for u in direct.values()), direct  # the session cluster runs direct ingress
    return {
        "proxy": {"disaggregated": server, "unified": f"{server}/unified"},
        "direct": {app: urls[0] for app, urls in direct.items()},
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Greedy token ids of the single-process engine for PROMPTS (the parity reference)."""
    from raymoe import LLM, SamplingParams
    from raymoe.model.tiny import default_checkpoint

    llm = LLM(model=default_checkpoint(), max_model_len=2048, kv_cache_tokens=4096)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_object_store_kv_transport_round_trip(ray_cluster: Any, dtype: str) -> None:
    """The KV travels as a numpy array (zero-copy in the object store), bfloat16 as same-size ints."""
    import asyncio

    import torch

    from raymoe.engine.outputs import KVHandoff
    from raymoe.serve.kv_transport import make_transport

    kv = torch.randn(4, 37, 80).to(getattr(torch, dtype))
    sent = KVHandoff("r1", list(range(37)), 5, -0.25, kv)
    transport = make_transport("object_store")
    ticket = transport.send(sent, "prefill-a")
    assert ticket.nbytes == kv.nelement() * kv.element_size() and ticket.prompt_len == 37
    got = asyncio.run(transport.receive(ticket))
    assert got.kv.dtype == kv.dtype and torch.equal(got.kv, kv)
    assert (got.request_id, got.prompt_token_ids, got.first_token_id, got.first_logprob) == ("r1", list(range(37)), 5, -0.25)
    with pytest.raises(ValueError, match="unknown transport"):
        make_transport("carrier-pigeon")


def _client(base: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_openai_client_greedy_parity_with_engine(
    app_urls: dict[str, dict[str, str]], path: str, reference: dict[str, list[int]]
) -> None:
    """Completions (plain, streamed), several at once; token-identical to the engine alone."""
    server = app_urls[path]["disaggregated"]
    client = _client(server)
    model = client.models.list().data[0].id
    extra = {"return_token_ids": True, "ignore_eos": True}

    def plain(prompt: str) -> list[int]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        return r.choices[0].model_extra["token_ids"]

    def streamed(prompt: str) -> list[int]:
        ids: list[int] = []
        usage = None
        for chunk in client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        ):
            if chunk.choices:
                ids.extend(chunk.choices[0].model_extra["token_ids"])
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 12
        return ids

    with ThreadPoolExecutor(8) as pool:
        plain_ids = list(pool.map(plain, PROMPTS))
        stream_ids = list(pool.map(streamed, PROMPTS))
    for p, a, b in zip(PROMPTS, plain_ids, stream_ids, strict=True):
        assert a == reference[p], p
        assert b == reference[p], p

    # every request of this ingress went through one output stream per unit replica, none is left open
    s = _stats(server)["decode"]
    assert s["subscribers"] >= 1 and s["in_flight"] == 0

    # the non-disaggregated app answers the same
    unified = _client(app_urls[path]["unified"])
    r = unified.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body=extra)
    assert r.choices[0].model_extra["token_ids"] == reference[PROMPTS[0]]


def test_chat_completions_plain_and_streamed(server: str) -> None:
    client = _client(server)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name an expert."}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 10
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    def stream_chat(_: int) -> str:
        parts = []
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(stream_chat, range(3))) == [text] * 3
    # raw SSE framing: data lines, [DONE] last
    body = {"model": model, "messages": messages, "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def _ok(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny-deepseek-v3", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "model"),
        ("/v1/completions", {"model": "tiny-deepseek-v3"}, "prompt"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "word " * 3000}, "prompt"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "max_tokens": 5000}, "max_tokens"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": [1, 99999]}, "prompt"),
        ("/v1/chat/completions", {"model": "tiny-deepseek-v3", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "tiny-deepseek-v3", "messages": [{"role": "wizard", "content": "x"}]},
         "messages.0.role"),
    ],
)
def test_bad_requests_get_400_and_server_keeps_serving(server: str, path: str, body: Any, param: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    _ok(server)


def test_full_queues_get_503_with_retry_after(server: str) -> None:
    """8 running + 4 waiting per replica; a burst of 24 long streams overflows and gets 503 + Retry-After."""
    body = {"model": "tiny-deepseek-v3", "prompt": "busy", "max_tokens": 150, "ignore_eos": True, "stream": True}

    def one(_: int) -> tuple[int, str | None, str]:
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
            text = r.read().decode()
            return r.status_code, r.headers.get("retry-after"), text

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _, _ in results]
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}
    for code, retry, text in results:
        if code == 503:
            assert retry == "1" and json.loads(text)["error"]["code"] == "queue_full"
        else:
            assert text.rstrip().endswith("data: [DONE]")
    _ok(server)


def _stats(server: str) -> dict[str, Any]:
    return httpx.get(f"{server}/v1/stats", timeout=30).json()


@pytest.mark.parametrize("path", ["proxy", "direct"])
def test_client_disconnect_cancels_and_frees_kv(app_urls: dict[str, dict[str, str]], path: str) -> None:
    server = app_urls[path]["disaggregated"]
    body = {"model": "tiny-deepseek-v3", "prompt": "a long story " * 40, "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    generated_before = _stats(server)["decode"]["generation_tokens"]
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{server}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 5:
                break
        used = _stats(server)["decode"]["kv_blocks_used"]
        assert used >= 8  # the 120-token prompt's blocks and more
    # the connection is closed: the request is aborted on the decode replica and its blocks freed
    deadline = time.monotonic() + 20
    while True:
        s = _stats(server)
        if (
            s["decode"]["kv_blocks_used"] == 0
            and s["decode"]["in_flight"] == 0
            and s["decode"]["running"] == 0
            and s["prefill"]["pinned_kv_handoffs"] == 0  # released once decode had the KV
        ):
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s["prefill"]["kv_blocks_used"] == 0
    assert s["decode"]["generation_tokens"] - generated_before < 1500
    _ok(server)


def test_health_models_stats(server: str) -> None:
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == "tiny-deepseek-v3" and models["data"][0]["max_model_len"] == 2048
    s = _stats(server)
    assert s["disaggregated"] and s["prefill"]["role"] == "prefill" and s["decode"]["kv_blocks_total"] == 256
    assert httpx.get(f"{server}/unified/v1/stats").json()["llm"]["role"] == "llm"


METRICS = [
    "raymoe_ttft_seconds_bucket",
    "raymoe_tpot_seconds_bucket",
    "raymoe_prompt_tokens_total",
    "raymoe_generation_tokens_total",
    "raymoe_running_requests",
    "raymoe_waiting_requests",
    "raymoe_kv_blocks_used",
    "raymoe_kv_blocks_free",
    "raymoe_kv_handoff_bytes_total",
    "raymoe_kv_handoff_seconds_bucket",
]


def _export_targets() -> list[str]:
    import ray

    return [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
        for n in ray.nodes()
        if n["Alive"] and n.get("MetricsExportPort")
    ]


def test_metrics_on_ray_export_endpoint(server: str) -> None:
    _ok(server)
    targets = _export_targets()
    assert targets
    deadline = time.monotonic() + 45
    while True:
        text = ""
        for t in targets:
            try:
                text += httpx.get(f"http://{t}/metrics", timeout=5).text
            except httpx.HTTPError:
                pass
        missing = [m for m in METRICS if not re.search(rf"^(ray_)?{m}\{{", text, re.M)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(1)
    gen = re.findall(r"^(?:ray_)?raymoe_generation_tokens_total\{[^}]*\} ([0-9.e+]+)", text, re.M)
    assert sum(float(v) for v in gen) > 0
    handoff = re.findall(r"^(?:ray_)?raymoe_kv_handoff_bytes_total\{[^}]*\} ([0-9.e+]+)", text, re.M)
    assert sum(float(v) for v in handoff) > 0


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary on PATH")
def test_metrics_through_prometheus(server: str) -> None:
    _ok(server)
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": _export_targets()}]}],
        }
        Path(d, "prometheus.yml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            query = urllib.parse.quote('sum({__name__=~"(ray_)?raymoe_generation_tokens_total"})')
            deadline = time.monotonic() + 60
            while True:
                try:
                    res = httpx.get(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5).json()
                    if res["data"]["result"] and float(res["data"]["result"][0]["value"][1]) > 0:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                assert time.monotonic() < deadline, "prometheus never saw raymoe_generation_tokens_total"
                time.sleep(1)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_disconnect_during_nonstreaming_request(server: str) -> None:
    """A non-streamed request whose client gives up while decode generates it is aborted too."""
    body = json.dumps({"model": "tiny-deepseek-v3", "prompt": "wait for it", "max_tokens": 1500, "ignore_eos": True})
    url = urllib.parse.urlsplit(server)
    generated_before = _stats(server)["decode"]["generation_tokens"]
    # a raw connection, closed once decode is generating for it (a client timeout could fire before)
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        deadline = time.monotonic() + 60
        while _stats(server)["decode"]["generation_tokens"] - generated_before < 5:
            assert time.monotonic() < deadline, "the request never reached decode"
            time.sleep(0.05)
    deadline = time.monotonic() + 20
    while True:
        s = _stats(server)
        if s["decode"]["in_flight"] == 0 and s["decode"]["kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    # aborted, not finished by itself within the deadline: it never reached max_tokens
    assert s["decode"]["generation_tokens"] - generated_before < 1500
