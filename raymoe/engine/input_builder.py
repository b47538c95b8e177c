"""The host side of a step: one rank's scheduled batch as the tensors the executor runs (nano-vllm's prepare).

Built on the engine's process and shipped as a `ModelInput` of CPU tensors, so the same input goes
to the local runner or, pickled, to an expert-parallel unit's workers. Per decoding sequence this
is a few list appends; a prefill chunk's positions and slots are computed with numpy in one go.
"""

from __future__ import annotations

import numpy as np
import torch

from raymoe.engine.executor import (
    ModelInput,
    Penalties,
    PromptLogprobsRequest,
    SamplingMetadata,
    SparseLogits,
)
from raymoe.engine.scheduler import ScheduledBatch
from raymoe.engine.sequence import Sequence
from raymoe.engine.structured import StructuredOutputManager


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _penalties(sampled: list[Sequence], vocab: int) -> Penalties | None:
    """The token history of the rows that use a penalty (padding for the others); None when none does."""
    if not any(s.params.penalised for s in sampled):
        return None
    outs: list[list[int]] = []
    prompts: list[list[int]] = []
    for s in sampled:
        p = s.params
        outs.append(s.token_ids[s.num_prompt_tokens :] if p.penalised else [])
        prompts.append(s.token_ids[: s.num_prompt_tokens] if p.repetition_penalty != 1.0 else [])
    return Penalties(
        presence=torch.tensor([s.params.presence_penalty for s in sampled], dtype=torch.float32),
        frequency=torch.tensor([s.params.frequency_penalty for s in sampled], dtype=torch.float32),
        repetition=torch.tensor([s.params.repetition_penalty for s in sampled], dtype=torch.float32),
        output_ids=_padded(outs, vocab),
        prompt_ids=_padded(prompts, vocab),
    )


def _sparse(entries: list[tuple[int, int, float]]) -> SparseLogits | None:
    if not entries:
        return None
    rows, ids, values = zip(*entries, strict=True)
    return SparseLogits(
        rows=torch.tensor(rows, dtype=torch.long),
        ids=torch.tensor(ids, dtype=torch.long),
        values=torch.tensor(values, dtype=torch.float32),
    )


def _bad_word_bans(s: Sequence) -> set[int]:
    """vLLM's bad words: a word's last token is banned when the output ends with the word's other tokens."""
    out = s.token_ids[s.num_prompt_tokens :]
    bans: set[int] = set()
    for word in s.bad_word_ids or ():
        head = len(word) - 1
        if head == 0 or (len(out) >= head and out[len(out) - head :] == word[:-1]):
            bans.add(word[-1])
    return bans


def _logits_edits(
    sampled: list[Sequence], eos_token_ids: frozenset[int]
) -> tuple[SparseLogits | None, SparseLogits | None, SparseLogits | None]:
    """logit_bias entries, the banned tokens (stops before min_tokens, bad words) and the
    allowed_token_ids of the rows that ask for them."""
    bias: list[tuple[int, int, float]] = []
    banned: list[tuple[int, int, float]] = []
    allowed: list[tuple[int, int, float]] = []
    for row, s in enumerate(sampled):
        p = s.params
        if p.logit_bias:
            bias.extend((row, t, v) for t, v in p.logit_bias.items())
        hold_stops = p.min_tokens and s.num_output_tokens < p.min_tokens
        if hold_stops or s.bad_word_ids:
            bans = _bad_word_bans(s) if s.bad_word_ids else set()
            if hold_stops:
                bans |= set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids))
            banned.extend((row, t, 0.0) for t in sorted(bans))
        if p.allowed_token_ids:
            allowed.extend((row, t, 0.0) for t in p.allowed_token_ids)
    return _sparse(bias), _sparse(banned), _sparse(allowed)


