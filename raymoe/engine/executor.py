"""The engine's device side: what one step sends to the model and what comes back.

`LLMEngine` schedules on the host and hands each step to an `Executor`: one `ModelInput` per
data-parallel attention rank (None for a rank with nothing to run), one `SamplerOutput` back per
rank. The single-process `ModelRunner` is the dp_size=1 executor; the expert-parallel runtime
(`raymoe.parallel.executor.ExpertParallelExecutor`, chosen by `raymoe.executors.build_executor`)
drives a deployment unit whose attention is replicated over several DP ranks, each with its own
paged KV cache. Inputs and outputs are plain dataclasses of CPU tensors and lists so that they
pickle cheaply to Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from raymoe.model.attention import AttentionMetadata


@dataclass(slots=True)
class Penalties:
    """The penalised rows' token history (built only when a row of the step uses a penalty).

    presence/frequency/repetition: [n] float32 per sampled row (0, 0, 1 for a row without).
    output_ids/prompt_ids: [n, L] int64, each row's generated / prompt tokens, padded with `vocab`
    (the sampler counts them into vocab + 1 columns and drops the last); a row without penalties
    holds only padding.
    """

    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    output_ids: torch.Tensor
    prompt_ids: torch.Tensor


@dataclass(slots=True)
class SparseLogits:
    """(row, token id, value) entries of the step's sampled rows, flat: rows/ids [k] int64, values [k] float32."""

    rows: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor


@dataclass
class SamplingMetadata:
    """Per sampled row: how to draw the next token.

    temperatures/top_ps/top_ks: [n] float32/float32/int64 (temperature 0 = greedy, top_k 0 = off).
    seeds: per row an int (draw from a generator seeded by (seed, output_index): reproducible and
    independent of batch composition, preemption and KV handoff) or None (the global generator).
    output_indices: per row, how many tokens the request has generated before this one.
    penalties, logit_bias (added), banned (set to -inf: EOS and stop ids before min_tokens, bad
    words' next tokens), allowed, min_ps: None when no row of the step uses them, so the common
    step pays nothing for them.
    """

    temperatures: torch.Tensor
    top_ps: torch.Tensor
    top_ks: torch.Tensor
    seeds: list[int | None]
    output_indices: list[int]
    all_greedy: bool
    needs_logprobs: bool
    any_top_p: bool
    any_top_k: bool
    penalties: Penalties | None = None
    logit_bias: SparseLogits | None = None
    banned: SparseLogits | None = None
    top_logprobs: list[int] | None = None  # per row, how many alternatives to return; None: no row asks
    allowed: SparseLogits | None = None  # (row, id) of the rows with allowed_token_ids: their other ids are masked
    min_ps: torch.Tensor | None = None  # [n] float32 when a sampled row uses min_p (0: off)
    # [n, ceil(vocab / 32)] int32 packed: bit t of row r set = token t allowed by the row's grammar
    # (-1 for a row without one); None when no row of the step has a grammar (raymoe.engine.structured)
    grammar_bitmask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass(slots=True)
class PromptLogprobsRequest:
    """The rows of a step's flat batch whose next token is a prompt token of a request asking for
    prompt logprobs (built only when one asks, so the common step pays nothing for it).

    indices/targets: [m] int64, the flat-batch row (its hidden state) and the prompt token it predicts.
    counts: per asking sequence of the step (in batch order), how many of the m rows are its.
    top_n: per asking sequence, how many alternatives to return with each position (0: none).
    """

    indices: torch.Tensor
    targets: torch.Tensor
    batch_rows: list[int]  # per asking sequence: its index in the step's batch
    counts: list[int]
    top_n: list[int]


@dataclass(slots=True)
class PromptLogprobs:
    """Prompt positions of one request: per position, the raw-model logprob of the next prompt token,
    its rank in the vocabulary (1 = most likely; vLLM's: tokens with a logprob >= its own), and the
    most likely alternatives when asked."""

    logprobs: list[float]
    ranks: list[int]
    top: list[TopLogprobs] | None

    def extend(self, more: PromptLogprobs) -> None:
        self.logprobs.extend(more.logprobs)
        self.ranks.extend(more.ranks)
        if self.top is not None and more.top is not None:
            self.top.extend(more.top)


@dataclass
class ModelInput:
    """One DP rank's step: a flat variable-length batch against that rank's paged latent cache.

    input_ids/positions: [T]; query_lens/context_lens: per sequence (new tokens this step, tokens in
    the cache after it); block_tables: [S, max_blocks] (padded with 0); slot_mapping: [T] cache slot of
    each new token; sample_indices: [n] rows of the flat batch whose logits are sampled (the last
    token of each sequence whose prompt is complete after this step); sampling: their parameters.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    sample_indices: torch.Tensor
    sampling: SamplingMetadata | None
    prompt_logprobs: PromptLogprobsRequest | None = None  # rows whose prompt logprobs are wanted

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_metadata(self, device: torch.device | str | None = None) -> AttentionMetadata:
        qlens = torch.tensor(self.query_lens, dtype=torch.long)
        qsl = torch.zeros(len(self.query_lens) + 1, dtype=torch.long)
        torch.cumsum(qlens, 0, out=qsl[1:])
        return AttentionMetadata(
            query_start_loc=qsl.to(device, non_blocking=True),
            context_lens=torch.tensor(self.context_lens, dtype=torch.long).to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            query_lens=list(self.query_lens),
            context_lens_list=list(self.context_lens),
        )


@dataclass
class SamplerOutput:
    """Per sampled row of the matching ModelInput: the token and (when asked) its log-probability.

    errors: rows that could not be sampled (row -> why; their token is -1): those requests fail
    alone, the rest of the batch carries on.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    errors: dict[int, str] | None = None
    top: list[TopLogprobs | None] | None = None  # per row, when a row asked for top_logprobs
    prompt_logprobs: list[PromptLogprobs] | None = None  # per asking sequence of ModelInput.prompt_logprobs


@dataclass(slots=True)
class TopLogprobs:
    """One step's most likely tokens for one request, best first, with their raw-model log-probabilities."""

    token_ids: list[int]
    logprobs: list[float]


@runtime_checkable
class Executor(Protocol):
    """Runs the model for every DP rank of one deployment unit; owns the KV caches.

    dp_size: number of data-parallel attention ranks (each schedules its own requests).
    num_kv_blocks / block_size: the paged cache of each rank (the same on every rank).
    execute: one entry per rank; a rank given None still takes part in the step (an empty batch in
      the expert-parallel runtime, whose collectives need every rank) and returns None.
    read_kv / write_kv: whole cache blocks [num_layers, len(block_ids), block_size, kv_dim] of one
      rank, for the prefill -> decode KV handoff.
    """

    @property
    def dp_size(self) -> int: ...

    @property
    def num_kv_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def execute(self, inputs: list[ModelInput | None]) -> list[SamplerOutput | None]: ...

    def read_kv(self, dp_rank: int, block_ids: list[int]) -> torch.Tensor: ...

    def write_kv(self, dp_rank: int, block_ids: list[int], kv: torch.Tensor) -> None: ...

    def shutdown(self) -> None: ...
