"""Scheduler: token budget, decode-first continuous batching, prefix hits on admission, preemption when full."""

from __future__ import annotations

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.scheduler import Scheduler
from raymoe.engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int, start: int = 0) -> Sequence:
    return Sequence(
        rid, list(range(start, start + n)), SamplingParams(max_tokens=64), arrival=0, max_model_len=4096
    )


def finish_step(sched: Scheduler, batch: object, sample: int = 7) -> None:
    """What the engine does after a step: count computed tokens, append a token where a prompt completed."""
    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):  # type: ignore[attr-defined]
        s.num_computed_tokens += n
        sched.block_manager.mark_computed(s)
        if s.num_computed_tokens == len(s.token_ids):
            s.token_ids.append(sample)


def test_token_budget_chunks_prefill_and_decodes_go_first() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq("a", 3), seq("b", 25, start=100)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [a, b] and batch.num_new_tokens == [3, 7]
    finish_step(sched, batch)
    batch = sched.schedule()  # a decodes (1 token) ahead of b's next chunk (9)
    assert batch is not None and batch.seqs == [a, b] and batch.num_new_tokens == [1, 9]
    finish_step(sched, batch)
    batch = sched.schedule()
    assert batch is not None and batch.num_new_tokens == [1, 9] and batch.num_tokens == 10
    finish_step(sched, batch)
    batch = sched.schedule()  # b has 0 left of its prompt, 1 sampled token: both decode
    assert batch is not None and batch.num_new_tokens == [1, 1]


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(str(i), 2, start=10 * i))
    batch = sched.schedule()
    assert batch is not None and len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_full_cache_preempts_the_latest_and_it_comes_back() -> None:
    bm = BlockManager(4, 4)  # 16 token slots
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 8), seq("b", 7, start=50)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [a, b] and bm.num_free_blocks == 0
    finish_step(sched, batch)  # a has 9 tokens: needs a 3rd block, none free
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [a] and b.status is SequenceStatus.WAITING
    assert sched.num_preemptions == 1 and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and len(b.token_ids) == 8  # its sampled token is kept and recomputed
    assert sched.pending_blocks() == 2  # what b takes back on admission (the DP balancer's view)
    finish_step(sched, batch)
    sched.remove(a)
    bm.free_sequence(a)
    batch = sched.schedule()  # b returns; its full first block is a prefix-cache hit
    assert (
        batch is not None and batch.seqs == [b] and b.num_cached_tokens == 4 and batch.num_new_tokens == [4]
    )
    assert sched.pending_blocks() == 0


def test_waiting_request_waits_for_blocks() -> None:
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 10), seq("b", 6, start=40)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [a] and list(sched.waiting) == [b]
    sched.remove(a)
    bm.free_sequence(a)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [b] and sched.has_work()


def test_running_sequences_never_exceed_the_token_budget() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=3)
    for i in range(5):
        sched.add(seq(str(i), 1, start=10 * i))
    batch = sched.schedule()
    assert batch is not None and len(batch.seqs) == 3 and len(sched.running) == 3
