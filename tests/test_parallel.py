"""Expert-parallel runtime on the simulated cluster (2 nodes x 4 "GPUs", CPU workers, gloo).

The unit's logits and greedy tokens must match the single-process model; one unit per
configuration is built per module and reused (workers start in seconds, but 8 of them share 2 cores).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from raymoe.engine.executor import ModelInput, SamplingMetadata
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor, UnitFailure

BLOCK = 8
BLOCKS = 64
PROMPT_LENS = [[5, 11], [3], [], [9, 2, 7]]  # per DP rank; rank 2 idle (an empty batch)


def greedy(n: int) -> SamplingMetadata:
    return SamplingMetadata(
        temperatures=torch.zeros(n), top_ps=torch.ones(n), top_ks=torch.zeros(n, dtype=torch.long),
        seeds=[None] * n, output_indices=[0] * n, all_greedy=True, needs_logprobs=False, any_top_p=False,
        any_top_k=False,
    )


def make_input(tokens: list[list[int]], starts: list[int]) -> ModelInput | None:
    """New tokens of each sequence (sequence s owns blocks [s*8, s*8+8)), appended after `starts` cached ones."""
    if not tokens:
        return None
    ids, pos, slots, sample = [], [], [], []
    tables = torch.zeros(len(tokens), 8, dtype=torch.long)
    for s, (toks, start) in enumerate(zip(tokens, starts, strict=True)):
        tables[s] = torch.arange(s * 8, s * 8 + 8)
        for j, t in enumerate(toks):
            p = start + j
            ids.append(t)
            pos.append(p)
            slots.append(int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK)
        sample.append(len(ids) - 1)
    return ModelInput(
        input_ids=torch.tensor(ids), positions=torch.tensor(pos), query_lens=[len(t) for t in tokens],
        context_lens=[s + len(t) for t, s in zip(tokens, starts, strict=True)], block_tables=tables,
        slot_mapping=torch.tensor(slots), sample_indices=torch.tensor(sample), sampling=greedy(len(tokens)),
    )


@pytest.fixture(scope="module")
def reference() -> Transformer:
    return load_checkpoint(default_checkpoint(), progress=False)


def reference_logits(model: Transformer, caches: list[torch.Tensor], inputs: list[ModelInput | None]) -> list:
    out = []
    with torch.inference_mode():
        for cache, inp in zip(caches, inputs, strict=True):
            if inp is None:
                out.append(None)
                continue
            h = model(inp.input_ids, inp.positions, inp.attention_metadata(), cache)
            out.append(model.compute_logits(h[inp.sample_indices]))
    return out


def check_against_reference(unit: ExpertParallelExecutor, model: Transformer, steps: int = 2) -> None:
    """A prefill of prompts of different lengths on every DP rank (one idle), then decode steps: logits within 1e-4."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    lens = PROMPT_LENS[: unit.dp_size] if unit.dp_size > 1 else [[5, 11, 3]]
    prompts = [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in rank] for rank in lens]
    caches = [torch.zeros(model.kv_cache_shape(BLOCKS, BLOCK)) for _ in prompts]
    inputs = [make_input(p, [0] * len(p)) for p in prompts]
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
        inputs = [None if n is None else make_input(n, done[d]) for d, n in enumerate(nxt)]
        done = [[c + 1 for c in row] for row in done]


@pytest.fixture(scope="module")
def unit_2x4(ray_cluster) -> Iterator[ExpertParallelExecutor]:
    cfg = ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=2, slots_per_gpu=9, node_limited=True)
    unit = ExpertParallelExecutor(str(default_checkpoint()), cfg, num_kv_blocks=BLOCKS, block_size=BLOCK)
    yield unit
    unit.shutdown()


def test_topology_2x4(unit_2x4: ExpertParallelExecutor) -> None:
    topo = unit_2x4.topo
    assert (topo.dp_size, topo.world_size, topo.slots_per_gpu, topo.redundant_slots) == (4, 8, 9, 8)
    assert [topo.attention_group(d) for d in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # every logical expert is hosted somewhere; replicas never share a GPU
    phy = unit_2x4.placement.phy2log
    assert all(len(set(row.tolist())) == 64 for row in phy)
    per_gpu = phy.reshape(phy.shape[0], 8, 9)
    assert all(len(set(g.tolist())) == 9 for layer in per_gpu for g in layer)
    # node-limited: each expert group's replicas all sit on one node
    assert unit_2x4.placement.regime == "hierarchical"
    nodes = unit_2x4.placement.nodes_of_experts()  # [layers, experts, nodes]
    groups = nodes.reshape(nodes.shape[0], 8, 8, 2).any(axis=2)
    assert (groups.sum(-1) == 1).all()


@pytest.mark.parametrize(
    ("overlap", "choice", "hierarchical"),
    [(False, "static", True), (True, "balanced", True), (False, "balanced", False), (True, "static", False)],
)
def test_unit_matches_single_process(
    unit_2x4: ExpertParallelExecutor, reference: Transformer, overlap: bool, choice: str, hierarchical: bool
) -> None:
    unit_2x4.set_options(overlap=overlap, replica_choice=choice, node_limited=hierarchical)
    check_against_reference(unit_2x4, reference)
    stats = unit_2x4.last_stats
    assert stats.bytes_intra_node > 0 and stats.bytes_inter_node > 0 and stats.busiest_gpu_tokens > 0
    load = unit_2x4.expert_load()
    assert load.shape == (2, 64) and load.sum() > 0


def test_placement_update_keeps_results(unit_2x4: ExpertParallelExecutor, reference: Transformer) -> None:
    """Hot experts (a skewed load) get more replicas: workers load them, switch together, results unchanged."""
    from raymoe.eplb.policy import rebalance

    old = unit_2x4.placement
    load = np.ones((2, 64))
    hot = [np.flatnonzero(old.replica_count[j] == 1)[:4] for j in range(2)]  # experts without a copy yet
    for j in range(2):
        load[j, hot[j]] = 40.0
    new = rebalance(load, 2, 4, 9, 8, previous=old)
    assert all((new.replica_count[j, hot[j]] > 1).all() for j in range(2))
    loaded = unit_2x4.update_placement(new)
    assert 0 < loaded <= new.num_moves_from(old)  # a slot may change to an expert its GPU already holds
    hosted = unit_2x4._gather([w.hosted_experts.remote() for w in unit_2x4.workers])
    for r, h in enumerate(hosted):
        for j, layer in enumerate(unit_2x4.model_config.moe_layers):
            assert h[layer] == sorted(set(new.phy2log[j, r * 9 : (r + 1) * 9].tolist()))
    unit_2x4.set_options(overlap=False, replica_choice="balanced", node_limited=True)
    check_against_reference(unit_2x4, reference, steps=1)


def test_dead_worker_fails_fast(unit_2x4: ExpertParallelExecutor) -> None:
    """Last in this module: SIGKILL one worker; the next step raises a clear error instead of hanging."""
    pids = unit_2x4.worker_pids()
    os.kill(pids[5], signal.SIGKILL)
    inputs = [make_input([[5, 6, 7]], [0])] + [None] * (unit_2x4.dp_size - 1)
    t0 = time.monotonic()
    with pytest.raises(UnitFailure, match=r"rank 5 \(node 1, GPU 1\) died"):
        unit_2x4.execute(inputs)
    assert time.monotonic() - t0 < 60
    with pytest.raises(UnitFailure, match="unit is down"):
        unit_2x4.execute(inputs)
