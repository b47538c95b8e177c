"""Prompt logprobs and echo (issue 12), and vLLM's small sampling fields, from the engine to the OpenAI client.

Engine level: the prompt logprobs equal the log-softmax of the model's own full forward over the
prompt, across chunked prefill, beside other requests, past the prefix cache, on a prefill-only
request and on an expert-parallel unit. HTTP level (one disaggregated app from
deployments/local.yaml, the official `openai` client): echo (plain, streamed, batched, max_tokens
0), vLLM's `prompt_logprobs` shape, and one test per small field (min_p, allowed_token_ids,
bad_words, include_stop_str_in_output, skip_special_tokens, spaces_between_special_tokens,
truncate_prompt_tokens, return_tokens_as_token_ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from raymoe.engine.llm_engine import LLMEngine
from raymoe.engine.outputs import RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.llm import LLM
from raymoe.model.attention import AttentionMetadata
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint

LONG = "The quick brown fox jumps over the lazy dog, and then some more words follow here to make it long"
SHORT = "Hello, my name is"
MODEL = "tiny-deepseek-v3"


def reference_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of one full forward over the prompt (no cache, no chunks)."""
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.contiguous([len(ids)]))
        return model.compute_logits(hidden).log_softmax(dim=-1)


def check_prompt_logprobs(got: Any, ref: torch.Tensor, ids: list[int], top_n: int) -> None:
    """Position i holds token i+1's logprob, its rank (vLLM's: tokens at least as likely) and the top-N."""
    target = ref[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert len(got.logprobs) == len(ids) - 1
    torch.testing.assert_close(torch.tensor(got.logprobs), target, atol=1e-4, rtol=1e-4)
    assert got.ranks == (ref[:-1] >= target.unsqueeze(1) - 1e-6).sum(-1).tolist()
    if top_n == 0:
        assert got.top is None
        return
    values, order = ref[:-1].topk(top_n, dim=-1)
    assert [t.token_ids for t in got.top] == order.tolist()
    torch.testing.assert_close(torch.tensor([t.logprobs for t in got.top]), values, atol=1e-4, rtol=1e-4)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], **kw: Any) -> dict[str, list[RequestOutput]]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params, **kw)
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    # a 16-token step budget: LONG (25 tokens) is prefilled in chunks, beside another request
    with LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=1024, block_size=4,
             max_num_batched_tokens=16) as engine:
        yield engine


def test_prompt_logprobs_equal_the_full_forward_across_chunks(llm: LLM) -> None:
    engine = llm.engine
    long_ids, short_ids = engine.tokenizer.encode(LONG), engine.tokenizer.encode(SHORT)
    assert len(long_ids) > 16  # more than one step's budget: collected over several chunks
    greedy = {"max_tokens": 3, "temperature": 0.0}
    outs = run(engine, {
        "long": (long_ids, SamplingParams(**greedy, prompt_logprobs=5)),
        "short": (short_ids, SamplingParams(**greedy, prompt_logprobs=0)),
        "plain": (long_ids, SamplingParams(**greedy)),
    })
    model = engine.executor.model
    check_prompt_logprobs(outs["long"][0].prompt_logprobs, reference_logprobs(model, long_ids), long_ids, 5)
    check_prompt_logprobs(outs["short"][0].prompt_logprobs, reference_logprobs(model, short_ids), short_ids, 0)
    # reported once, with the request's first output; a request without them gets none
    assert all(o.prompt_logprobs is None for o in outs["long"][1:])
    assert all(o.prompt_logprobs is None for o in outs["plain"])
    # asking for them changes nothing about the generated tokens
    assert [t for o in outs["long"] for t in o.new_token_ids] == [t for o in outs["plain"] for t in o.new_token_ids]


