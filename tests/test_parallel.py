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

from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor, UnitFailure
from raymoe.parallel.testing import check_against_reference, make_input, tiny_unit

BLOCK = 8
BLOCKS = 64


@pytest.fixture(scope="module")
def reference() -> Transformer:
    return load_checkpoint(default_checkpoint(), progress=False)


@pytest.fixture(scope="module")
def unit_2x4(ray_cluster) -> Iterator[ExpertParallelExecutor]:
    cfg = ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=2, slots_per_gpu=9, node_limited=True)
    unit = tiny_unit(cfg, kv_cache_tokens=BLOCKS * BLOCK - 1, block_size=BLOCK)  # rounded up to BLOCKS blocks
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
    assert unit_2x4.placement.mode == "hierarchical"
    nodes = unit_2x4.placement.nodes_of_experts()  # [layers, experts, nodes]
    groups = nodes.reshape(nodes.shape[0], 8, 8, 2).any(axis=2)
    assert (groups.sum(-1) == 1).all()


def test_kv_cache_sized_on_workers(unit_2x4: ExpertParallelExecutor) -> None:
    """Workers report the tokens that fit beside their weights; every rank gets ceil(smallest / block) blocks."""
    assert unit_2x4.num_kv_blocks == BLOCKS
    config = unit_2x4.model_config
    last = unit_2x4.read_kv(unit_2x4.dp_size - 1, [BLOCKS - 1])  # the last block exists on the workers
    assert tuple(last.shape) == (config.num_hidden_layers, 1, BLOCK, config.kv_cache_dim)


@pytest.mark.parametrize(
    ("overlap", "choice", "hierarchical"),
    [(False, "static", True), (True, "balanced", True), (False, "balanced", False), (True, "static", False)],
)
def test_unit_matches_single_process(
    unit_2x4: ExpertParallelExecutor, reference: Transformer, overlap: bool, choice: str, hierarchical: bool
) -> None:
    unit_2x4.set_options(overlap=overlap, replica_choice=choice, node_limited=hierarchical)
    check_against_reference(unit_2x4, reference, block_size=BLOCK, num_blocks=BLOCKS)
    stats = unit_2x4.last_stats
    assert stats.bytes_intra_node > 0 and stats.bytes_inter_node > 0 and stats.busiest_gpu_tokens > 0
    load = unit_2x4.expert_load()
    assert load.shape == (2, 64) and load.sum() > 0


def test_placement_update_keeps_results(unit_2x4: ExpertParallelExecutor, reference: Transformer) -> None:
    """Hot experts (a skewed load) get more replicas: workers fetch them from peers, switch together, results unchanged."""
    from raymoe.eplb.policy import rebalance

    old = unit_2x4.placement
    load = np.ones((2, 64))
    hot = [np.flatnonzero(old.replica_count[j] == 1)[:4] for j in range(2)]  # experts without a copy yet
    for j in range(2):
        load[j, hot[j]] = 40.0
    new = rebalance(load, 2, 4, 9, 8, previous=old)
    assert all((new.replica_count[j, hot[j]] > 1).all() for j in range(2))
    result = unit_2x4.migrate(new)
    assert 0 < result.moved <= new.num_moves_from(old)  # a slot may change to an expert its GPU already holds
    assert result.from_peers == result.moved and result.from_disk == 0  # every expert had a host: peers send
    assert unit_2x4.placement is new and unit_2x4.placement_version == 1
    hosted = unit_2x4._gather([w.hosted_experts.remote() for w in unit_2x4.workers])
    for r, h in enumerate(hosted):
        for j, layer in enumerate(unit_2x4.model_config.moe_layers):
            assert h[layer] == sorted(set(new.phy2log[j, r * 9 : (r + 1) * 9].tolist()))
    unit_2x4.set_options(overlap=False, replica_choice="balanced", node_limited=True)
    check_against_reference(unit_2x4, reference, block_size=BLOCK, num_blocks=BLOCKS, steps=1)


def test_dead_worker_fails_fast(unit_2x4: ExpertParallelExecutor) -> None:
    """Last in this module: SIGKILL one worker; the next step raises a clear error instead of hanging."""
    pids = unit_2x4.worker_pids()
    os.kill(pids[5], signal.SIGKILL)
    inputs = [make_input([[5, 6, 7]], [0], block_size=BLOCK)] + [None] * (unit_2x4.dp_size - 1)
    t0 = time.monotonic()
    with pytest.raises(UnitFailure, match=r"rank 5 \(node 1, GPU 1\) died"):
        unit_2x4.execute(inputs)
    assert time.monotonic() - t0 < 60
    with pytest.raises(UnitFailure, match="unit is down"):
        unit_2x4.execute(inputs)
