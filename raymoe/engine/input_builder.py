"""The host side of a step: one rank's scheduled batch as the tensors the executor runs (nano-vllm's prepare).

Built on the engine's process and shipped as a `ModelInput` of CPU tensors, so the same input goes
to the local runner or, pickled, to an expert-parallel unit's workers. Per decoding sequence this
is a few list appends; a prefill chunk's positions and slots are computed with numpy in one go.
"""

from __future__ import annotations

import numpy as np
import torch

from raymoe.engine.executor import ModelInput, SamplingMetadata
from raymoe.engine.scheduler import ScheduledBatch
from raymoe.engine.sequence import Sequence


def build_model_input(batch: ScheduledBatch, block_size: int) -> ModelInput:
    """The flat variable-length batch of one rank: ids, positions, cache slots, block tables, sampling rows."""
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qlens: list[int] = []
    clens: list[int] = []
    sample_idx: list[int] = []
    sampled: list[Sequence] = []
    width = max(len(s.block_table) for s in batch.seqs)
    tables = np.zeros((len(batch.seqs), width), dtype=np.int64)
    t = 0
    for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        c = seq.num_computed_tokens
        table = seq.block_table
        tables[row, : len(table)] = table
        if n == 1:
            ids.append(seq.token_ids[c])
            positions.append(c)
            slots.append(table[c // bs] * bs + c % bs)
        else:
            ids.extend(seq.token_ids[c : c + n])
            pos = np.arange(c, c + n)
            positions.extend(pos.tolist())
            slots.extend((tables[row, pos // bs] * bs + pos % bs).tolist())
        qlens.append(n)
        clens.append(c + n)
        t += n
        if c + n == len(seq.token_ids):
            sample_idx.append(t - 1)
            sampled.append(seq)
    sampling = None
    if sampled:
        params = [s.params for s in sampled]
        temps = [p.temperature for p in params]
        all_greedy = not any(temps)
        sampling = SamplingMetadata(
            temperatures=torch.tensor(temps, dtype=torch.float32),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.long),
            seeds=[p.seed for p in params],
            output_indices=[s.num_output_tokens for s in sampled],
            all_greedy=all_greedy,
            needs_logprobs=any(p.logprobs for p in params),
            any_top_p=not all_greedy and any(p.top_p < 1.0 for p in params),
            any_top_k=not all_greedy and any(p.top_k > 0 for p in params),
        )
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        query_lens=qlens,
        context_lens=clens,
        block_tables=torch.from_numpy(tables),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        sample_indices=torch.tensor(sample_idx, dtype=torch.long),
        sampling=sampling,
    )