def test_the_offline_facade_returns_them(llm: LLM) -> None:
    """`LLM.generate` hands each prompt's positions to its caller (and none to a request not asking)."""
    asking, plain = llm.generate([SHORT, SHORT], [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3),
                                                  SamplingParams(max_tokens=2, temperature=0.0)], use_tqdm=False)
    ids = llm.tokenizer.encode(SHORT)
    check_prompt_logprobs(asking.prompt_logprobs, reference_logprobs(llm.engine.executor.model, ids), ids, 3)
    assert plain.prompt_logprobs is None


def test_the_prefix_cache_is_not_read_for_prompt_logprobs(llm: LLM) -> None:
    """A cached prompt is recomputed when its prompt logprobs are wanted (vLLM skips the cache too)."""
    engine = llm.engine
    ids = engine.tokenizer.encode(LONG + " again")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    run(engine, {"warm": (ids, SamplingParams(max_tokens=1, temperature=0.0))})
    hits = engine.stats().prefix_cache_hit_tokens
    run(engine, {"cached": (ids, SamplingParams(max_tokens=1, temperature=0.0))})
    assert engine.stats().prefix_cache_hit_tokens > hits  # the prompt is in the cache
    hits = engine.stats().prefix_cache_hit_tokens
    (out,) = run(engine, {"wanted": (ids, params)})["wanted"]
    assert engine.stats().prefix_cache_hit_tokens == hits
    check_prompt_logprobs(out.prompt_logprobs, reference_logprobs(engine.executor.model, ids), ids, 2)


def test_preempted_requests_report_each_position_once() -> None:
    """A cache too small for both: one is preempted and recomputed; its positions are not collected twice."""
    with LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=64, block_size=4,
             max_num_batched_tokens=16) as small:
        engine = small.engine
        prompts = [engine.tokenizer.encode(LONG), engine.tokenizer.encode("Another one: " + LONG)]
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        outs = run(engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompts)})
        assert engine.stats().num_preemptions > 0
        for i, ids in enumerate(prompts):
            check_prompt_logprobs(outs[f"r{i}"][0].prompt_logprobs, reference_logprobs(engine.executor.model, ids), ids, 1)


def test_a_prefill_only_request_reports_them_for_the_handoff(llm: LLM) -> None:
    """The prefill unit's output carries them (the serving layer's PrefillResult takes them to the ingress)."""
    engine = llm.engine
    ids = engine.tokenizer.encode(SHORT)
    (out,) = run(engine, {"p": (ids, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1))},
                 prefill_only=True)["p"]
    assert out.finish_reason == "prefill"
    check_prompt_logprobs(out.prompt_logprobs, reference_logprobs(engine.executor.model, ids), ids, 1)
    engine.export_kv("p")


def test_prompt_logprobs_on_an_expert_parallel_unit(ray_cluster: Any) -> None:
    """TP rank 0 of each DP group computes them from its hidden states: the same values as one process."""
    from raymoe.parallel.config import ParallelConfig

    ref = LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=512, block_size=4)
    model = ref.engine.executor.model
    prompts = [ref.engine.tokenizer.encode(p) for p in (LONG, SHORT)]
    refs = [reference_logprobs(model, ids) for ids in prompts]
    ref.shutdown()
    llm = LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=512, block_size=4,
              max_num_batched_tokens=16, parallel=ParallelConfig(nodes=1, gpus_per_node=2, overlap=True))
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
        outs = run(llm.engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompts)})
    finally:
        llm.shutdown()
    for i, (ids, r) in enumerate(zip(prompts, refs, strict=True)):
        check_prompt_logprobs(outs[f"r{i}"][0].prompt_logprobs, r, ids, 3)


def test_prompt_logprobs_bounds() -> None:
    SamplingParams(prompt_logprobs=20)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]


# --- the small sampling fields, in the engine ------------------------------------------------------
def _tokens(llm: LLM, prompt: str, **kw: Any) -> list[int]:
    params = SamplingParams(max_tokens=12, ignore_eos=True, **kw)
    return llm.generate([prompt], params, use_tqdm=False)[0].token_ids


