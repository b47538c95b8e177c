"""Vectorised next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random rows use the exponential-race form (argmax of p / E with E ~ Exp(1) is a draw from p), so
one batched kernel serves every row; a seeded row only fills its own E from its own generator.

A batch that fails is sampled again row by row, so a failure that belongs to one request (its
parameters, its logits) fails only that row (`SamplerOutput.errors`); a failure that is the
device's (a CUDA error is sticky, so the device check after the retry raises too) propagates and
fails the unit.
"""

from __future__ import annotations

import torch

from raymoe.engine.executor import SamplerOutput, SamplingMetadata

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
        errors: dict[int, str] = {}
        for row in range(len(md)):
            try:
                out = self._sample(logits[row : row + 1], _row(md, row))
                tokens.append(out.token_ids[0])
                if logprobs is not None:
                    logprobs.append(out.logprobs[0] if out.logprobs else 0.0)
            except Exception as exc:
                errors[row] = f"sampling failed: {exc}"
                tokens.append(-1)
                if logprobs is not None:
                    logprobs.append(0.0)
        _check_device(logits.device)
        return SamplerOutput(tokens, logprobs, errors or None)

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        greedy_tokens = logits.argmax(dim=-1)
        if md.all_greedy:
            tokens = greedy_tokens
        else:
            device = logits.device
            temps = md.temperatures.to(device, non_blocking=True)
            greedy = temps == 0
            scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
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
        if md.needs_logprobs:
            lp = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
            logprobs = lp.tolist()
        return SamplerOutput(tokens.tolist(), logprobs)
