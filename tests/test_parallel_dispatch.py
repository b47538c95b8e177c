"""The pure pieces of dispatch: replica choice, (row, destination) pairing, micro-batch split (no Ray)."""

from __future__ import annotations

import torch

from raymoe.engine.executor import ModelInput
from raymoe.eplb.replica import choose_replicas
from raymoe.parallel.dispatch import make_pairs, rotate_replicas
from raymoe.parallel.worker import split_micro_batches

# expert 0 has replicas in slots 0 and 5, expert 1 in slot 1, expert 2 in slots 2, 3, 4
LOG2PHY = torch.tensor([[0, 5, -1], [1, -1, -1], [2, 3, 4]])
COUNT = torch.tensor([2, 1, 3])


def test_ranks_start_at_different_replicas() -> None:
    """The policy deals an expert's pairs round-robin from its first replica; each rank's rotated map starts elsewhere."""
    assert rotate_replicas(LOG2PHY, COUNT, 1).tolist() == [[5, 0, -1], [1, -1, -1], [3, 4, 2]]
    ids = torch.tensor([[0, 2]])
    firsts = {tuple(choose_replicas(rotate_replicas(LOG2PHY, COUNT, r), COUNT, 2, ids, "static")[0].tolist()) for r in range(6)}
    assert firsts == {(0, 2), (5, 3), (0, 4), (5, 2), (0, 3), (5, 4)}


def busiest_gpu(slots: torch.Tensor, slots_per_gpu: int, num_gpus: int) -> int:
    return int(torch.bincount(slots.reshape(-1) // slots_per_gpu, minlength=num_gpus).max())


def test_balanced_choice_never_worse_than_static() -> None:
    """On the same routed ids, the balanced choice's busiest GPU carries no more pairs than the
    static choice's, on every rank's rotated map and skewed routing, and fewer on some."""
    gains = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        skew = torch.rand(3, generator=g) ** 4 + 1e-3
        ids = torch.multinomial(skew.expand(40, 3), 2, replacement=False, generator=g)
        for rank in range(3):
            l2p = rotate_replicas(LOG2PHY, COUNT, rank)
            static, balanced = (choose_replicas(l2p, COUNT, 2, ids, mode, num_gpus=3) for mode in ("static", "balanced"))
            for slots in (static, balanced):  # every pair goes to a replica of its own expert
                assert all(int(s) in LOG2PHY[e].tolist() for s, e in zip(slots.view(-1), ids.view(-1), strict=True))
            gains.append(busiest_gpu(static, 2, 3) - busiest_gpu(balanced, 2, 3))
    assert min(gains) >= 0, "balanced must never load its busiest GPU more than static"
    assert max(gains) > 0, "on skewed routing balanced must relieve the busiest GPU somewhere"


def test_pairs_send_a_row_once_per_destination() -> None:
    slots = torch.tensor([[0, 1, 4], [5, 2, 3]])  # 2 slots per GPU: GPUs [0, 0, 2], [2, 1, 1]
    w = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    p = make_pairs(slots // 2, slots, w, 3)
    assert p.counts == [1, 1, 2]
    assert p.src_row.tolist() == [0, 1, 0, 1]  # sorted by destination GPU
    assert p.slots.tolist() == [[0, 1, -1], [-1, 2, 3], [-1, -1, 4], [5, -1, -1]]
    assert torch.allclose(p.weights.sum(), w.sum())
    empty = make_pairs(torch.empty(0, 3, dtype=torch.long), torch.empty(0, 3, dtype=torch.long), torch.empty(0, 3), 3)
    assert empty.counts == [0, 0, 0] and empty.src_row.numel() == 0


def test_micro_batches_split_whole_sequences_evenly() -> None:
    lens = [10, 3, 4, 5]
    inp = ModelInput(
        input_ids=torch.arange(22), positions=torch.arange(22), query_lens=lens, context_lens=lens,
        block_tables=torch.arange(4).unsqueeze(1), slot_mapping=torch.arange(22), sample_indices=torch.tensor([9, 12, 16, 21]),
        sampling=None,
    )
    a, b = split_micro_batches(inp)
    assert a is not None and b is not None
    assert (a.query_lens, b.query_lens) == ([10], [3, 4, 5])
    assert b.input_ids.tolist() == list(range(10, 22)) and b.block_tables.tolist() == [[1], [2], [3]]
    single = split_micro_batches(ModelInput(
        input_ids=torch.arange(3), positions=torch.arange(3), query_lens=[3], context_lens=[3],
        block_tables=torch.zeros(1, 1, dtype=torch.long), slot_mapping=torch.arange(3),
        sample_indices=torch.tensor([2]), sampling=None,
    ))
    assert single[1] is None
