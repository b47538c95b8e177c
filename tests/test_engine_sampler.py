"""The vectorised sampler: top-k/top-p masks, the exponential race draws from the right distribution,
seeded rows are reproducible wherever they sit in the batch, logprobs are the raw model's."""

from __future__ import annotations

import torch

from raymoe.engine.executor import SamplingMetadata
from raymoe.engine.sampler import Sampler, apply_top_k_top_p


def metadata(
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seeds: list[int | None] | None = None,
    logprobs: bool = False,
) -> SamplingMetadata:
    seeds = seeds if seeds is not None else [None] * n
    return SamplingMetadata(
        temperatures=torch.full((n,), temperature),
        top_ps=torch.full((n,), top_p),
        top_ks=torch.full((n,), top_k, dtype=torch.long),
        seeds=seeds,
        output_indices=[0] * n,
        all_greedy=temperature == 0,
        needs_logprobs=logprobs,
        any_top_p=top_p < 1,
        any_top_k=top_k > 0,
    )


def test_top_k_and_top_p_masks() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, -1]), None)
    assert torch.isinf(out[0]).tolist() == [True, False, True, False] and not torch.isinf(out[1]).any()
    probs = torch.softmax(logits[0], 0)  # sorted mass: 0.644, 0.237, 0.087, 0.032
    assert probs[1] > 0.6
    out = apply_top_k_top_p(logits, None, torch.tensor([0.5, 0.85]))
    assert (~torch.isinf(out[0])).tolist() == [False, True, False, False]  # the top token alone covers 0.5
    assert (~torch.isinf(out[1])).tolist() == [False, True, False, True]  # two tokens reach 0.85


def test_draws_follow_the_tempered_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).repeat(4000, 1)
    out = Sampler()(logits, metadata(4000, temperature=2.0))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, 0), atol=0.03, rtol=0)
    out = Sampler()(logits, metadata(4000, temperature=1.0, top_k=2))
    assert set(out.token_ids) == {0, 3}


def test_greedy_logprobs_and_seeded_rows() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, metadata(6, temperature=0, logprobs=True))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is not None
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.log_softmax(logits, -1).max(-1).values)
    # a seeded row draws the same token wherever it sits and whatever the global RNG does
    row = logits[2:3]
    alone = Sampler()(row, metadata(1, seeds=[42])).token_ids[0]
    torch.manual_seed(123)
    batch = torch.cat([logits[:1], row, logits[4:5]])
    mixed = Sampler()(batch, metadata(3, seeds=[None, 42, 7])).token_ids
    assert mixed[1] == alone
    draws = {Sampler()(row, metadata(1, seeds=[s])).token_ids[0] for s in range(30)}
    assert len(draws) > 3  # different seeds, different draws
