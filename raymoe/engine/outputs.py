"""What the engine hands back: per-step request outputs, the prefill -> decode KV handoff, its counters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.engine.executor import PromptLogprobs, TopLogprobs


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (only requests with news are reported)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    prompt_len: int
    text: str | None = None  # the whole output text, once finished (None without a tokenizer)
    error: str | None = None  # the request failed alone (finish_reason "error"): why, for its client
    new_top_logprobs: list[TopLogprobs | None] | None = None  # per new token, with params.top_logprobs
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs, on the request's first output


@dataclass(slots=True)
class KVHandoff:
    """A prefilled request, ready for a decode unit: latent KV of its prompt and its first token."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    first_logprob: float | None
    kv: torch.Tensor  # [num_layers, prompt_len, kv_lora_rank + qk_rope_head_dim], CPU
    first_top_logprobs: TopLogprobs | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's queues, caches and counters (summed over DP ranks, then per rank)."""

    dp_size: int
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    prompt_tokens: int  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    running_per_rank: list[int]
    kv_blocks_used_per_rank: list[int]