def test_min_p_one_keeps_only_the_most_likely_token(llm: LLM) -> None:
    greedy = _tokens(llm, SHORT, temperature=0.0)
    sampled = [_tokens(llm, SHORT, temperature=1.5, seed=s) for s in range(3)]
    assert any(t != greedy for t in sampled)  # hot sampling wanders
    assert all(_tokens(llm, SHORT, temperature=1.5, seed=s, min_p=1.0) == greedy for s in range(3))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_allowed_token_ids_mask_every_other_token(llm: LLM) -> None:
    allowed = [5, 17, 300]
    assert set(_tokens(llm, SHORT, temperature=0.0, allowed_token_ids=allowed)) <= set(allowed)
    assert set(_tokens(llm, SHORT, temperature=1.0, seed=1, allowed_token_ids=allowed)) <= set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="allowed_token_ids must be in"):
        llm.engine.add_request("bad", [1, 2], SamplingParams(allowed_token_ids=[vocab]))


def test_bad_words_ban_single_and_multi_token_words(llm: LLM) -> None:
    tok = llm.engine.tokenizer
    greedy = _tokens(llm, SHORT, temperature=0.0)
    # a one-token word: its token never comes
    single = tok.decode([greedy[0]])
    assert greedy[0] not in _tokens(llm, SHORT, temperature=0.0, bad_words=[single])
    # a two-token word: its second token is banned only right after its first
    pair = next(i for i in range(len(greedy) - 1) if len(tok.encode(tok.decode(greedy[i : i + 2]), add_bos=False)) == 2)
    word = tok.decode(greedy[pair : pair + 2])
    ids = tok.encode(word.lstrip(), add_bos=False)
    got = _tokens(llm, SHORT, temperature=0.0, bad_words=[word])
    assert all(got[i : i + len(ids)] != ids for i in range(len(got)))
    assert got[:pair] == greedy[:pair]  # nothing changes before the word would have started
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])


# --- over HTTP, with the official client --------------------------------------------------------------
@pytest.fixture(scope="module")
def apps(serve_http: Any) -> Iterator[dict[str, str]]:
    """The disaggregated app (prompt logprobs cross from prefill to the ingress in PrefillResult) and a
    unified one beside it (they come in the unit's output stream)."""
    from ray import serve

    from raymoe.serve.app import build_app
    from tests.test_serve import _args

    try:
        serve.run(build_app(_args()), name="raymoe-echo", route_prefix="/echo")
        serve.run(build_app(_args(disaggregated=False)), name="raymoe-echo-unified", route_prefix="/echo-unified")
        yield {"disaggregated": f"{serve_http.base}/echo", "unified": f"{serve_http.base}/echo-unified"}
    finally:
        for app in ("raymoe-echo", "raymoe-echo-unified"):
            serve.delete(app)


@pytest.fixture(scope="module")
def server(apps: dict[str, str]) -> str:
    return apps["disaggregated"]


@pytest.fixture(scope="module")
def offline() -> Iterator[LLM]:
    """The single-process engine the served answers are compared with."""
    with LLM(model=default_checkpoint(), max_model_len=2048, kv_cache_tokens=4096) as engine:
        yield engine


def _client(base: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt_lps(offline: LLM, prompt: str, n: int) -> tuple[list[int], Any]:
    engine = offline.engine
    ids = engine.tokenizer.encode(prompt)
    outs = run(engine, {f"ref-{prompt}-{n}": (ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=n))})
    return ids, outs[f"ref-{prompt}-{n}"][0].prompt_logprobs


@pytest.mark.parametrize("app", ["disaggregated", "unified"])
def test_echo_returns_the_prompt_and_its_logprobs(apps: dict[str, str], app: str, offline: LLM) -> None:
    client = _client(apps[app])
    plain = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=5, temperature=0)
    r = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=5, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == SHORT + plain.choices[0].text
    lp = choice.logprobs
    ids, ref = _prompt_lps(offline, SHORT, 2)
    n = len(ids)
    assert len(lp.tokens) == n + 5 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:n] == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert [min(t.values()) for t in lp.top_logprobs[1:n]] == pytest.approx([t.logprobs[1] for t in ref.top], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # vLLM's prompt_logprobs ride along on the choice (echo asks for them)
    body = choice.model_extra["prompt_logprobs"]
    assert body[0] is None and len(body) == n
    # echo without logprobs: the text only; usage counts the prompt once and the generated tokens
    r = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == SHORT + plain.choices[0].text and r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, 5)


