"""Vectorised next-token sampling: logits processing, greedy, temperature, top-k, top-p, per-request seeds.

Logits processing (vLLM's order and semantics: the structured-output grammar mask, penalties, then
logit_bias, then the min_tokens and bad-word bans, then the allowed_token_ids mask; min_p after
temperature) runs only when a row of the step uses it, as a few batched tensor ops over the whole step; a step
without it goes straight to the argmax (greedy) or the race. Logprobs stay the raw model's.

Random rows use the exponential-race form (argmax of p / E with E ~ Exp(1) is a draw from p), so
one batched kernel serves every row; a seeded row only fills its own E from its own generator.

A batch that fails is sampled again row by row, so a failure that belongs to one request (its
parameters, its logits) fails only that row (`SamplerOutput.errors`); a failure that is the
device's (a CUDA error is sticky, so the device check after the retry raises too) propagates and
fails the unit.
"""

from __future__ import annotations

import torch

from raymoe.engine.executor import Penalties, SamplerOutput, SamplingMetadata, SparseLogits, TopLogprobs

_SEED_MASK = (1 << 63) - 1


def row_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    """The generator for token `output_index` of a request seeded with `seed` (stateless: survives preemption, handoff)."""
    return torch.Generator(device=device).manual_seed(hash((seed, output_index)) & _SEED_MASK)


