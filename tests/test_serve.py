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
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": "hi", "n": 129}, "n"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": ["a"] * 50, "n": 3}, "n"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": ["a", [1, 2]]}, "prompt"),
        ("/v1/completions", {"model": "tiny-deepseek-v3", "prompt": [[1, 2], [1, 99999]]}, "prompt"),
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


# Every field vLLM's OpenAI server accepts that raymoe does not honour yet: (route, field, value).
UNSUPPORTED = [
    ("completions", "best_of", 3),
    ("completions", "suffix", "!"),
    ("completions", "use_beam_search", True),
    ("completions", "add_special_tokens", False),
    ("completions", "priority", 1),
    ("completions", "request_id", "mine"),
    ("chat", "functions", [{"name": "f", "parameters": {"type": "object"}}]),  # legacy: tools and tool_choice instead
    ("chat", "function_call", "auto"),
    ("chat", "continue_final_message", True),
    ("chat", "chat_template", "{{ messages }}"),
    ("chat", "reasoning_effort", "high"),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "service_tier", "flex"),
    ("chat", "stream_options", {"include_usage": True, "continuous_usage_stats": True}),
    ("chat", "messages", [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]),
]


@pytest.mark.parametrize(("route", "field", "value"), UNSUPPORTED, ids=[f"{r}-{f}-{v}"[:60] for r, f, v in UNSUPPORTED])
def test_unsupported_fields_are_refused_by_name(server: str, route: str, field: str, value: Any) -> None:
    """The official client's request with one unhonoured field: 400 naming it (never a silent 200), then a good one."""
    import openai

    client = _client(server)
    kw: dict[str, Any] = {"model": "tiny-deepseek-v3", "max_tokens": 2, "extra_body": {field: value}}
    with pytest.raises(openai.BadRequestError) as info:
        if route == "chat":
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
        else:
            client.completions.create(prompt="hi", **kw)
    err = info.value.body
    assert isinstance(err, dict) and err["message"], err
    expected = {"stream_options": "stream_options.continuous_usage_stats", "messages": "messages.0.function_call"}
    assert err["param"] == expected.get(field, field), err
    # the defaults and the neutral values ask for nothing: served
    ok = client.completions.create(
        model="tiny-deepseek-v3", prompt="hi", max_tokens=2, n=1, best_of=1,
        extra_body={"response_format": {"type": "text"}, "ignore_eos": True},
    )
    assert len(ok.choices) == 1 and ok.usage.completion_tokens == 2


