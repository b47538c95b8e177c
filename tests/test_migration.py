"""Live expert migration: the model's in-place expert swap, the transfer plan, the single-process unit's load,
and a 2 x 2 unit on the simulated cluster (gloo) that stages from peers and the checkpoint while it serves.

The unit starts from a placement that leaves two experts of every MoE layer unhosted (their slots
hold copies of others), so moving to a full placement reads those from the checkpoint while the
other gains come from peers; its checkpoint is a copy the staging-error test corrupts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from raymoe.engine.config import EngineConfig
from raymoe.engine.llm_engine import LLMEngine
from raymoe.engine.model_runner import ModelRunner
from raymoe.engine.sampling_params import SamplingParams
from raymoe.eplb import Placement, rebalance
from raymoe.eplb.migration import ExpertHost, MigrationError
from raymoe.llm import LLM
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MoE, Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import (
    INDEX_FILE,
    CheckpointReader,
    _block_size,
    checkpoint_name,
    load_checkpoint,
    read_tensor,
)
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor, UnitFailure, initial_placement
from raymoe.parallel.migration import hosted_sets, plan_migration
from raymoe.parallel.testing import check_against_reference, make_input
from raymoe.parallel.topology import Topology

BLOCK = 8
BLOCKS = 64
MISSING = 2  # experts per MoE layer the unit starts without
PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "MoE on Ray: experts everywhere, attention in groups"]


# --- the model's side: experts replaced in the stack's rows --------------------------------------------------


def _stack_weights(moe: MoE, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = moe.experts[e]
    assert m is not None
    return torch.cat((m.gate_proj.weight, m.up_proj.weight)).t(), m.down_proj.weight.t()


def test_replace_experts_copies_into_the_stack_in_place() -> None:
    config = ModelConfig.from_checkpoint(default_checkpoint())
    torch.manual_seed(0)
    full = MoE(config)  # every expert: where the new weights come from, and the reference output
    for p in full.parameters():
        p.data.normal_(0, 0.05)
    part = MoE(config, hosted=[0, 1, 2])
    part.load_state_dict(full.state_dict(), strict=False)
    part.stack_rows = 4  # one free row
    st = part.expert_stack()
    assert st is not None and st.w13.shape[0] == 4
    storage = (st.w13.data_ptr(), st.w2.data_ptr())
    # drop 1, add 5 and 9: one into the freed row, one into the free row
    part.replace_experts({e: _stack_weights(full, e) for e in (5, 9)}, drop=[1])
    assert part.hosted_experts == [0, 2, 5, 9]
    after = part.expert_stack()
    assert after is not None and (after.w13.data_ptr(), after.w2.data_ptr()) == storage
    x = torch.randn(7, config.hidden_size)
    ids = torch.tensor([[0, 5], [9, 2], [5, 9], [0, 2], [9, 9], [2, 5], [0, 0]])
    w = torch.rand(7, 2)
    ref = MoE(config, hosted=[0, 2, 5, 9])
    ref.load_state_dict(full.state_dict(), strict=False)
    torch.testing.assert_close(part.expert_forward(x, ids, w), ref.expert_forward(x, ids, w), rtol=0, atol=0)
    # the modules name the new weights (state_dict, later restacks): views of the rows written
    assert torch.equal(part.experts[9].down_proj.weight, full.experts[9].down_proj.weight)
    with pytest.raises(ValueError, match="free rows"):
        part.replace_experts({e: _stack_weights(full, e) for e in (10, 11)}, drop=[])
    assert part.hosted_experts == [0, 2, 5, 9]  # a refused replacement changes nothing


def test_plan_sources_rounds_and_disk() -> None:
    """Gains come from a holder (same node first), unhosted experts from the checkpoint, rounds within the bound."""
    topo = Topology(nodes=2, gpus_per_node=2, attention_tp=1, slots_per_gpu=2, num_experts=6)
    old = np.array([[0, 1, 2, 3, 4, 5, 0, 1]])  # GPU 3 holds 0 and 1; expert 2 on GPU 1 only
    new = np.array([[0, 2, 1, 3, 4, 5, 2, 3]])  # GPUs 0 and 1 swap 1 and 2 (same node); GPU 3 gains 2 and 3
    plan = plan_migration(old, new, topo, expert_bytes=10, bytes_in_flight=15)
    flat = [t for r in plan.rounds for t in r]
    assert {(t.dst, t.expert, t.src) for t in flat} == {(0, 2, 1), (1, 1, 0), (3, 2, 1), (3, 3, 1)}  # 1 on GPUs 0, 3
    assert plan.disk == [] and plan.copies == 4
    for r in plan.rounds:  # one copy per rank per round at a 15-byte bound with 10-byte experts
        ranks = [x for t in r for x in (t.src, t.dst)]
        assert len(ranks) == len(set(ranks))
    assert len(plan.rounds) == 4  # every copy involves GPU 1
    assert len(plan_migration(old, new, topo, expert_bytes=10, bytes_in_flight=100).rounds) == 1
    gone = np.array([[0, 1, 0, 3, 4, 5, 1, 3]])  # expert 2 hosted nowhere: read from the checkpoint
    plan = plan_migration(gone, new, topo, expert_bytes=10, bytes_in_flight=1 << 20)
    assert {(t.dst, t.expert) for t in plan.disk} == {(0, 2), (3, 2)}
    assert [(t.dst, t.expert, t.src) for r in plan.rounds for t in r] == [(1, 1, 0)]
    assert plan_migration(old, new, topo, 10, 15) == plan_migration(old, new, topo, 10, 15)  # same on every rank


def test_single_process_runner_records_load() -> None:
    model = load_checkpoint(default_checkpoint(), progress=False)
    runner = ModelRunner(model, num_kv_blocks=16, block_size=BLOCK)  # make_input: 8 blocks per sequence
    assert isinstance(runner, ExpertHost) and runner.placement is None and runner.placement_version == 0
    inp = make_input([[5, 6, 7, 8], [9, 10]], [0, 0], block_size=BLOCK)
    runner.execute([inp])
    load = runner.expert_load()
    top_k = model.config.num_experts_per_tok
    assert load.shape == (len(model.config.moe_layers), model.config.n_routed_experts)
    assert (load.sum(axis=1) == 6 * top_k).all()  # 6 tokens, top_k assignments each, every MoE layer
    with pytest.raises(RuntimeError, match="nothing to migrate"):
        runner.begin_migration(Placement.from_phy2log(np.zeros((2, 64), dtype=np.int64), 64, 1, 1, 64))
    assert runner.commit_idle() is None and not runner.migration_status().staging


# --- a 2 x 2 unit -------------------------------------------------------------------------------------------


def without(p: Placement, experts: list[int]) -> Placement:
    """`p` with every slot of `experts` given to a copy of an expert its GPU does not hold yet."""
    phy, k = p.phy2log.copy(), p.slots_per_gpu
    for j in range(phy.shape[0]):
        for slot in np.flatnonzero(np.isin(phy[j], experts)).tolist():
            g = slot // k
            here = set(phy[j, g * k : (g + 1) * k].tolist())
            phy[j, slot] = next(e for e in range(p.num_experts) if e not in here and e not in experts)
    return Placement.from_phy2log(phy, p.num_experts, p.num_nodes, p.gpus_per_node, k, p.mode)


def swapped(p: Placement, pairs: list[tuple[int, int]]) -> Placement:
    """`p` with the experts of GPU a's and GPU b's first slot they do not share exchanged, for each (a, b)."""
    phy, k = p.phy2log.copy(), p.slots_per_gpu
    for j in range(phy.shape[0]):
        for a, b in pairs:
            sa, sb = phy[j, a * k : (a + 1) * k], phy[j, b * k : (b + 1) * k]
            i = next(i for i in range(k) if sa[i] not in sb)
            m = next(m for m in range(k) if sb[m] not in sa and sb[m] != sa[i])
            sa[i], sb[m] = sb[m], sa[i]
    return Placement.from_phy2log(phy, p.num_experts, p.num_nodes, p.gpus_per_node, k, p.mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migration") / "tiny"
    shutil.copytree(default_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def reference() -> Transformer:
    return load_checkpoint(default_checkpoint(), progress=False)


@pytest.fixture(scope="module")
def full(checkpoint: Path) -> Placement:
    model = ModelConfig.from_checkpoint(checkpoint)
    return initial_placement(Topology.from_config(ParallelConfig(nodes=2, gpus_per_node=2, slots_per_gpu=17), model),
                             model, node_limited=True)


@pytest.fixture(scope="module")
def missing(full: Placement) -> list[int]:
    return np.flatnonzero((full.replica_count == 1).all(axis=0))[:MISSING].tolist()


@pytest.fixture(scope="module")
def unit(ray_cluster, checkpoint: Path, full: Placement, missing: list[int]) -> Iterator[ExpertParallelExecutor]:
    # one expert copy (192 KiB) per rank and transfer round: the peer copies take several rounds
    cfg = ParallelConfig(
        nodes=2, gpus_per_node=2, slots_per_gpu=17, migration_bytes_in_flight=256 << 10, collective_timeout_s=30,
    )
    engine = EngineConfig(model=str(checkpoint), kv_cache_tokens=BLOCKS * BLOCK, block_size=BLOCK)
    unit = ExpertParallelExecutor(engine, cfg, placement=without(full, missing))
    yield unit
    unit.shutdown()


def _hosted(unit: ExpertParallelExecutor) -> list[dict[int, list[int]]]:
    return unit._gather([w.hosted_experts.remote() for w in unit.workers])


def test_staging_error_keeps_the_placement(unit: ExpertParallelExecutor, full: Placement, missing: list[int],
                                           checkpoint: Path) -> None:
    """A gained expert whose tensors the checkpoint lost: reported, the old placement stays, the unit serves."""
    index = checkpoint / INDEX_FILE
    original = index.read_text()
    layer = unit.model_config.moe_layers[0]
    data = json.loads(original)
    data["weight_map"] = {
        k: v for k, v in data["weight_map"].items() if f"layers.{layer}.mlp.experts.{missing[0]}." not in k
    }
    index.write_text(json.dumps(data))
    before, hosted = unit.placement, _hosted(unit)
    try:
        unit.begin_migration(full)
        with pytest.raises(RuntimeError, match="in flight"):
            unit.begin_migration(full)
        deadline = time.monotonic() + 60
        while (status := unit.migration_status()).staging and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        index.write_text(original)
    assert not status.staging and not status.pending_commit
    assert status.error is not None and "missing tensor" in status.error and f"experts.{missing[0]}." in status.error
    assert status.placement_version == 0 and unit.placement is before and _hosted(unit) == hosted
    out = unit.execute([make_input([[5, 6, 7]], [0], block_size=BLOCK)] + [None] * (unit.dp_size - 1))
    assert out[0] is not None and len(out[0].token_ids) == 1  # still serving
    index.write_text(json.dumps(data))
    try:
        with pytest.raises(MigrationError, match="missing tensor"):  # `migrate` says so too
            unit.migrate(full, timeout_s=60)
    finally:
        index.write_text(original)
    assert unit.placement_version == 0 and _hosted(unit) == hosted


def test_staged_weights_bit_identical(unit: ExpertParallelExecutor, full: Placement, missing: list[int],
                                      reference: Transformer, checkpoint: Path) -> None:
    """Gains from peers (cross- and same-node swaps) and from the checkpoint (unhosted experts) land in the
    expert stacks bit for bit as the checkpoint has them, in place; outputs then match the single-process model."""
    target = swapped(full, [(0, 3), (1, 2), (0, 1)])
    old = unit.placement
    storage = unit._gather([w.expert_storage.remote() for w in unit.workers])
    result = unit.migrate(target, timeout_s=120)
    plan = plan_migration(old.phy2log, target.phy2log, unit.topo, 1, 1)
    assert result.from_disk == plan.from_disk == MISSING * len(unit.model_config.moe_layers)  # one copy each
    assert result.from_peers == plan.from_peers > 0 and result.moved == plan.copies
    assert result.placement_version == unit.placement_version == 1 and unit.placement is target
    assert result.bytes == result.moved * 3 * 256 * 64 * 4 and result.stage_s > 0 and result.commit_s > 0
    assert unit._gather([w.expert_storage.remote() for w in unit.workers]) == storage  # no stack rebuilt
    new_sets = hosted_sets(target.phy2log, unit.topo)
    for r, h in enumerate(_hosted(unit)):
        for j, layer in enumerate(unit.model_config.moe_layers):
            assert h[layer] == sorted(new_sets[j][r])
    reader = CheckpointReader(checkpoint)
    block = _block_size(unit.model_config)
    gains = [t for rnd in plan.rounds for t in rnd] + plan.disk
    for t in gains:
        layer = unit.model_config.moe_layers[t.layer]
        got = unit._gather([unit.workers[t.dst].expert_weights.remote(layer, t.expert)])[0]
        for name, tensor in got.items():
            want = read_tensor(reader, checkpoint_name(f"layers.{layer}.mlp.experts.{t.expert}.{name}"),
                               tuple(tensor.shape), block)
            assert torch.equal(tensor, want.to(tensor.dtype)), (t, name)
    reader.close()
    check_against_reference(unit, reference, block_size=BLOCK, num_blocks=BLOCKS, steps=1)


def test_greedy_outputs_span_a_migration(unit: ExpertParallelExecutor, checkpoint: Path) -> None:
    """Requests decoding while hot experts get more copies: tokens equal the single-process engine's; every
    rank committed at the start of the same step (the workers' own step counters)."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ref = LLM(model=str(default_checkpoint()), kv_cache_tokens=512, block_size=BLOCK)
    want = [o.token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    ref.shutdown()
    engine = LLMEngine(EngineConfig(model=str(checkpoint), kv_cache_tokens=BLOCKS * BLOCK, block_size=BLOCK),
                       executor=unit)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids

    for _ in range(3):
        step()
    load = np.ones((2, 64))
    placement = unit.placement
    hot = [np.flatnonzero(placement.replica_count[j] == 1)[:4] for j in range(2)]
    for j in range(2):
        load[j, hot[j]] = 40.0
    plan = rebalance(load, 2, 2, 17, 8, previous=placement)
    version = unit.placement_version
    unit.begin_migration(plan)
    steps_during = 0
    while unit.placement_version == version:
        assert engine.has_unfinished_requests(), "the requests ended before the migration committed"
        step()
        steps_during += 1
        assert steps_during < 200
    assert unit.last_migration is not None and unit.last_migration.from_peers > 0
    while engine.has_unfinished_requests():
        step()
    assert [tokens[str(i)] for i in range(len(PROMPTS))] == want
    status = unit.worker_migration_status()
    assert len({s.steps for s in status}) == 1
    assert {s.placement_version for s in status} == {version + 1}
    assert len({s.committed_at_step for s in status}) == 1 and status[0].committed_at_step is not None


def test_worker_killed_while_staging_fails_fast(unit: ExpertParallelExecutor, full: Placement) -> None:
    """Last in this module: SIGKILL a worker right after staging started; the unit fails at once, no hang."""
    rng = np.random.default_rng(0)
    load = rng.gamma(0.5, size=(2, 64)) + 0.01
    plan = rebalance(load, 2, 2, 17, 8)  # a fresh plan: most slots change, many rounds of peer copies
    assert plan.num_moves_from(unit.placement) > 50
    pids = unit.worker_pids()
    unit.begin_migration(plan)
    assert unit.migration_status().staging  # still staging when the worker dies
    os.kill(pids[3], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(UnitFailure, match=r"rank 3 \(node 1, GPU 1\) died"):
        while time.monotonic() - t0 < 60:
            unit.migration_status()
            time.sleep(0.05)
    assert time.monotonic() - t0 < 30
    with pytest.raises(UnitFailure, match="unit is down"):
        unit.migration_status()
