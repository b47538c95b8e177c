"""Request isolation in the engine: what belongs to one request fails that request alone.

A sampling failure injected for one row, an output-processing failure of one request and
parameters made unrepresentable after construction each end (or refuse) only that request; the
others finish with the tokens they get without it, and the engine keeps serving.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from raymoe.engine import sampler as sampler_module
from raymoe.engine.config import EngineConfig
from raymoe.engine.llm_engine import LLMEngine
from raymoe.engine.output_processor import OutputProcessor
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.tiny import default_checkpoint

PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 7], [100, 200, 300, 400]]
GOOD = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
POISON_SEED = 666


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(default_checkpoint()), max_model_len=256, kv_cache_tokens=1024))


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    finished: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.error)
    assert engine.stats().kv_blocks_used == 0 and not engine.requests
    return {"tokens": tokens, "finished": finished}


def _good(tag: str) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"{tag}{i}": (p, GOOD) for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def reference(engine: LLMEngine) -> list[list[int]]:
    got = _run(engine, _good("ref"))
    return [got["tokens"][f"ref{i}"] for i in range(len(PROMPTS))]


def test_a_sampling_failure_fails_only_its_request(
    engine: LLMEngine, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sampler_module.row_generator

    def poisoned(seed: int, index: int, device: torch.device) -> torch.Generator:
        if seed == POISON_SEED and index == 2:  # fails at its third token, mid-decode
            raise RuntimeError("injected sampling failure")
        return real(seed, index, device)

    monkeypatch.setattr(sampler_module, "row_generator", poisoned)
    requests = _good("a")
    requests["bad"] = ([1, 2, 3], SamplingParams(max_tokens=8, temperature=1.0, seed=POISON_SEED, ignore_eos=True))
    got = _run(engine, requests)
    assert got["finished"]["bad"] == ("error", "sampling failed: injected sampling failure")
    assert len(got["tokens"]["bad"]) == 2  # its first two tokens went out before it failed
    assert [got["tokens"][f"a{i}"] for i in range(len(PROMPTS))] == reference
    assert {got["finished"][f"a{i}"] for i in range(len(PROMPTS))} == {("length", None)}
    # a batch of the poisoned request alone fails it alone too: the engine serves on
    alone = _run(engine, {"bad2": requests["bad"]})
    assert alone["finished"]["bad2"][0] == "error"
    assert _run(engine, _good("after"))["tokens"]["after0"] == reference[0]


def test_an_output_processing_failure_fails_only_its_request(
    engine: LLMEngine, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = OutputProcessor.append_token

    def poisoned(self: OutputProcessor, seq: Any, token: int, logprob: float | None, top: Any = None) -> bool:
        if seq.request_id == "bad":
            raise UnicodeError("injected stop-check failure")
        return real(self, seq, token, logprob, top)

    monkeypatch.setattr(OutputProcessor, "append_token", poisoned)
    requests = _good("b")
    requests["bad"] = ([9, 9, 9, 9], GOOD)
    got = _run(engine, requests)
    assert got["finished"]["bad"] == ("error", "output processing failed: injected stop-check failure")
    assert [got["tokens"][f"b{i}"] for i in range(len(PROMPTS))] == reference


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", 10**30), ("seed", 2**64), ("temperature", float("inf")), ("top_p", float("nan")),
     ("max_tokens", 2**63), ("stop_token_ids", [2**63])],
)
def test_params_made_unrepresentable_after_construction_are_refused_at_admission(
    engine: LLMEngine, reference: list[list[int]], field: str, value: Any
) -> None:
    """Params that crossed a process boundary were never re-constructed: the engine checks them again."""
    params = SamplingParams(max_tokens=8, temperature=0.5)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=f"^{field} "):
        engine.add_request("bad", [1, 2, 3], params)
    assert "bad" not in engine.requests
    assert _run(engine, _good("c"))["tokens"]["c1"] == reference[1]


def test_a_bad_row_on_one_dp_rank_leaves_the_other_ranks_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two attention DP ranks (the expert-parallel unit's layout, run in one process): the poisoned
    request fails on its rank, every other request on both ranks finishes with its own tokens."""
    engine = LLMEngine(EngineConfig(model=str(default_checkpoint()), max_model_len=256, kv_cache_tokens=1024,
                                    data_parallel_size=2))
    requests = {f"d{i}": (p, GOOD) for i, p in enumerate(PROMPTS * 2)}
    reference = _run(engine, requests)["tokens"]
    real = sampler_module.row_generator

    def poisoned(seed: int, index: int, device: torch.device) -> torch.Generator:
        if seed == POISON_SEED:
            raise RuntimeError("injected")
        return real(seed, index, device)

    monkeypatch.setattr(sampler_module, "row_generator", poisoned)
    requests["bad"] = ([1, 2, 3], SamplingParams(max_tokens=8, temperature=1.0, seed=POISON_SEED))
    got = _run(engine, requests)
    assert engine.requests == {} and got["finished"]["bad"] == ("error", "sampling failed: injected")
    assert {r: got["tokens"][r] for r in reference} == reference