def _prompt_logprobs_rows(
    asking: list[tuple[int, Sequence, int, int, int]],
) -> PromptLogprobsRequest | None:
    """The flat-batch rows of this step's prompt positions still wanted, per (batch row, seq, start
    token, new tokens, first flat row): positions already collected (a preempted sequence computes
    its prompt again) and the last prompt position (it predicts the first generated token) are not."""
    indices: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    counts: list[int] = []
    top_n: list[int] = []
    for row, seq, c, n, t in asking:
        assert seq.prompt_logprobs is not None
        start = max(c, len(seq.prompt_logprobs.logprobs))
        end = min(c + n, seq.num_prompt_tokens - 1)
        if end <= start:
            continue
        indices.extend(range(t + start - c, t + end - c))
        targets.extend(seq.token_ids[start + 1 : end + 1])
        rows.append(row)
        counts.append(end - start)
        top_n.append(seq.params.prompt_logprobs or 0)
    if not rows:
        return None
    return PromptLogprobsRequest(
        indices=torch.tensor(indices, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        batch_rows=rows,
        counts=counts,
        top_n=top_n,
    )


def build_model_input(
    batch: ScheduledBatch,
    block_size: int,
    vocab_size: int,
    eos_token_ids: frozenset[int],
    structured: StructuredOutputManager | None = None,
) -> ModelInput:
    """The flat variable-length batch of one rank: ids, positions, cache slots, block tables, sampling rows.

    `vocab_size` pads the penalised rows' token history; `eos_token_ids` are what min_tokens bans;
    `structured` (given only while some request has a grammar) fills the sampled rows' grammar bitmask."""
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qlens: list[int] = []
    clens: list[int] = []
    sample_idx: list[int] = []
    sampled: list[Sequence] = []
    asking: list[tuple[int, Sequence, int, int, int]] = []  # sequences whose prompt logprobs are wanted
    width = max(len(s.block_table) for s in batch.seqs)
    tables = np.zeros((len(batch.seqs), width), dtype=np.int64)
    t = 0
    for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        c = seq.num_computed_tokens
        table = seq.block_table
        tables[row, : len(table)] = table
        if n == 1:
            ids.append(seq.token_ids[c])
            positions.append(c)
            slots.append(table[c // bs] * bs + c % bs)
        else:
            ids.extend(seq.token_ids[c : c + n])
            pos = np.arange(c, c + n)
            positions.extend(pos.tolist())
            slots.extend((tables[row, pos // bs] * bs + pos % bs).tolist())
        qlens.append(n)
        clens.append(c + n)
        if seq.prompt_logprobs is not None and c < seq.num_prompt_tokens - 1:
            asking.append((row, seq, c, n, t))
        t += n
        if c + n == len(seq.token_ids):
            sample_idx.append(t - 1)
            sampled.append(seq)
    sampling = None
    if sampled:
        params = [s.params for s in sampled]
        temps = [p.temperature for p in params]
        all_greedy = not any(temps)
        logit_bias, banned, allowed = _logits_edits(sampled, eos_token_ids)
        sampling = SamplingMetadata(
            temperatures=torch.tensor(temps, dtype=torch.float32),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.long),
            seeds=[p.seed for p in params],
            output_indices=[s.num_output_tokens for s in sampled],
            all_greedy=all_greedy,
            needs_logprobs=any(p.logprobs for p in params),
            any_top_p=not all_greedy and any(p.top_p < 1.0 for p in params),
            any_top_k=not all_greedy and any(p.top_k > 0 for p in params),
            penalties=_penalties(sampled, vocab_size),
            logit_bias=logit_bias,
            banned=banned,
            top_logprobs=[p.top_logprobs for p in params] if any(p.top_logprobs for p in params) else None,
            grammar_bitmask=structured.bitmask([s.request_id for s in sampled]) if structured is not None else None,
            allowed=allowed,
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32)
            if not all_greedy and any(p.min_p for p in params) else None,
        )
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        query_lens=qlens,
        context_lens=clens,
        block_tables=torch.from_numpy(tables),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        sample_indices=torch.tensor(sample_idx, dtype=torch.long),
        sampling=sampling,
        prompt_logprobs=_prompt_logprobs_rows(asking) if asking else None,
    )