@pytest.mark.parametrize("app", ["disaggregated", "unified"])
def test_logits_processing_through_the_openai_client(app_urls: dict[str, dict[str, str]], app: str) -> None:
    """logit_bias, the penalties and min_tokens reach the prefill and the decode side alike."""
    import openai

    client = _client(app_urls["direct"][app])
    prompt = "The capital of France is"

    def ids(**kw: Any) -> list[int]:
        extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
        out = client.completions.create(
            model="tiny-deepseek-v3", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra, **kw
        )
        return out.choices[0].model_extra["token_ids"]

    assert ids(logit_bias={"42": 100}) == [42] * 12
    base = ids()
    assert len(set(base)) < len(base)  # greedy loops on the tiny model...
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 100.0}}):
        got = ids(**kw)
        assert got != base and len(set(got)) == len(got), (kw, got)  # ...and stops with a penalty
    # min_tokens holds EOS back: with EOS forced, exactly min_tokens + 1 tokens, the last EOS
    out = client.completions.create(
        model="tiny-deepseek-v3", prompt=prompt, max_tokens=12, temperature=0, logit_bias={"1": 100},
        extra_body={"min_tokens": 5, "return_token_ids": True},
    )
    assert out.choices[0].finish_reason == "stop" and len(out.choices[0].model_extra["token_ids"]) == 6
    for bad in ({"logit_bias": {"99999": 1}}, {"logit_bias": {"x": 1}}, {"logit_bias": {"3": 101}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny-deepseek-v3", prompt=prompt, max_tokens=2, **bad)
        assert info.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-deepseek-v3", prompt=prompt, max_tokens=2, extra_body={"min_tokens": 3})
    assert info.value.body["param"] == "min_tokens"


@pytest.fixture(scope="module")
def logprob_reference() -> dict[str, Any]:
    """The single-process engine's own greedy tokens, logprobs and top-3 alternatives for one prompt."""
    from raymoe import LLM, SamplingParams
    from raymoe.model.tiny import default_checkpoint

    with LLM(model=default_checkpoint(), max_model_len=512, kv_cache_tokens=1024) as llm:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
        out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0]
        tok = llm.engine.tokenizer
        chat_prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        chat = llm.generate([tok.encode(chat_prompt)], params, use_tqdm=False)[0]
        def decode(t: int) -> str:  # a piece of a UTF-8 character is spelled token_id:N
            text = tok.decode([t])
            return f"token_id:{t}" if "\ufffd" in text else text

        return {"completion": out, "chat": chat, "decode": decode}


@pytest.mark.parametrize("app", ["disaggregated", "unified"])
def test_logprobs_equal_the_engines_through_the_openai_client(
    app_urls: dict[str, dict[str, str]], app: str, logprob_reference: dict[str, Any]
) -> None:
    """completions `logprobs: 3` and chat `logprobs` + `top_logprobs: 3`, plain and streamed."""
    client = _client(app_urls["direct"][app])
    ref, decode = logprob_reference["completion"], logprob_reference["decode"]
    kw: dict[str, Any] = {"model": "tiny-deepseek-v3", "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    got = client.completions.create(prompt="The capital of France is", logprobs=3, **kw).choices[0]
    lp = got.logprobs
    assert lp.tokens == [decode(t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    for alts, top in zip(lp.top_logprobs, ref.top_logprobs, strict=True):
        assert list(alts) == [decode(t) for t in top.token_ids]
        assert list(alts.values()) == pytest.approx(top.logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert got.text == ref.text
    streamed = list(client.completions.create(prompt="The capital of France is", logprobs=3, stream=True, **kw))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    # chat: logprobs.content, top_logprobs per token
    chat_ref = logprob_reference["chat"]
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=3, **kw).choices[0]
    content = chat.logprobs.content
    assert [c.token for c in content] == [decode(t) for t in chat_ref.token_ids]
    assert [c.logprob for c in content] == pytest.approx(chat_ref.logprobs, abs=1e-4)
    assert [[a.logprob for a in c.top_logprobs] for c in content] == [
        pytest.approx(t.logprobs, abs=1e-4) for t in chat_ref.top_logprobs
    ]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed_chat = list(client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=3, stream=True, **kw))
    tokens = [t.token for c in streamed_chat if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    # logprobs without alternatives, and top_logprobs without logprobs (OpenAI's 400)
    plain = client.chat.completions.create(messages=msgs, logprobs=True, **kw).choices[0]
    assert all(c.top_logprobs == [] for c in plain.logprobs.content)
    assert client.completions.create(prompt="hi", **kw).choices[0].logprobs is None
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=msgs, top_logprobs=2, **kw)
    assert info.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("app", ["disaggregated", "unified"])
def test_n_samples_and_batched_prompts_through_the_openai_client(app_urls: dict[str, dict[str, str]], app: str) -> None:
    """n seeded samples: distinct, reproducible, the later ones prefilled from the prefix cache; a batch
    of prompts: one choice per prompt x n in OpenAI's order; usage counts every completion."""
    import random

    base = app_urls["direct"][app]
    client = _client(base)
    role = "prefill" if app == "disaggregated" else "llm"
    model = "tiny-deepseek-v3"
    prompt = [random.randrange(1, 900) for _ in range(49)]  # 3 full blocks of 16, fresh to the prefix cache
    hits = _stats(base)[role]["prefix_cache_hit_tokens"]
    kw: dict[str, Any] = {"model": model, "max_tokens": 8, "temperature": 1.0, "seed": 11,
                          "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    out = client.completions.create(prompt=prompt, n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    ids = [c.model_extra["token_ids"] for c in out.choices]
    assert len({tuple(t) for t in ids}) == 3  # distinct samples
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == 49
    assert _stats(base)[role]["prefix_cache_hit_tokens"] - hits >= 2 * 48  # samples 1, 2 reuse sample 0's KV
    again = client.completions.create(prompt=prompt, n=3, **kw)
    assert [c.model_extra["token_ids"] for c in again.choices] == ids  # reproducible
    # sample i is seeded seed + i: sample 1 of seed 11 is sample 0 of seed 12
    one = client.completions.create(prompt=prompt, **{**kw, "seed": 12})
    assert one.choices[0].model_extra["token_ids"] == ids[1]
    streamed: dict[int, list[int]] = {}
    usage = None
    for chunk in client.completions.create(prompt=prompt, n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.model_extra["token_ids"])
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == ids and usage is not None and usage.completion_tokens == 24

    # a batch: 3 prompts x n=2, greedy: choice i*n + j is prompt i's
    texts = ["The capital of France is", "Mixture of experts", "1, 2, 3,"]
    greedy = {"model": model, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    single = [client.completions.create(prompt=t, **greedy).choices[0].text for t in texts]
    batch = client.completions.create(prompt=texts, n=2, **greedy)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [t for t in single for _ in range(2)]
    assert batch.usage.completion_tokens == 30
    assert batch.usage.prompt_tokens == sum(
        client.completions.create(prompt=t, **greedy).usage.prompt_tokens for t in texts
    )
    tokens = client.completions.create(prompt=[[0, 306, 820], [0, 838]], **greedy)
    assert len(tokens.choices) == 2 and tokens.usage.prompt_tokens == 5
    stream_texts: dict[int, str] = {}
    for chunk in client.completions.create(prompt=texts, stream=True, **greedy):
        for c in chunk.choices:
            stream_texts[c.index] = stream_texts.get(c.index, "") + c.text
    assert [stream_texts[i] for i in range(3)] == single

    # chat: n seeded samples, plain and streamed
    msgs = [{"role": "user", "content": "Tell me a story"}]
    ckw: dict[str, Any] = {"model": model, "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2,
                           "extra_body": {"ignore_eos": True}}
    chat = client.chat.completions.create(messages=msgs, **ckw)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 12
    assert chat.choices[0].message.content != chat.choices[1].message.content
    parts: dict[int, str] = {}
    for chunk in client.chat.completions.create(messages=msgs, stream=True, **ckw):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert [parts[0], parts[1]] == [c.message.content for c in chat.choices]


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
    card = models["data"][0]
    assert card["id"] == "tiny-deepseek-v3" and card["max_model_len"] == 2048 and card["parent"] is None
    assert Path(card["root"]).name == "tiny-deepseek-v3" and card["object"] == "model"
    (perm,) = card["permission"]
    assert perm["object"] == "model_permission" and perm["allow_sampling"] and perm["allow_logprobs"]
    assert _client(server).models.list().data[0].id == "tiny-deepseek-v3"  # the official client reads it
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
