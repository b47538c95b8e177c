"""Engine behaviour on the tiny checkpoint: batching, chunking, prefix cache, KV accounting, limits,
sampling, stop conditions, the step API and the prefill -> decode KV handoff."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe import LLM, SamplingParams
from raymoe.engine.config import EngineConfig
from raymoe.engine.llm_engine import LLMEngine
from raymoe.model.tiny import make_tiny

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DeepSeek-V3-shaped checkpoint with a tokenizer (group-limited routing, MLA, YaRN)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-engine"), seed=3, progress=False, num_hidden_layers=3)


def prompts_of(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of([3, 17, 40, 9, 1, 33])


def generate(
    llm: LLM, prompts: list[list[int]] | list[str], params: SamplingParams = GREEDY
) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_all_free(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st.kv_blocks_used == 0 and st.kv_blocks_free == st.kv_blocks_total
    assert st.running == 0 and st.waiting == 0 and not llm.engine.requests


@pytest.fixture(scope="module")
def one_by_one(tiny: Path) -> list[list[int]]:
    llm = LLM(tiny, block_size=8)
    return [generate(llm, [p])[0] for p in PROMPTS]


def test_batching_gives_the_same_tokens_as_one_by_one(tiny: Path, one_by_one: list[list[int]]) -> None:
    llm = LLM(tiny, block_size=8)
    assert generate(llm, PROMPTS) == one_by_one
    assert all(len(t) == GREEDY.max_tokens for t in one_by_one)
    assert len({tuple(t) for t in one_by_one}) > 1
    assert_all_free(llm)


def test_continuous_batching_joins_running_decodes(tiny: Path, one_by_one: list[list[int]]) -> None:
    """Requests added while others decode join the running batch and still get their own tokens."""
    engine = LLM(tiny, block_size=8).engine
    got: dict[str, list[int]] = {}
    engine.add_request("a", PROMPTS[0], GREEDY)
    for _ in range(3):
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    engine.add_request("b", PROMPTS[1], GREEDY)
    mixed = False
    while engine.has_unfinished_requests():
        st = engine.stats()
        mixed |= st.running == 2
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert mixed
    assert got == {"a": one_by_one[0], "b": one_by_one[1]}


def test_chunked_prefill_gives_the_same_tokens(tiny: Path, one_by_one: list[list[int]]) -> None:
    llm = LLM(tiny, block_size=8, max_num_batched_tokens=7)  # prompts of 17-40 tokens take several steps
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        batch_tokens = sum(min(s.num_pending_tokens, 7) for s in engine.schedulers[0].running)
        assert batch_tokens <= 7 + len(engine.schedulers[0].running)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    assert [got[str(i)] for i in range(len(PROMPTS))] == one_by_one
    assert steps > sum(map(len, PROMPTS)) // 7  # the budget really split the prompts
    assert_all_free(llm)


def test_prefix_cache_hit_gives_the_same_tokens(tiny: Path) -> None:
    shared = prompts_of([37])[0]
    first, second = shared + [11, 12], shared + [40, 41, 42]
    cold = LLM(tiny, block_size=8, enable_prefix_caching=False)
    expected = generate(cold, [first, second])
    llm = LLM(tiny, block_size=8)
    assert generate(llm, [first]) == expected[:1]
    assert llm.engine.stats().prefix_cache_hit_tokens == 0
    assert generate(llm, [second]) == expected[1:]
    assert llm.engine.stats().prefix_cache_hit_tokens == 32  # 4 full blocks of the shared 37 tokens
    # an identical 40-token prompt: its 5th block is cached too, but holds the last token, which is recomputed
    assert generate(llm, [second]) == expected[1:]
    assert llm.engine.stats().prefix_cache_hit_tokens == 32 + 32
    assert_all_free(llm)


def test_kv_blocks_free_after_abort(tiny: Path) -> None:
    llm = LLM(tiny, block_size=8)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    assert engine.abort_request("r2") and not engine.abort_request("r2")
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests()
    assert_all_free(llm)


def test_full_cache_makes_requests_wait_not_fail(tiny: Path, one_by_one: list[list[int]]) -> None:
    """A cache that holds ~2 requests at a time: the rest wait (or are preempted) and finish alike."""
    llm = LLM(tiny, block_size=8, kv_cache_tokens=120)
    engine = llm.engine
    assert engine.stats().kv_blocks_total == 15
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    queued = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        st = engine.stats()
        queued = max(queued, st.waiting)
        assert st.kv_blocks_used <= 15
    assert queued > 0  # some requests had to wait for blocks
    assert [got[str(i)] for i in range(len(PROMPTS))] == one_by_one
    assert_all_free(llm)


def test_request_larger_than_the_cache_is_a_clear_error(tiny: Path) -> None:
    llm = LLM(tiny, block_size=8, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        llm.generate(PROMPTS[2], SamplingParams(max_tokens=30), use_tqdm=False)
    assert_all_free(llm)


def test_too_long_prompt_is_rejected(tiny: Path) -> None:
    llm = LLM(tiny, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)
    # a prompt that fits stops at max_model_len
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(PROMPTS[1]) + len(out.token_ids) == 32 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        llm.generate([[1, 10**6]], GREEDY, use_tqdm=False)
    assert_all_free(llm)


def test_seeded_sampling_is_reproducible(tiny: Path) -> None:
    llm = LLM(tiny, block_size=8)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = generate(llm, [PROMPTS[1]], p)[0]
    others = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)
    batched = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [others, p, others], use_tqdm=False)
    assert batched[1].token_ids == alone
    other_seed = generate(llm, [PROMPTS[1]], SamplingParams(max_tokens=12, seed=99, ignore_eos=True))[0]
    assert other_seed != alone
    # top_k=1 is greedy whatever the temperature
    greedy = generate(llm, [PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert (
        generate(llm, [PROMPTS[1]], SamplingParams(max_tokens=12, top_k=1, seed=5, ignore_eos=True))[0]
        == greedy
    )


def test_stop_strings_and_stop_token_ids(tiny: Path) -> None:
    llm = LLM(tiny, block_size=8)
    prompt = "The quick brown fox"
    base = llm.generate(
        prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    assert base.text is not None and base.text == llm.tokenizer.decode(base.token_ids)
    # stop token id: kept as the last token
    stop_id = base.token_ids[5]
    out = llm.generate(
        prompt, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_id]), use_tqdm=False
    )
    assert out[0].token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert out[0].finish_reason == "stop"
    # stop string: the text ends before it, generation stops at the token that completed it
    text = base.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    assert needle and needle in text
    out = llm.generate(
        prompt, SamplingParams(max_tokens=16, temperature=0, stop=[needle, "\x00never"]), use_tqdm=False
    )
    assert out[0].finish_reason == "stop" and out[0].text == text[: text.index(needle)]
    assert len(out[0].token_ids) < len(base.token_ids)
    assert out[0].token_ids == base.token_ids[: len(out[0].token_ids)]
    assert_all_free(llm)


def test_step_api_reports_incremental_outputs(tiny: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny), block_size=8))
    assert engine.tokenizer is not None
    n = engine.add_request(
        "x", "Hello there", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True)
    )
    assert n == len(engine.tokenizer.encode("Hello there"))
    with pytest.raises(ValueError, match="already exists"):
        engine.add_request("x", "again")
    seen: list[int] = []
    finals = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "x" and out.prompt_len == n
            assert out.new_logprobs is not None and len(out.new_logprobs) == len(out.new_token_ids)
            assert all(lp <= 0 for lp in out.new_logprobs)
            seen.extend(out.new_token_ids)
            if out.finished:
                finals.append(out)
    assert len(seen) == 5 and len(finals) == 1
    assert finals[0].finish_reason == "length" and finals[0].text == engine.tokenizer.decode(seen)
    st = engine.stats()
    assert st.generation_tokens == 5 and st.prompt_tokens == n and st.kv_blocks_used == 0


@pytest.mark.parametrize("seed", [None, 17])
def test_kv_handoff_round_trip(tiny: Path, seed: int | None) -> None:
    """prefill_only + export_kv on one engine, add_request_with_kv on another (other block size) = one engine."""
    temp = 0.0 if seed is None else 1.0
    params = SamplingParams(max_tokens=9, temperature=temp, seed=seed, ignore_eos=True, logprobs=True)
    prompts = [PROMPTS[2], PROMPTS[1]]
    whole = LLM(tiny, block_size=8).generate(prompts, params, use_tqdm=False)
    prefill = LLMEngine(EngineConfig(model=str(tiny), block_size=8))
    decode = LLMEngine(EngineConfig(model=str(tiny), block_size=16, enable_prefix_caching=False))
    firsts: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, params, prefill_only=True)
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            firsts.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason == "prefill"
    assert prefill.stats().kv_blocks_used > 0  # kept for export
    got: dict[str, list[int]] = {}
    lps: dict[str, list[float]] = {}
    for i in range(len(prompts)):
        handoff = prefill.export_kv(f"r{i}")
        assert handoff.kv.shape == (3, len(prompts[i]), 80) and handoff.prompt_token_ids == prompts[i]
        assert handoff.first_token_id == firsts[f"r{i}"][0] and len(firsts[f"r{i}"]) == 1
        got[f"r{i}"] = [handoff.first_token_id]
        lps[f"r{i}"] = [handoff.first_logprob]  # type: ignore[list-item]
        decode.add_request_with_kv(f"r{i}", handoff, params)
    assert prefill.stats().kv_blocks_used == 0
    with pytest.raises(ValueError, match="unknown"):
        prefill.export_kv("r0")
    while decode.has_unfinished_requests():
        for out in decode.step():
            got[out.request_id].extend(out.new_token_ids)
            lps[out.request_id].extend(out.new_logprobs or [])
    assert decode.stats().prompt_tokens == 0  # the decode side never recomputed a prompt
    for i, w in enumerate(whole):
        assert got[f"r{i}"] == w.token_ids
        torch.testing.assert_close(torch.tensor(lps[f"r{i}"]), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
    assert decode.stats().kv_blocks_used == 0


def test_handoff_whose_first_token_ends_the_request(tiny: Path) -> None:
    prefill = LLMEngine(EngineConfig(model=str(tiny), block_size=8))
    decode = LLMEngine(EngineConfig(model=str(tiny), block_size=8))
    params = SamplingParams(max_tokens=1, temperature=0)
    prefill.add_request("a", PROMPTS[1], params, prefill_only=True)
    (out,) = prefill.step()
    assert out.finished and out.finish_reason == "length"
    decode.add_request_with_kv("a", prefill.export_kv("a"), params)
    (done,) = decode.step()
    assert done.finished and done.finish_reason == "length" and done.new_token_ids == []
    assert not decode.has_unfinished_requests() and decode.stats().kv_blocks_used == 0


def test_text_prompt_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    path = make_tiny(tmp_path, tokenizer=False, progress=False, num_hidden_layers=3, vocab_size=300)
    llm = LLM(path)
    assert llm.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer.json; pass token ids"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([[5, 6, 7]], SamplingParams(stop=["x"]), use_tqdm=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.text is None and len(out.token_ids) == 3


def test_cli_generate(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from raymoe.cli import main

    rc = main(
        ["generate", "--model", str(tiny), "--prompt", "Hello", "--prompt", "The fox", "--max-tokens", "4"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    assert lines[0].startswith("raymoe: generating 2 completion(s)")
    assert lines[1].startswith("'Hello' -> ") and lines[2].startswith("'The fox' -> ")


def test_data_parallel_ranks_balance_and_match_one_rank(tiny: Path, one_by_one: list[list[int]]) -> None:
    """Two attention DP ranks (a cache each): requests spread over both, same tokens as one rank."""
    llm = LLM(tiny, block_size=8, data_parallel_size=2, kv_cache_tokens=256)
    engine = llm.engine
    assert engine.dp_size == 2 and engine.stats().kv_blocks_total == 64
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    assert sorted({s.dp_rank for s in engine.requests.values()}) == [0, 1]
    got: dict[str, list[int]] = {}
    both_busy = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        both_busy |= min(engine.stats().running_per_rank) > 0
    assert both_busy
    assert [got[str(i)] for i in range(len(PROMPTS))] == one_by_one
    assert_all_free(llm)
    # the KV handoff reads from and writes to the request's own rank
    engine.add_request("p", PROMPTS[2], GREEDY, prefill_only=True)
    engine.add_request("q", PROMPTS[3], GREEDY, prefill_only=True)
    while engine.has_unfinished_requests():
        engine.step()
    ranks = {engine.requests[r].dp_rank for r in ("p", "q")}
    handoffs = [engine.export_kv(r) for r in ("p", "q")]
    single = LLM(tiny, block_size=8).engine
    for h, rid in zip(handoffs, ("p", "q"), strict=True):
        single.add_request_with_kv(rid, h, GREEDY)
    got = {"p": [handoffs[0].first_token_id], "q": [handoffs[1].first_token_id]}
    while single.has_unfinished_requests():
        for out in single.step():
            got[out.request_id].extend(out.new_token_ids)
    assert ranks == {0, 1} and got == {"p": one_by_one[2], "q": one_by_one[3]}


def test_preempted_requests_resume_with_the_same_tokens(tiny: Path) -> None:
    """Two requests that together outgrow the cache: the later one is preempted, recomputed, and unchanged."""
    prompts = prompts_of([20, 21])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = generate(LLM(tiny, block_size=8), prompts, params)
    llm = LLM(tiny, block_size=8, kv_cache_tokens=96)  # 12 blocks; each request grows to 8
    assert generate(llm, prompts, params) == expected
    st = llm.engine.stats()
    assert st.num_preemptions > 0 and st.prefix_cache_hit_tokens > 0  # it came back through the prefix cache
    assert_all_free(llm)


def test_bfloat16_engine_runs(tiny: Path) -> None:
    llm = LLM(tiny, dtype="bfloat16", block_size=8)
    assert llm.engine.executor.kv_cache.dtype == torch.bfloat16  # type: ignore[attr-defined]
    outs = llm.generate(
        PROMPTS[:3], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True), use_tqdm=False
    )
    assert all(len(o.token_ids) == 5 and o.logprobs is not None and len(o.logprobs) == 5 for o in outs)
    assert_all_free(llm)


def test_chat_renders_the_template(tiny: Path) -> None:
    llm = LLM(tiny, block_size=8)
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    (out,) = llm.chat(messages, params, use_tqdm=False)
    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("<｜Assistant｜>")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered)
    assert out.token_ids == generate(llm, [out.prompt_token_ids], params)[0]
    assert len(llm.chat([messages, messages], params, use_tqdm=False)) == 2


def test_parallel_config_builds_the_executor_through_the_runtime(
    tiny: Path, one_by_one: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM(parallel=...) hands executor construction to raymoe.parallel.executor.ExpertParallelExecutor."""
    import sys
    import types

    from raymoe.engine.model_runner import DataParallelRunner
    from raymoe.model.weights import load_checkpoint
    from raymoe.parallel.config import ParallelConfig

    seen: list[tuple[EngineConfig, ParallelConfig]] = []

    def expert_parallel_executor(config: EngineConfig, parallel: ParallelConfig) -> DataParallelRunner:
        seen.append((config, parallel))
        model = load_checkpoint(config.model, dtype=config.dtype, progress=False)
        return DataParallelRunner(model, dp_size=3, num_kv_blocks=40, block_size=config.block_size)

    fake = types.ModuleType("raymoe.parallel.executor")
    fake.ExpertParallelExecutor = expert_parallel_executor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "raymoe.parallel.executor", fake)
    spec = {"nodes": 3}
    llm = LLM(tiny, block_size=8, parallel=spec)
    assert len(seen) == 1 and seen[0][1] == ParallelConfig(nodes=3) and seen[0][0].block_size == 8
    assert llm.engine.dp_size == 3 and llm.engine.stats().kv_blocks_total == 120
    assert generate(llm, PROMPTS) == one_by_one
    assert_all_free(llm)


def test_kv_cache_sizing_shares_free_gpu_memory(tiny, monkeypatch) -> None:
    """On CUDA the caches get what gpu_memory_utilization leaves free, split over the in-process DP ranks."""
    from raymoe.engine.config import kv_cache_tokens
    from raymoe.model.config import ModelConfig

    mc = ModelConfig.from_checkpoint(tiny)
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * gib, 10 * gib))
    cfg = EngineConfig(model=str(tiny), gpu_memory_utilization=0.8)
    per_token = mc.num_hidden_layers * mc.kv_cache_dim * 4  # float32
    cuda = torch.device("cuda")
    assert kv_cache_tokens(cfg, mc, cuda) == int(4 * gib // per_token)  # 6 free - 2 kept back
    assert kv_cache_tokens(cfg, mc, cuda, caches=4) == int(gib // per_token)
    assert kv_cache_tokens(cfg.model_copy(update={"kv_cache_tokens": 99}), mc, cuda, caches=4) == 99
    assert kv_cache_tokens(cfg, mc, torch.device("cpu")) == 32768
