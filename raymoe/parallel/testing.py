"""Units and hand-built batches on the tiny checkpoint, and the check against the single-process model.

Shared by `tests/test_parallel*.py` and `benchmarks/bench_parallel.py` (which cannot import the
tests package): each sequence of a batch owns a fixed run of cache blocks, so a batch can be
built without a block manager and replayed on the unit and on the reference alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from raymoe.engine.config import EngineConfig
from raymoe.engine.executor import ModelInput, SamplingMetadata
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor

BLOCKS_PER_SEQ = 8
PROMPT_LENS = [[5, 11], [3], [], [9, 2, 7]]  # per DP rank of check_against_reference; rank 2 idle (an empty batch)


@contextmanager
def simulated_cluster(nodes: int = 2, gpus_per_node: int = 4, cpus_per_node: int = 2) -> Iterator[str]:
    """A Ray cluster on this machine whose nodes declare GPUs they do not have (workers run on CPU,
    gloo), connected to and torn down around the block; yields its address (never discovered)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "num_gpus": 0, "include_dashboard": False}
    )
    for i in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node, resources={f"sim_node_{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def tiny_unit(parallel: ParallelConfig, *, kv_cache_tokens: int, block_size: int) -> ExpertParallelExecutor:
    """A unit over the tiny checkpoint with `kv_cache_tokens` of latent cache per DP rank (whole blocks)."""
    engine = EngineConfig(model=str(default_checkpoint()), kv_cache_tokens=kv_cache_tokens, block_size=block_size)
    return ExpertParallelExecutor(engine, parallel)


def greedy(n: int) -> SamplingMetadata:
    return SamplingMetadata(
        temperatures=torch.zeros(n), top_ps=torch.ones(n), top_ks=torch.zeros(n, dtype=torch.long),
        seeds=[None] * n, output_indices=[0] * n, all_greedy=True, needs_logprobs=False, any_top_p=False,
        any_top_k=False,
    )


def make_input(tokens: list[list[int]], starts: list[int], *, block_size: int, first_seq: int = 0) -> ModelInput:
    """New tokens of sequences first_seq.. (sequence s owns blocks [s*8, s*8+8)) after `starts` cached tokens each."""
    ids, pos, slots, sample = [], [], [], []
    tables = torch.zeros(len(tokens), BLOCKS_PER_SEQ, dtype=torch.long)
    for s, (toks, start) in enumerate(zip(tokens, starts, strict=True)):
        tables[s] = torch.arange(BLOCKS_PER_SEQ) + (first_seq + s) * BLOCKS_PER_SEQ
        for j, t in enumerate(toks):
            p = start + j
            ids.append(t)
            pos.append(p)
            slots.append(int(tables[s, p // block_size]) * block_size + p % block_size)
        sample.append(len(ids) - 1)
    return ModelInput(
        input_ids=torch.tensor(ids), positions=torch.tensor(pos), query_lens=[len(t) for t in tokens],
        context_lens=[s + len(t) for t, s in zip(tokens, starts, strict=True)], block_tables=tables,
        slot_mapping=torch.tensor(slots), sample_indices=torch.tensor(sample), sampling=greedy(len(tokens)),
    )


def reference_logits(
    model: Transformer, caches: list[torch.Tensor], inputs: list[ModelInput | None]
) -> list[torch.Tensor | None]:
    """Each DP rank's batch through the whole single-process model, over that rank's own cache."""
    out: list[torch.Tensor | None] = []
    with torch.inference_mode():
        for cache, inp in zip(caches, inputs, strict=True):
            if inp is None:
                out.append(None)
                continue
            h = model(inp.input_ids, inp.positions, inp.attention_metadata(), cache)
            out.append(model.compute_logits(h[inp.sample_indices]))
    return out


def check_against_reference(
    unit: ExpertParallelExecutor, model: Transformer, *, block_size: int, num_blocks: int, steps: int = 2
) -> None:
    """A prefill of prompts of different lengths on every DP rank (one idle), then decode steps: logits within 1e-4."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    lens = PROMPT_LENS[: unit.dp_size] if unit.dp_size > 1 else [[5, 11, 3]]
    prompts = [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in rank] for rank in lens]
    caches = [torch.zeros(model.kv_cache_shape(num_blocks, block_size)) for _ in prompts]

    def batch(tokens: list[list[int]], starts: list[int]) -> ModelInput | None:
        return make_input(tokens, starts, block_size=block_size) if tokens else None

    inputs = [batch(p, [0] * len(p)) for p in prompts]
    done = [[len(t) for t in p] for p in prompts]
    for step in range(steps + 1):
        got = unit.compute_logits(inputs)
        want = reference_logits(model, caches, inputs)
        for d, (a, b) in enumerate(zip(got, want, strict=True)):
            if b is None:
                assert a is None
                continue
            err = (a - b).abs().max().item()
            assert err <= 1e-4, f"step {step} rank {d}: logits differ by {err:.2e}"
            assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        if step == steps:
            break
        nxt = [None if b is None else [[t] for t in b.argmax(-1).tolist()] for b in want]
        inputs = [None if n is None else batch(n, done[d]) for d, n in enumerate(nxt)]
        done = [[c + 1 for c in row] for row in done]