def test_echo_streamed_batched_and_alone(server: str) -> None:
    client = _client(server)
    prompts = [SHORT, "Mixture of experts", "1, 2, 3,"]
    plain = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    texts = {c.index: c.text for c in plain.choices}
    # a batch: one choice per prompt, in order, each starting with its own prompt
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, prompts, strict=True):
        assert c.text == p + texts[c.index] and c.logprobs.token_logprobs[0] is None
    # streamed: the first chunk carries the prompt (and its logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt=SHORT, max_tokens=4, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    first = next(c for c in chunks if c.choices)
    assert first.choices[0].text.startswith(SHORT) and first.choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == SHORT + texts[0]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # max_tokens 0 with echo: the prompt alone (vLLM's); without echo it is refused by name
    r = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == SHORT and r.choices[0].logprobs.token_logprobs[0] is None
    assert "".join(r.choices[0].logprobs.tokens) == SHORT
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=SHORT, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("app", ["disaggregated", "unified"])
def test_prompt_logprobs_in_vllm_shape(apps: dict[str, str], app: str, offline: LLM) -> None:
    import openai

    client = _client(apps[app])
    ids, ref = _prompt_lps(offline, SHORT, 3)
    r = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    body = r.choices[0].model_extra["prompt_logprobs"]
    assert body[0] is None and len(body) == len(ids)
    tok = offline.engine.tokenizer
    for i, pos in enumerate(body[1:]):
        mine = pos[str(ids[i + 1])]  # the prompt token itself, with its rank
        assert mine["logprob"] == pytest.approx(ref.logprobs[i], abs=1e-4) and mine["rank"] == ref.ranks[i]
        tops = {int(k): v for k, v in pos.items() if v["rank"] <= 3 and not (int(k) == ids[i + 1] and v["rank"] > 3)}
        assert set(ref.top[i].token_ids) <= set(tops) and len(pos) in (3, 4)
        assert all(v["decoded_token"] == tok.decode([int(k)]) or v["decoded_token"].startswith("token_id:")
                   for k, v in pos.items())
    # chat: once for the conversation (vLLM's top-level field); not with stream
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"prompt_logprobs": 0})
    body = r.model_extra["prompt_logprobs"]
    assert body[0] is None and all(len(p) == 1 for p in body[1:]) and r.usage.prompt_tokens == len(body)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=SHORT, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1})
    assert info.value.body["param"] == "prompt_logprobs"
    # n samples of one prompt: every choice has the prompt's logprobs (computed once)
    r = client.completions.create(model=MODEL, prompt=SHORT, max_tokens=2, n=2, seed=1,
                                  extra_body={"prompt_logprobs": 1})
    assert r.choices[0].model_extra["prompt_logprobs"] == r.choices[1].model_extra["prompt_logprobs"]


def _complete(server: str, prompt: Any = SHORT, **extra: Any) -> Any:
    """One greedy completion's choice (EOS ignored, token ids returned) with vLLM's fields in `extra`."""
    kw = {k: extra.pop(k) for k in ("temperature", "seed", "stop", "max_tokens", "logprobs") if k in extra}
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    body = {"ignore_eos": True, "return_token_ids": True, **extra}
    return _client(server).completions.create(model=MODEL, prompt=prompt, extra_body=body, **kw).choices[0]


def test_min_p_over_http(server: str) -> None:
    """min_p 1: only the most likely token survives, however hot the temperature."""
    greedy = _complete(server).model_extra["token_ids"]
    assert any(_complete(server, temperature=1.8, seed=s).model_extra["token_ids"] != greedy for s in range(3))
    assert _complete(server, temperature=1.8, seed=3, min_p=1.0).model_extra["token_ids"] == greedy


