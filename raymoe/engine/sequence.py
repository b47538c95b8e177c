"""One request's tokens, progress and cache blocks as the scheduler sees them."""

from __future__ import annotations

import enum

import torch

from raymoe.engine.executor import PromptLogprobs, TopLogprobs
from raymoe.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + generated tokens; `num_computed_tokens` of them are in the KV cache.

    Each step computes the next `len(token_ids) - num_computed_tokens` tokens (a prefill chunk or
    one decode token); a preempted sequence drops its blocks and recomputes everything it has, so
    prompt and generated tokens are handled alike.
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "params",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "num_hashed_blocks",
        "block_hashes",
        "logprobs",
        "top_logprobs",
        "finish_reason",
        "dp_rank",
        "prefill_only",
        "arrival",
        "output_text",
        "num_emitted",
        "max_total",
        "pending_kv",
        "stop_string_hit",
        "prompt_logprobs",
        "bad_word_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival: int,
        max_model_len: int,
        prefill_only: bool = False,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.block_hashes: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs | None] = []  # per generated token, with params.top_logprobs
        self.finish_reason: str | None = None
        self.dp_rank = 0
        self.prefill_only = prefill_only
        self.arrival = arrival
        self.output_text: str | None = None
        self.num_emitted = 0  # generated tokens already reported by step()
        # the sequence never grows past this many tokens (prompt + max_tokens, capped by max_model_len)
        self.max_total = min(self.num_prompt_tokens + params.max_tokens, max_model_len)
        self.pending_kv: torch.Tensor | None = None  # handed-off prompt KV, written on admission
        self.stop_string_hit = False
        # prompt positions computed so far (params.prompt_logprobs), reported with the first token
        self.prompt_logprobs: PromptLogprobs | None = (
            PromptLogprobs([], [], [] if params.prompt_logprobs else None) if params.prompt_logprobs is not None else None
        )
        self.bad_word_ids: list[list[int]] | None = None  # params.bad_words tokenized (the engine, at admission)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the cache (the whole prompt before the first step, 1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self.token_ids)}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
