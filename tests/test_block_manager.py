"""BlockManager: allocation, ref-counted prefix sharing of full computed blocks, LRU reuse of freed blocks."""

from __future__ import annotations

import pytest

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence


def seq(tokens: list[int], rid: str = "s") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=8), arrival=0, max_model_len=1024)


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    """Admit a whole prompt, compute it, publish its full blocks; returns the prefix hits."""
    hits = bm.lookup_prefix(s)
    assert bm.can_admit(hits, len(s.token_ids))
    bm.take_prefix(s, hits)
    assert bm.ensure_slots(s, len(s.token_ids))
    s.num_computed_tokens = len(s.token_ids)
    bm.mark_computed(s)
    return hits


def test_allocate_grow_and_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(list(range(10)))
    admit(bm, s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3 and bm.num_free_blocks == 1
    assert bm.ensure_slots(s, 12) and len(s.block_table) == 3  # still fits in 3 blocks
    assert bm.ensure_slots(s, 13) and bm.num_free_blocks == 0
    assert not bm.ensure_slots(s, 17) and len(s.block_table) == 4  # short: no partial growth
    bm.free_sequence(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and s.num_computed_tokens == 0


def test_prefix_blocks_are_shared_and_ref_counted() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    assert admit(bm, a) == []
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], "b")
    hits = admit(bm, b)
    assert hits == a.block_table[:2] and b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8 and bm.prefix_hit_tokens == 8
    assert bm.ref_counts[hits[0]] == 2
    bm.free_sequence(a)
    assert bm.ref_counts[hits[0]] == 1 and bm.num_used_blocks == len(b.block_table)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 8
    # freed blocks keep their hashes: a later identical prefix still hits
    c = seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "c")
    assert admit(bm, c) == hits


def test_last_token_is_never_served_from_the_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, seq([1, 2, 3, 4, 5, 6, 7, 8], "a"))
    again = seq([1, 2, 3, 4, 5, 6, 7, 8], "b")
    assert len(bm.lookup_prefix(again)) == 1  # the block holding the last token is recomputed


def test_different_prefix_same_block_tokens_do_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, seq([1, 2, 3, 4, 9], "a"))
    assert bm.lookup_prefix(seq([7, 7, 3, 4, 9], "b")) == []  # chained hash: block 2 differs by its prefix


def test_eviction_prefers_uncached_then_the_tail_of_a_prefix() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")  # blocks: [1,2] and [3,4] full and cached, [5] partial
    admit(bm, a)
    first, second, partial = a.block_table
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    b = seq([8, 9, 10], "b")  # two blocks: the partial one and the never-used one go first
    admit(bm, b)
    assert partial in b.block_table and first not in b.block_table and second not in b.block_table
    assert len(bm.lookup_prefix(seq([1, 2, 3, 4, 0], "c"))) == 2
    d = seq([20], "d")  # one more block: the tail of the cached prefix is evicted before its head
    admit(bm, d)
    assert d.block_table == [second]
    assert bm.lookup_prefix(seq([1, 2, 3, 4, 0], "e")) == [first]


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    admit(bm, seq([1, 2, 3, 4, 5], "a"))
    assert bm.lookup_prefix(seq([1, 2, 3, 4, 5], "b")) == []


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
