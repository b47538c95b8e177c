"""Continuous batching with chunked prefill for one DP rank.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, in arrival
order: a decoding sequence takes one token, one still in its prompt takes the next chunk. Then
waiting sequences join (prefix-cache hits count as computed) while budget, sequence slots and KV
blocks last. When a running sequence needs a block and none is free, the latest-arrived running
sequence is preempted: its blocks are freed and it is recomputed later (its full blocks usually
come back from the prefix cache), so a full cache makes requests wait, never fail.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What one rank runs this step: sequences with their new-token counts, and handed-off KV to write first."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    kv_writes: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        # every running sequence needs at least one token of the step budget
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._pending_blocks = 0

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pending_blocks(self) -> int:
        """Blocks the waiting sequences will take on admission (for the DP load balancer), kept incrementally."""
        return self._pending_blocks

    def _waiting_blocks(self, seq: Sequence) -> int:
        return self.block_manager.blocks_for(len(seq.token_ids))

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._pending_blocks += self._waiting_blocks(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted); its blocks are the caller's business."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self._pending_blocks -= self._waiting_blocks(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self._pending_blocks += self._waiting_blocks(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch | None:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending_tokens, budget)
            while not bm.ensure_slots(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                preempted = True
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
                continue
            break  # the sequence preempted itself: everything after it already was
        kv_writes: list[Sequence] = []
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_kv is not None:
                # handed-off prompt KV: cover the prompt and the first generated token, decode it now
                if not bm.ensure_slots(seq, len(seq.token_ids)):
                    break
                seq.num_computed_tokens = len(seq.token_ids) - 1
                kv_writes.append(seq)
                n = 1
            else:
                # positions whose prompt logprobs are still wanted are computed, not read from the cache
                pl = seq.prompt_logprobs
                wants = pl is not None and len(pl.logprobs) < seq.num_prompt_tokens - 1
                hits = [] if wants else bm.lookup_prefix(seq)
                cached = len(hits) * bm.block_size
                n = min(len(seq.token_ids) - cached, budget)
                if not bm.can_admit(hits, cached + n):
                    break
                bm.take_prefix(seq, hits)
                ok = bm.ensure_slots(seq, cached + n)
                assert ok, "can_admit promised the blocks"
            self.waiting.popleft()
            self._pending_blocks -= self._waiting_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, kv_writes)
