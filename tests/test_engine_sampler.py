"""The vectorised sampler: top-k/top-p masks, the exponential race draws from the right distribution,
seeded rows are reproducible wherever they sit in the batch, logprobs are the raw model's."""

from __future__ import annotations

import torch

from raymoe.engine.executor import Penalties, SamplingMetadata, SparseLogits
from raymoe.engine.sampler import Sampler, apply_top_k_top_p, process_logits


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


def _edits(rows: list[int], ids: list[int], values: list[float]) -> SparseLogits:
    return SparseLogits(torch.tensor(rows), torch.tensor(ids), torch.tensor(values))


def test_logit_bias_and_min_tokens_ban_touch_only_their_rows() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    md = metadata(3, temperature=0, logprobs=True)
    md.logit_bias = _edits([1], [7], [100.0])
    md.banned = _edits([2, 2], [int(logits[2].argmax()), 3], [0.0, 0.0])
    out = Sampler()(logits, md)
    assert out.token_ids[0] == int(logits[0].argmax())  # untouched row
    assert out.token_ids[1] == 7  # +100 forces the token
    assert out.token_ids[2] == int(logits[2].topk(2).indices[1])  # its best token is banned
    assert out.logprobs is not None  # logprobs stay the raw model's
    torch.testing.assert_close(out.logprobs[1], float(torch.log_softmax(logits[1], -1)[7]))


def test_penalties_follow_vllm_semantics() -> None:
    vocab = 6
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, 0.0, 1.9]]).repeat(3, 1)
    pad = vocab
    md = metadata(3, temperature=0)
    md.penalties = Penalties(
        presence=torch.tensor([0.0, 0.5, 0.0]),
        frequency=torch.tensor([0.0, 0.0, 0.3]),
        repetition=torch.tensor([2.0, 1.0, 1.0]),
        output_ids=torch.tensor([[0, pad, pad], [0, 0, 3], [0, 0, 5]]),
        prompt_ids=torch.tensor([[2, pad], [pad, pad], [pad, pad]]),
    )
    got = process_logits(logits, md)
    # row 0: repetition 2 on tokens 0 (output) and 2 (prompt): 2 -> 1, -1 -> -2
    torch.testing.assert_close(got[0], torch.tensor([1.0, 1.0, -2.0, 0.5, 0.0, 1.9]))
    # row 1: presence 0.5 once per generated token (0 twice, 3 once)
    torch.testing.assert_close(got[1], torch.tensor([1.5, 1.0, -1.0, 0.0, 0.0, 1.9]))
    # row 2: frequency 0.3 per occurrence (0 twice, 5 once)
    torch.testing.assert_close(got[2], torch.tensor([1.4, 1.0, -1.0, 0.5, 0.0, 1.6]))
    out = Sampler()(logits, md)
    assert out.token_ids == [5, 5, 5]  # the repeated token 0 loses its lead in every row
    assert Sampler()(logits, metadata(3, temperature=0)).token_ids == [0, 0, 0]


def test_a_bad_bias_row_fails_alone_and_the_others_keep_their_edits() -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    md = metadata(3, temperature=0)
    md.logit_bias = _edits([0, 1, 2], [4, 99, 6], [100.0, 100.0, 100.0])  # row 1's id is out of range
    out = Sampler()(logits, md)
    assert out.token_ids[0] == 4 and out.token_ids[2] == 6 and out.token_ids[1] == -1
    assert out.errors is not None and set(out.errors) == {1}


def test_top_logprobs_are_the_raw_log_softmax_top_k_per_row() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    md = metadata(3, temperature=0, logprobs=True)
    md.top_logprobs = [2, 0, 5]
    md.logit_bias = _edits([0], [11], [100.0])  # processing changes the token, not the reported distribution
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits, -1)
    assert out.top is not None and out.top[1] is None and out.token_ids[0] == 11
    for row, k in ((0, 2), (2, 5)):
        top = out.top[row]
        assert top is not None and top.token_ids == ref[row].topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor(top.logprobs), ref[row].topk(k).values)
    md.logit_bias = _edits([0, 1], [11, 99], [1.0, 1.0])  # row 1 fails alone: the retry keeps the others' top
    out = Sampler()(logits, md)
    assert out.errors is not None and set(out.errors) == {1}
    assert out.top is not None and out.top[1] is None and out.top[2] is not None and len(out.top[2].token_ids) == 5
