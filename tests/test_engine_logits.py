"""Logits processing in the single-process engine: logit_bias, penalties and min_tokens as vLLM defines them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from raymoe import LLM, SamplingParams
from raymoe.model.tiny import default_checkpoint

PROMPTS = ["The capital of France is", "Hello"]


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=1024) as engine:
        yield engine


def _greedy(llm: LLM, prompts: list[str] = PROMPTS, **kw: object) -> list[list[int]]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_logit_bias_forces_and_bans_tokens(llm: LLM) -> None:
    assert _greedy(llm, logit_bias={42: 100}) == [[42] * 24] * 2
    base = _greedy(llm)
    banned = _greedy(llm, logit_bias={base[0][0]: -100})
    assert banned[0][0] != base[0][0]
    # sampled rows too, whatever the temperature
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, seed=3, logit_bias={7: 100}), use_tqdm=False)
    assert all(o.token_ids == [7] * 8 for o in out)


def test_penalties_stop_the_repetition_of_greedy_decoding(llm: LLM) -> None:
    base = _greedy(llm)
    assert any(len(set(t)) < len(t) for t in base)  # the tiny model loops without penalties
    prompt_ids = [llm.engine.tokenizer.encode(p) for p in PROMPTS]
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 100.0}):
        got = _greedy(llm, **kw)
        assert all(len(set(t)) == len(t) for t in got), (kw, got)  # no token generated twice
        assert got != base
    # repetition also counts the prompt; presence and frequency only the output
    for ids, toks in zip(prompt_ids, _greedy(llm, repetition_penalty=100.0), strict=True):
        assert not set(ids) & set(toks)
    # a penalty below 0 rewards repetition
    assert sum(len(set(t)) for t in _greedy(llm, presence_penalty=-2.0)) <= sum(len(set(t)) for t in base)


def test_min_tokens_suppresses_eos_before_n(llm: LLM) -> None:
    eos = min(llm.engine.output.eos_token_ids)
    params = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100})
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.token_ids) == 1 and o.finish_reason == "stop" for o in out)  # EOS at once
    params = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100}, min_tokens=4)
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.token_ids) == 5 and eos not in o.token_ids[:4] and o.finish_reason == "stop" for o in out)
    # stop_token_ids are held back too
    params = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={9: 100}, stop_token_ids=[9], min_tokens=2)
    assert all(len(o.token_ids) == 3 for o in llm.generate(PROMPTS, params, use_tqdm=False))


def test_a_bias_outside_the_vocabulary_is_refused_at_admission(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias token ids"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(logit_bias={vocab: 1.0}))


def test_top_logprobs_cross_the_prefill_decode_handoff(llm: LLM) -> None:
    """The first token's alternatives come from the prefill engine, the rest from decode: the same as one engine."""
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=4)
    (ref,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    engine = llm.engine
    engine.add_request("p", PROMPTS[0], params, prefill_only=True)
    while engine.has_unfinished_requests():
        engine.step()
    handoff = engine.export_kv("p")
    assert handoff.first_top_logprobs == ref.top_logprobs[0]
    engine.add_request_with_kv("d", handoff, params)
    tops = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tops.extend(out.new_top_logprobs or [])
    assert [handoff.first_top_logprobs, *tops] == ref.top_logprobs
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=2)
