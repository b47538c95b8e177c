"""Paged latent-KV block allocation with prefix caching of full blocks.

Blocks hold `block_size` consecutive tokens of one sequence (all layers). A block whose tokens are
all computed gets a hash chained over the whole prefix (hash of the previous block's hash and its
own token ids), so a new prompt that starts with the same full blocks reuses them (ref-counted)
instead of recomputing them. Freed blocks keep their hash and stay findable until reallocated:
the free pool is LRU, with hash-less blocks handed out first.
"""

from __future__ import annotations

from collections import OrderedDict

from raymoe.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Chained hash of a full block; Python's int/tuple hashing is deterministic across processes."""
    return hash((parent, tokens))


class BlockManager:
    """Allocation state of one DP rank's paged cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hit_tokens = 0

    # --- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the sequence's leading full blocks (never its last token: it must be computed)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(seq.token_ids) - 1) // bs):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, toks)
            b = self.cached.get(h)
            if b is None or self.tokens[b] != toks:
                break
            hits.append(b)
            parent = h
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether taking `hits` and then covering `num_tokens` tokens fits in the free pool."""
        reused_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(hits) <= len(self.free) - reused_free

    # --- mutation ------------------------------------------------------------------------------
    def take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        """Give a new sequence the cached blocks of its prefix; they count as computed."""
        assert not seq.block_table, "take_prefix on a sequence that already has blocks"
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(self.hashes[b])  # type: ignore[arg-type]
        n = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = n
        seq.num_hashed_blocks = len(hits)
        self.prefix_hit_tokens += n

    def _allocate(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.hashes[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.hashes[b] = None
            self.tokens[b] = None
        self.ref_counts[b] = 1
        return b

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (and no change) when the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        seq.block_table.extend(self._allocate() for _ in range(need))
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, and publish them for prefix reuse."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_hashed_blocks:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(seq.num_hashed_blocks, full):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, toks)
            seq.block_hashes.append(h)
            parent = h
            b = seq.block_table[i]
            if self.enable_prefix_caching and self.hashes[b] is None and h not in self.cached:
                self.hashes[b] = h
                self.tokens[b] = toks
                self.cached[h] = b
        seq.num_hashed_blocks = full

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody uses return to the pool (tail blocks evicted first)."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.hashes[b] is None:
                    self.free.move_to_end(b, last=False)
            elif self.ref_counts[b] < 0:
                raise RuntimeError(f"KV block {b} freed more often than allocated")
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
