"""Prompt logprobs: the log-softmax at the prompt positions a request asks for, in bounded chunks.

Runs where the final hidden states are (the single-process runner, TP rank 0 of an expert-parallel
group): the lm_head is applied to at most `CHUNK_ELEMENTS / vocab` rows at a time, so a long
prompt never holds [prompt_len, vocab] logits at once; only per-position floats, ranks and the
top-N alternatives leave the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raymoe.engine.executor import PromptLogprobs, PromptLogprobsRequest, TopLogprobs

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in float32): ~130 rows of DeepSeek-V3's vocabulary


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    req: PromptLogprobsRequest,
    vocab_size: int,
) -> list[PromptLogprobs]:
    """Per asking sequence of `req`: its positions' logprobs (raw model), ranks and top alternatives.

    hidden: the step's final-normed hidden states [T, dim]; compute_logits maps rows to float32 logits."""
    device = hidden.device
    indices = req.indices.to(device, non_blocking=True)
    targets = req.targets.to(device, non_blocking=True).unsqueeze(1)
    k = min(max(req.top_n, default=0), vocab_size)
    rows = max(1, CHUNK_ELEMENTS // vocab_size)
    lps: list[torch.Tensor] = []
    ranks: list[torch.Tensor] = []
    top_v: list[torch.Tensor] = []
    top_i: list[torch.Tensor] = []
    for start in range(0, int(indices.numel()), rows):
        logprobs = torch.log_softmax(compute_logits(hidden[indices[start : start + rows]]), dim=-1)
        target = logprobs.gather(1, targets[start : start + rows])
        lps.append(target.squeeze(1))
        ranks.append((logprobs >= target).sum(dim=-1))
        if k:
            v, i = logprobs.topk(k, dim=-1)
            top_v.append(v)
            top_i.append(i)
    return _split(req, lps, ranks, top_v, top_i)


def _split(
    req: PromptLogprobsRequest,
    lps: list[torch.Tensor],
    ranks: list[torch.Tensor],
    top_v: list[torch.Tensor],
    top_i: list[torch.Tensor],
) -> list[PromptLogprobs]:
    """The flat results cut into the asking sequences' shares (one device-to-host copy per kind)."""
    flat_lp = torch.cat(lps).tolist() if lps else []
    flat_rank = torch.cat(ranks).tolist() if ranks else []
    values = torch.cat(top_v).tolist() if top_v else []
    ids = torch.cat(top_i).tolist() if top_i else []
    out: list[PromptLogprobs] = []
    at = 0
    for count, n in zip(req.counts, req.top_n, strict=True):
        span = slice(at, at + count)
        top = [TopLogprobs(i[:n], v[:n]) for i, v in zip(ids[span], values[span], strict=True)] if n else None
        out.append(PromptLogprobs(flat_lp[span], flat_rank[span], top))
        at += count
    return out