def apply_top_k_top_p(
    logits: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p nucleus; one sort for both."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        k = torch.where(top_ks > 0, top_ks, vocab).clamp(max=vocab).unsqueeze(1)
        drop |= rank >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_ps is not None:
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        drop |= before >= top_ps.unsqueeze(1)
        drop[:, 0] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition over prompt + output tokens, frequency and presence over output tokens (vLLM's)."""
    n, vocab = logits.shape
    device = logits.device
    out_ids = p.output_ids.to(device, non_blocking=True)
    counts = torch.zeros(n, vocab + 1, device=device, dtype=logits.dtype)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    seen = torch.zeros(n, vocab + 1, device=device, dtype=torch.bool)
    seen.scatter_(1, p.prompt_ids.to(device, non_blocking=True), True)
    seen = seen[:, :vocab] | (counts > 0)
    rep = p.repetition.to(device, non_blocking=True).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - p.frequency.to(device, non_blocking=True).unsqueeze(1) * counts
    return logits - p.presence.to(device, non_blocking=True).unsqueeze(1) * (counts > 0).to(logits.dtype)


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [byte, bit]: bit set
_BYTE_PENALTY: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf for every token a row's grammar does not allow; bitmask [n, ceil(vocab / 32)] int32, bit t = token t.

    The words are read as their (little-endian) bytes and each byte looked up in a [256, 8] table of
    0 / -inf that is added to the logits: one gather and one add (the unpacked 32-bit shifts cost ~6x more)."""
    n, vocab = logits.shape
    key = (logits.device, logits.dtype)
    table = _BYTE_PENALTY.get(key)
    if table is None:
        table = torch.zeros(256, 8, dtype=logits.dtype).masked_fill(~_BYTE_BITS, float("-inf")).to(logits.device)
        _BYTE_PENALTY[key] = table
    data = bitmask.to(logits.device, non_blocking=True).contiguous().view(torch.uint8).reshape(-1).long()
    return logits + table.index_select(0, data).view(n, -1)[:, :vocab]


def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The step's logits after the grammar mask, penalties, logit_bias and the min_tokens ban (the same
    tensor when none is used)."""
    if md.grammar_bitmask is not None:
        logits = apply_token_bitmask(logits, md.grammar_bitmask)
    if md.penalties is not None:
        logits = apply_penalties(logits, md.penalties)
    if md.logit_bias is not None:
        b = md.logit_bias
        device = logits.device
        logits = logits.index_put(
            (b.rows.to(device), b.ids.to(device)), b.values.to(device, logits.dtype), accumulate=True
        )
    if md.banned is not None:
        device = logits.device
        logits = logits.index_put(
            (md.banned.rows.to(device), md.banned.ids.to(device)), torch.tensor(float("-inf"), device=device)
        )
    if md.allowed is not None:  # the rows with an allow-list keep only its tokens
        device = logits.device
        rows, ids = md.allowed.rows.to(device), md.allowed.ids.to(device)
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[rows] = False
        keep[rows, ids] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """vLLM's min_p (after temperature): drop the tokens less likely than min_p x the row's most likely one."""
    probs = logits.softmax(dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_ps.to(logits.device, non_blocking=True).unsqueeze(1)
    return logits.masked_fill(probs < floor, float("-inf"))


def _sparse_row(sp: SparseLogits | None, row: int) -> SparseLogits | None:
    if sp is None:
        return None
    keep = sp.rows == row
    if not bool(keep.any()):
        return None
    return SparseLogits(rows=torch.zeros_like(sp.rows[keep]), ids=sp.ids[keep], values=sp.values[keep])


def _penalties_row(p: Penalties | None, row: int) -> Penalties | None:
    if p is None:
        return None
    r = slice(row, row + 1)
    return Penalties(
        presence=p.presence[r], frequency=p.frequency[r], repetition=p.repetition[r],
        output_ids=p.output_ids[r], prompt_ids=p.prompt_ids[r],
    )


def _row(md: SamplingMetadata, row: int) -> SamplingMetadata:
    """The metadata of one row alone (for the row-by-row retry)."""
    temps = md.temperatures[row : row + 1]
    greedy = bool((temps == 0).all())
    return SamplingMetadata(
        temperatures=temps,
        top_ps=md.top_ps[row : row + 1],
        top_ks=md.top_ks[row : row + 1],
        seeds=md.seeds[row : row + 1],
        output_indices=md.output_indices[row : row + 1],
        all_greedy=greedy,
        needs_logprobs=md.needs_logprobs,
        any_top_p=md.any_top_p and not greedy,
        any_top_k=md.any_top_k and not greedy,
        penalties=_penalties_row(md.penalties, row),
        logit_bias=_sparse_row(md.logit_bias, row),
        banned=_sparse_row(md.banned, row),
        top_logprobs=md.top_logprobs[row : row + 1] if md.top_logprobs is not None else None,
        allowed=_sparse_row(md.allowed, row),
        min_ps=md.min_ps[row : row + 1] if md.min_ps is not None and not greedy else None,
        grammar_bitmask=md.grammar_bitmask[row : row + 1] if md.grammar_bitmask is not None else None,
    )


def _check_device(device: torch.device) -> None:
    """Raise when the device itself is broken (a CUDA error poisons the context: synchronize raises)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits [n, vocab] float32, one row per sampled sequence. A row that cannot be sampled gets
        token -1 and its message in `errors`; the other rows are sampled as if it were not there."""
        try:
            return self._sample(logits, md)
        except Exception:
            pass  # sampled again row by row below: which rows fail alone?
        tokens: list[int] = []
        logprobs: list[float] | None = [] if md.needs_logprobs else None
        top: list[TopLogprobs | None] | None = [] if md.top_logprobs is not None else None
        errors: dict[int, str] = {}
        for row in range(len(md)):
            try:
                out = self._sample(logits[row : row + 1], _row(md, row))
                tokens.append(out.token_ids[0])
                if logprobs is not None:
                    logprobs.append(out.logprobs[0] if out.logprobs else 0.0)
                if top is not None:
                    top.append(out.top[0] if out.top else None)
            except Exception as exc:
                errors[row] = f"sampling failed: {exc}"
                tokens.append(-1)
                if logprobs is not None:
                    logprobs.append(0.0)
                if top is not None:
                    top.append(None)
        _check_device(logits.device)
        return SamplerOutput(tokens, logprobs, errors or None, top)

    def _sample(self, raw: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = process_logits(raw, md)
        greedy_tokens = logits.argmax(dim=-1)
        if md.all_greedy:
            tokens = greedy_tokens
        else:
            device = logits.device
            temps = md.temperatures.to(device, non_blocking=True)
            greedy = temps == 0
            scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
            if md.min_ps is not None:
                scaled = apply_min_p(scaled, md.min_ps)
            if md.any_top_k or md.any_top_p:
                scaled = apply_top_k_top_p(
                    scaled,
                    md.top_ks.to(device, non_blocking=True) if md.any_top_k else None,
                    md.top_ps.to(device, non_blocking=True) if md.any_top_p else None,
                )
            probs = scaled.softmax(dim=-1)
            race = torch.empty_like(probs).exponential_()
            for row, (seed, index) in enumerate(zip(md.seeds, md.output_indices, strict=True)):
                if seed is not None:
                    race[row].exponential_(generator=row_generator(seed, index, device))
            sampled = (probs / race).argmax(dim=-1)
            tokens = torch.where(greedy, greedy_tokens, sampled)
        logprobs = None
        top: list[TopLogprobs | None] | None = None
        if md.needs_logprobs:
            log_probs = torch.log_softmax(raw, dim=-1)
            logprobs = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            if md.top_logprobs is not None:  # one top-k for the step, at the largest k asked
                values, ids = log_probs.topk(min(max(md.top_logprobs), raw.shape[-1]), dim=-1)
                rows_v, rows_i = values.tolist(), ids.tolist()
                top = [
                    TopLogprobs(rows_i[r][:k], rows_v[r][:k]) if k else None for r, k in enumerate(md.top_logprobs)
                ]
        return SamplerOutput(tokens.tolist(), logprobs, None, top)
