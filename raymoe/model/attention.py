"""Attention metadata for a flattened variable-length batch against a paged latent KV cache.

The engine builds one `AttentionMetadata` per step. The model turns it once per forward into an
`AttentionPlan` (gather indices, masks) that every layer reuses, so no layer does Python work
proportional to the number of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and in the paged cache.

    query_start_loc: [num_seqs + 1] cumulative new-token counts.
    context_lens: [num_seqs] tokens in the cache after this step (new ones included).
    block_tables: [num_seqs, max_blocks] cache block ids, padded with 0 (None without a cache).
    slot_mapping: [T] flat slot (block * block_size + offset) each new token is written to.
    query_lens, context_lens_list: the same counts as host lists (no device sync to read them).
    """

    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor | None
    slot_mapping: torch.Tensor | None
    query_lens: list[int]
    context_lens_list: list[int]
    _plans: dict[int, AttentionPlan] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @classmethod
    def contiguous(cls, seq_lens: list[int], device: torch.device | str | None = None) -> AttentionMetadata:
        """Cache-free prefill of whole sequences (use with kv_cache=None)."""
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"seq_lens must be non-empty and positive, got {seq_lens}")
        lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
        qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.long, device=device)
        qsl[1:] = torch.cumsum(lens, 0)
        return cls(qsl, lens, None, None, list(seq_lens), list(seq_lens))

    @classmethod
    def paged(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str | None = None,
    ) -> AttentionMetadata:
        """Build from host lists: the new tokens of sequence s are its last query_lens[s] positions."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables, strict=True):
            if q < 1 or c < q:
                raise ValueError(f"need 1 <= query_len <= context_len, got query_len={q} context_len={c}")
            if len(table) * block_size < c:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {c} tokens")
            for pos in range(c - q, c):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            torch.tensor(qsl, dtype=torch.long, device=device),
            torch.tensor(context_lens, dtype=torch.long, device=device),
            tables,
            torch.tensor(slots, dtype=torch.long, device=device),
            list(query_lens),
            list(context_lens),
        )

    def plan(self, block_size: int | None) -> AttentionPlan:
        """Gather indices and masks for this step (block_size None: no cache), computed once."""
        key = block_size or 0
        p = self._plans.get(key)
        if p is None:
            p = AttentionPlan.build(self, block_size)
            self._plans[key] = p
        return p


@dataclass
class AttentionPlan:
    """Per-step index tensors shared by all layers.

    Decode part (sequences with one new token, absorbed MLA):
      d_tokens [Sd] flat token index, d_gather [Sd, Ld] source rows, d_mask [Sd, 1, 1, Ld].
    Prefill part (sequences with several new tokens, expanded MLA):
      p_tokens [Sp, Qp] flat token index (padding repeats the last token), p_valid [Sp, Qp],
      p_gather [Sp, Lp] source rows, p_mask [Sp, 1, Qp, Lp] causal, offset by the cached context.
    Source rows index the layer's flat cache [num_blocks * block_size, D], or the new tokens'
    latents [T, D] when there is no cache.
    """

    num_tokens: int
    all_decode: bool
    d_tokens: torch.Tensor | None = None
    d_gather: torch.Tensor | None = None
    d_mask: torch.Tensor | None = None
    p_tokens: torch.Tensor | None = None
    p_valid: torch.Tensor | None = None
    p_valid_flat: torch.Tensor | None = None
    p_tokens_valid: torch.Tensor | None = None
    p_gather: torch.Tensor | None = None
    p_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, md: AttentionMetadata, block_size: int | None) -> AttentionPlan:
        qlens = md.query_lens
        clens = md.context_lens_list
        device = md.query_start_loc.device
        num_tokens = sum(qlens)
        if block_size is None and any(q != c for q, c in zip(qlens, clens, strict=True)):
            raise ValueError("without a KV cache every sequence must be a whole prompt (query_len == context_len)")
        if block_size is not None and md.block_tables is None:
            raise ValueError("AttentionMetadata has no block_tables but a KV cache was given")
        dec = [i for i, q in enumerate(qlens) if q == 1]
        pre = [i for i, q in enumerate(qlens) if q > 1]
        plan = cls(num_tokens=num_tokens, all_decode=len(dec) == len(qlens))
        qsl = md.query_start_loc
        ctx = md.context_lens

        def gather_rows(seqs: torch.Tensor, length: int) -> torch.Tensor:
            kpos = torch.arange(length, device=device)
            if block_size is None:
                # the sequence's own new tokens; positions past the end clamp (masked anyway)
                lim = ctx[seqs].unsqueeze(1) - 1
                return qsl[seqs].unsqueeze(1) + torch.minimum(kpos.unsqueeze(0), lim)
            assert md.block_tables is not None
            tables = md.block_tables[seqs]
            blk = torch.clamp(kpos // block_size, max=tables.shape[1] - 1)
            return tables[:, blk] * block_size + (kpos % block_size)

        if dec:
            ld = max(clens[i] for i in dec)
            if plan.all_decode:
                seqs = torch.arange(len(qlens), device=device)
                plan.d_tokens = None  # token order == sequence order
            else:
                seqs = torch.tensor(dec, dtype=torch.long, device=device)
                plan.d_tokens = qsl[seqs]
            plan.d_gather = gather_rows(seqs, ld)
            kpos = torch.arange(ld, device=device)
            plan.d_mask = (kpos.unsqueeze(0) < ctx[seqs].unsqueeze(1)).view(len(dec), 1, 1, ld)
        if pre:
            seqs = torch.tensor(pre, dtype=torch.long, device=device)
            qp = max(qlens[i] for i in pre)
            lp = max(clens[i] for i in pre)
            qlen_t = qsl[seqs + 1] - qsl[seqs]
            j = torch.arange(qp, device=device).unsqueeze(0)
            valid = j < qlen_t.unsqueeze(1)
            jc = torch.minimum(j, qlen_t.unsqueeze(1) - 1)
            plan.p_tokens = qsl[seqs].unsqueeze(1) + jc
            plan.p_valid = valid
            plan.p_valid_flat = valid.reshape(-1)
            plan.p_tokens_valid = plan.p_tokens[valid]
            qabs = ctx[seqs].unsqueeze(1) - qlen_t.unsqueeze(1) + jc  # absolute position of each query
            kpos = torch.arange(lp, device=device)
            plan.p_mask = (kpos.view(1, 1, lp) <= qabs.unsqueeze(2)).unsqueeze(1)
            plan.p_gather = gather_rows(seqs, lp)
        return plan