def test_allowed_token_ids_over_http(server: str) -> None:
    import openai

    assert set(_complete(server, allowed_token_ids=[7, 9]).model_extra["token_ids"]) <= {7, 9}
    for bad in ([10**6], []):
        with pytest.raises(openai.BadRequestError) as info:
            _complete(server, allowed_token_ids=bad)
        assert info.value.body["param"] == "allowed_token_ids"


def test_bad_words_over_http(server: str, offline: LLM) -> None:
    ids = _complete(server).model_extra["token_ids"]
    word = offline.engine.tokenizer.decode([ids[0]])
    assert ids[0] not in _complete(server, bad_words=[word]).model_extra["token_ids"]


def test_include_stop_str_in_output_over_http(server: str) -> None:
    text = _complete(server).text
    stop = text[3:6]
    cut = _complete(server, stop=[stop]).text
    kept = _complete(server, stop=[stop], include_stop_str_in_output=True).text
    assert kept == cut + stop and text.startswith(kept)
    streamed = "".join(c.choices[0].text for c in _client(server).completions.create(
        model=MODEL, prompt=SHORT, max_tokens=8, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True}) if c.choices)
    assert streamed == kept


def test_special_tokens_in_the_text_over_http(server: str) -> None:
    """skip_special_tokens false shows EOS (forced here); spaces_between_special_tokens false changes nothing
    for DeepSeek-V3's byte-level decoder, which never puts a space between special tokens."""
    eos = "<｜end▁of▁sentence｜>"
    forced = {"logit_bias": {"1": 100}, "max_tokens": 2}
    assert _complete(server, **forced).text == ""
    assert _complete(server, **forced, skip_special_tokens=False).text == eos * 2
    assert _complete(server, **forced, skip_special_tokens=False, spaces_between_special_tokens=False).text == eos * 2
    streamed = "".join(c.choices[0].text for c in _client(server).completions.create(
        model=MODEL, prompt=SHORT, max_tokens=2, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "logit_bias": {"1": 100}, "skip_special_tokens": False}) if c.choices)
    assert streamed == eos * 2


def test_truncate_prompt_tokens_over_http(server: str, offline: LLM) -> None:
    import openai

    long_ids = offline.engine.tokenizer.encode(LONG)
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 5})
    same = client.completions.create(model=MODEL, prompt=long_ids[-5:], max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == 5 and r.choices[0].text == same.choices[0].text
    # echo shows the prompt that was kept
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=0, echo=True,
                                  extra_body={"truncate_prompt_tokens": 5})
    assert r.choices[0].text == offline.engine.tokenizer.decode(long_ids[-5:]) and LONG.endswith(r.choices[0].text)
    for bad in (0, 10**6):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=LONG, max_tokens=4, extra_body={"truncate_prompt_tokens": bad})
        assert info.value.body["param"] == "truncate_prompt_tokens"


def test_return_tokens_as_token_ids_over_http(server: str) -> None:
    choice = _complete(server, logprobs=2, return_tokens_as_token_ids=True)
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.model_extra["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice.logprobs.top_logprobs for k in top)


def test_chat_echo_starts_the_reply_with_the_assistants_last_message(server: str) -> None:
    """vLLM's chat echo: with the generation prompt added, the last message is echoed when it is the assistant's."""
    client = _client(server)
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    plain = client.chat.completions.create(model=MODEL, messages=said, max_tokens=4, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=said, max_tokens=4, temperature=0, extra_body={"echo": True})
    assert r.choices[0].message.content == "The answer is" + plain.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=said, max_tokens=4, temperature=0, stream=True,
                                                extra_body={"echo": True})
        if c.choices
    )
    assert streamed == r.choices[0].message.content
    asked = [{"role": "user", "content": "hi"}]  # the user's turn is last: nothing to echo
    r = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=4, temperature=0, extra_body={"echo": True})
    assert r.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=asked, max_tokens=4, temperature=0).choices[0].message.content
