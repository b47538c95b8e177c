"""The engine against transformers' DeepseekV3ForCausalLM.generate on save_pretrained checkpoints.

Several prompts of different lengths go through raymoe's engine together (continuous batching,
paged cache with small blocks, absorbed decode) and through transformers' left-padded batched
greedy generate; tokens must be identical and per-token log-probabilities within 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raymoe import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

from hf_reference import COMMON, CONFIGS, save_random_reference  # noqa: E402

HF_CONFIG = dict(COMMON, pad_token_id=0, eos_token_id=1)
PROMPTS = [[5, 17, 99, 3, 42, 8, 77], list(range(2, 22)), [64, 100], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 31, 7]]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    path = tmp_path_factory.mktemp(f"engine-hf-{request.param}")
    hf = save_random_reference({**HF_CONFIG, **CONFIGS[request.param]}, path)
    return hf, path


def hf_generate(hf: Any, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Left-padded batched greedy generate: tokens and the log-probability of each."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[:, width:]
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)
    chosen = logprobs.gather(2, tokens.unsqueeze(2)).squeeze(2)
    return tokens.tolist(), chosen.tolist()


def test_greedy_batch_matches_transformers_generate(reference: tuple[Any, Path]) -> None:
    hf, path = reference
    ref_tokens, ref_logprobs = hf_generate(hf, PROMPTS, NEW_TOKENS)
    llm = LLM(path, block_size=4)  # prompts and outputs span several blocks
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.stats().generation_tokens == NEW_TOKENS * len(PROMPTS)
    for out, tokens, logprobs in zip(outs, ref_tokens, ref_logprobs, strict=True):
        assert out.token_ids == tokens
        assert out.text is None  # save_pretrained wrote no tokenizer
        assert out.finish_reason == "length"
        assert out.logprobs is not None and len(out.logprobs) == NEW_TOKENS
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
    assert len({tuple(t) for t in ref_tokens}) == len(PROMPTS)  # not a degenerate model


def test_stop_token_matches_transformers_eos(reference: tuple[Any, Path]) -> None:
    """A stop token id ends the output where transformers' generate stops on it as eos_token_id."""
    hf, path = reference
    ref_tokens, _ = hf_generate(hf, PROMPTS[:1], 6)
    stop = ref_tokens[0][3]
    first = ref_tokens[0].index(stop)
    with torch.no_grad():
        hf_out = hf.generate(
            input_ids=torch.tensor(PROMPTS[:1]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=0,
        )[0, len(PROMPTS[0]) :].tolist()
    assert hf_out == ref_tokens[0][: first + 1]
    llm = LLM(path, block_size=4)
    out = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop]), use_tqdm=False
    )
    assert out[0].token_ids == hf_out and out[0].finish_reason == "stop"
