"""Placement policy, replica choice and load recorder: properties over random shapes and loads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.eplb import ExpertLoadRecorder, Placement, choose_replicas, gpu_token_counts, rebalance

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes_and_loads(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, int]:
    num_nodes = draw(st.integers(1, 3))
    gpus_per_node = draw(st.integers(1, 4))
    num_groups = draw(st.sampled_from([1, 2, 4]))
    group_size = draw(st.integers(1, 4))
    n_exp = num_groups * group_size
    num_gpus = num_nodes * gpus_per_node
    min_k = -(-n_exp // num_gpus)
    if min_k > n_exp:
        min_k = n_exp
    k = draw(st.integers(min_k, min(n_exp, min_k + 2)))
    layers = draw(st.integers(1, 3))
    skew = draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    load = (1.0 / (rng.permuted(np.tile(np.arange(1, n_exp + 1), (layers, 1)), axis=1) ** skew)) * 1000
    if draw(st.booleans()):
        load[0] = 0.0  # a layer without traffic still needs a valid plan
    return load, num_nodes, gpus_per_node, k, num_groups


def gpu_loads(phy2log: np.ndarray, load: np.ndarray, num_gpus: int, k: int) -> np.ndarray:
    """[layers, gpus] tokens per GPU, each expert's tokens split evenly over its replicas (computed here,
    not with the Placement's own methods)."""
    out = np.zeros((len(phy2log), num_gpus))
    for layer, row in enumerate(phy2log):
        replicas = np.bincount(row, minlength=load.shape[1])
        out[layer] = (load[layer][row] / replicas[row]).reshape(num_gpus, k).sum(1)
    return out


def imbalance_of(phy2log: np.ndarray, load: np.ndarray, num_gpus: int, k: int) -> np.ndarray:
    """[layers] busiest GPU / mean GPU tokens (1.0 without load)."""
    gpu = gpu_loads(phy2log, load, num_gpus, k)
    mean = gpu.mean(1)
    return np.where(mean > 0, gpu.max(1) / np.where(mean > 0, mean, 1.0), 1.0)


def check_plan(plan: Placement, n_exp: int) -> None:
    layers, slots = plan.phy2log.shape
    num_gpus = plan.num_gpus
    assert slots == num_gpus * plan.slots_per_gpu
    assert plan.phy2log.min() >= 0 and plan.phy2log.max() < n_exp
    counts = np.stack([np.bincount(row, minlength=n_exp) for row in plan.phy2log])
    assert (counts >= 1).all(), "every logical expert needs a replica"
    assert (counts.sum(1) == slots).all()
    np.testing.assert_array_equal(plan.replica_count, counts)
    per_gpu = plan.phy2log.reshape(layers, num_gpus, plan.slots_per_gpu)
    for layer in range(layers):
        for g in range(num_gpus):
            assert len(set(per_gpu[layer, g].tolist())) == plan.slots_per_gpu, "two replicas of one expert on a GPU"
        for e in range(n_exp):
            row = plan.log2phy[layer, e]
            phys = row[row >= 0]
            assert sorted(phys.tolist()) == np.flatnonzero(plan.phy2log[layer] == e).tolist()
            assert (row[len(phys):] == -1).all()


def groups_on_one_node(plan: Placement, num_groups: int) -> bool:
    """Whether every expert group's replicas all sit on one node, in every layer."""
    node_of_slot = np.arange(plan.num_slots) // (plan.gpus_per_node * plan.slots_per_gpu)
    group = plan.phy2log // (plan.num_experts // num_groups)
    return all(
        len(set(node_of_slot[group[layer] == gr].tolist())) == 1
        for layer in range(plan.num_layers)
        for gr in range(num_groups)
    )


@FAST
@given(shapes_and_loads())
def test_plans_satisfy_every_constraint(case: tuple[np.ndarray, int, int, int, int]) -> None:
    load, nodes, gpn, k, groups = case
    plan = rebalance(load, nodes, gpn, k, groups)
    check_plan(plan, load.shape[1])
    if plan.mode == "hierarchical":
        assert groups_on_one_node(plan, groups), "hierarchical plans keep each expert group on one node"


def test_fresh_replica_counts_are_optimal_by_brute_force() -> None:
    """The replica counts minimise the largest per-replica load over every way to fill the slots
    (at most one replica of an expert per GPU), enumerated on tiny instances."""
    rng = np.random.default_rng(5)
    for gpus, k, n_exp in [(2, 2, 3), (3, 2, 4), (2, 3, 5), (4, 2, 5), (3, 3, 6), (4, 3, 7)]:
        for _ in range(5):
            w = np.round(rng.pareto(1.0, n_exp) * 100 + 1)
            plan = rebalance(w[None], 1, gpus, k, 1)
            counts = np.bincount(plan.phy2log[0], minlength=n_exp)
            best = min(
                float((w / np.array(c)).max())
                for c in itertools.product(range(1, gpus + 1), repeat=n_exp)
                if sum(c) == gpus * k
            )
            assert float((w / counts).max()) == pytest.approx(best)


@FAST
@given(shapes_and_loads())
def test_fresh_plan_no_single_swap_lowers_the_busiest_gpu(case: tuple[np.ndarray, int, int, int, int]) -> None:
    """The local search leaves no swap of two replicas between GPUs (of one node, where groups are
    kept on nodes) that would lower the busiest GPU by more than 0.1% of the mean."""
    load, nodes, gpn, k, groups = case
    plan = rebalance(load, nodes, gpn, k, groups)
    span = gpn if plan.mode == "hierarchical" else plan.num_gpus  # GPUs a swap may cross
    for layer in range(load.shape[0]):
        reps = np.bincount(plan.phy2log[layer], minlength=load.shape[1])
        slots = plan.phy2log[layer].reshape(plan.num_gpus, k)
        x = load[layer][slots] / reps[slots]
        gpu = x.sum(1)
        peak, tol = gpu.max(), 1e-3 * gpu.mean() + 1e-9
        for h, g in itertools.permutations(range(plan.num_gpus), 2):
            if h // span != g // span:
                continue
            for i, j in itertools.product(range(k), range(k)):
                if slots[h, i] in slots[g] or slots[g, j] in slots[h]:
                    continue
                after = gpu.copy()
                after[h] += x[g, j] - x[h, i]
                after[g] += x[h, i] - x[g, j]
                assert after.max() >= peak - tol, f"layer {layer}: swapping {h}/{i} with {g}/{j} lowers the peak"


@FAST
@given(shapes_and_loads(), st.floats(0.05, 0.5), st.integers(0, 2**16))
def test_replan_after_drift_is_valid_and_moves_less(
    case: tuple[np.ndarray, int, int, int, int], sigma: float, seed: int
) -> None:
    load, nodes, gpn, k, groups = case
    first = rebalance(load, nodes, gpn, k, groups)
    drifted = load * np.random.default_rng(seed).lognormal(0.0, sigma, load.shape)
    replan = rebalance(drifted, nodes, gpn, k, groups, previous=first)
    fresh = rebalance(drifted, nodes, gpn, k, groups)
    check_plan(replan, load.shape[1])
    assert replan.mode == first.mode
    if replan.mode == "hierarchical":
        assert groups_on_one_node(replan, groups)
    moved = int((replan.phy2log != first.phy2log).sum())
    assert moved <= int((fresh.phy2log != first.phy2log).sum())
    # every layer is within the tolerance (3%) of a fresh plan: anchored, or the fresh plan relabelled
    num_gpus = nodes * gpn
    assert (imbalance_of(replan.phy2log, drifted, num_gpus, k)
            <= imbalance_of(fresh.phy2log, drifted, num_gpus, k) * 1.03 + 1e-9).all()
    # applying the listed weight copies to the old plan gives the new one, each copy changing a slot
    moves = replan.moves_from(first)
    assert len(moves) == moved == replan.num_moves_from(first)
    rebuilt = first.phy2log.copy()
    for layer, gpu, slot, expert in moves:
        assert rebuilt[layer, gpu * k + slot] != expert
        rebuilt[layer, gpu * k + slot] = expert
    np.testing.assert_array_equal(rebuilt, replan.phy2log)


@pytest.mark.parametrize("seed", [139, 177])
def test_hierarchical_replan_after_a_large_drift(seed: int) -> None:
    """A drift that regroups every layer's expert groups onto other nodes (once a crash)."""
    rng = np.random.default_rng(seed)
    load = 1000.0 / rng.permuted(np.tile(np.arange(1, 17), (2, 1)), axis=1) ** 2.0
    first = rebalance(load, 2, 3, 4, 4)
    drifted = load * rng.lognormal(0.0, 1.0, load.shape)
    replan = rebalance(drifted, 2, 3, 4, 4, previous=first)
    fresh = rebalance(drifted, 2, 3, 4, 4)
    check_plan(replan, 16)
    assert replan.mode == "hierarchical" and groups_on_one_node(replan, 4)
    assert (imbalance_of(replan.phy2log, drifted, 6, 4) <= imbalance_of(fresh.phy2log, drifted, 6, 4) * 1.03).all()
    # a layer that takes the fresh plan takes it relabelled onto the old nodes and GPUs: fewer copies
    assert ((replan.phy2log != first.phy2log).sum(1) < (fresh.phy2log != first.phy2log).sum(1)).all()


def test_drift_replan_moves_a_fraction_of_a_fresh_plan() -> None:
    rng = np.random.default_rng(1)
    load = 1000.0 / (rng.permuted(np.tile(np.arange(1, 65), (8, 1)), axis=1) ** 1.0)
    first = rebalance(load, 2, 4, 9, 8)
    drifted = load * rng.lognormal(0.0, 0.2, load.shape)
    replan = rebalance(drifted, 2, 4, 9, 8, previous=first)
    fresh = rebalance(drifted, 2, 4, 9, 8)
    assert (replan.phy2log != first.phy2log).sum() < 0.5 * (fresh.phy2log != first.phy2log).sum()
    # mean over layers
    assert imbalance_of(replan.phy2log, drifted, 8, 9).mean() <= imbalance_of(fresh.phy2log, drifted, 8, 9).mean() * 1.02


def test_balances_better_than_no_redundancy() -> None:
    load = np.array([[1000.0] + [10.0] * 15])  # one hot expert: alone on a GPU it makes that GPU 3.5x the mean
    plan = rebalance(load, 1, 4, 5, 1)
    assert np.bincount(plan.phy2log[0], minlength=16)[0] == 4
    assert imbalance_of(plan.phy2log, load, 4, 5)[0] < 1.3


def test_shared_expert_as_an_always_selected_routed_expert() -> None:
    tokens = 900.0
    routed = np.full((1, 16), tokens * 8 / 16)
    load = np.concatenate([routed, [[tokens]]], axis=1)  # column 16 = the shared expert
    plan = rebalance(load, 1, 4, 5, 1, mode="global")
    counts = np.bincount(plan.phy2log[0], minlength=17)
    assert counts[16] == counts.max()


@pytest.mark.parametrize(
    ("load", "kwargs", "message"),
    [
        (np.full((2, 8), -1.0), {}, "negative"),
        (np.full((2, 8), np.nan), {}, "NaN"),
        (np.ones((2, 8)), {"slots_per_gpu": 1, "gpus_per_node": 2}, "too few slots"),
        (np.ones((2, 8)), {"num_groups": 3}, "does not divide"),
        (np.ones(8), {}, "2-D"),
        (np.ones((2, 8)), {"slots_per_gpu": 9}, "exceeds"),
        (np.ones((2, 8)), {"num_nodes": 0}, "num_nodes"),
    ],
)
def test_bad_input_raises_value_error(load: np.ndarray, kwargs: dict, message: str) -> None:
    args = {"num_nodes": 1, "gpus_per_node": 4, "slots_per_gpu": 2, "num_groups": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        rebalance(load, **args)


def test_hierarchical_refuses_a_shape_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="hierarchical"):
        rebalance(np.ones((1, 8)), 2, 2, 2, 1, mode="hierarchical")
    with pytest.raises(ValueError, match="mode"):
        rebalance(np.ones((1, 8)), 1, 4, 2, 1, mode="flat")


def test_mode_selects_hierarchical_or_global() -> None:
    load = np.arange(1.0, 33.0)[None, :]
    kwargs = {"num_nodes": 2, "gpus_per_node": 2, "slots_per_gpu": 10, "num_groups": 4}
    auto = rebalance(load, **kwargs)
    assert auto.mode == "hierarchical" and groups_on_one_node(auto, 4)
    flat = rebalance(load, **kwargs, mode="global")
    assert flat.mode == "global" and not groups_on_one_node(flat, 4)  # this load spreads groups over both nodes


@FAST
@given(shapes_and_loads(), st.integers(1, 200), st.integers(0, 2**16))
def test_replica_choice_serves_the_right_expert_and_balanced_never_loses(
    case: tuple[np.ndarray, int, int, int, int], tokens: int, seed: int
) -> None:
    load, nodes, gpn, k, groups = case
    plan = rebalance(load, nodes, gpn, k, groups)
    n_exp = load.shape[1]
    top_k = min(3, n_exp)
    g = torch.Generator().manual_seed(seed)
    skew = torch.rand(n_exp, generator=g) ** 3 + 1e-3
    ids = torch.multinomial(skew.expand(tokens, n_exp), top_k, replacement=False, generator=g)
    l2p, rc = plan.layer_tensors(0)
    phy = torch.as_tensor(plan.phy2log[0])
    maxes = {}
    for mode in ("static", "balanced"):
        slots = choose_replicas(l2p, rc, k, ids, mode, num_gpus=plan.num_gpus)
        assert slots.shape == ids.shape
        assert (phy[slots] == ids).all(), "a pair must go to a replica of its own expert"
        per_gpu = np.bincount(slots.reshape(-1).numpy() // k, minlength=plan.num_gpus)
        np.testing.assert_array_equal(gpu_token_counts(slots, k, plan.num_gpus).numpy(), per_gpu)
        maxes[mode] = int(per_gpu.max())
    assert maxes["balanced"] <= maxes["static"]


def test_static_choice_spreads_evenly_over_replicas() -> None:
    plan = rebalance(np.array([[1000.0] + [1.0] * 7]), 1, 4, 2, 1)
    l2p, rc = plan.layer_tensors(0)
    ids = torch.zeros(101, 1, dtype=torch.long)
    slots = choose_replicas(l2p, rc, 2, ids, "static")
    per_slot = torch.bincount(slots.view(-1), minlength=8)[l2p[0][: rc[0]]]
    assert int(per_slot.max() - per_slot.min()) <= 1


def test_balanced_choice_evens_out_a_hot_gpu() -> None:
    # expert 0 has replicas on GPUs 0 and 1; GPU 0 also serves a busy single-replica expert
    phy2log = np.array([[0, 1, 0, 2, 3, 4]])
    plan = Placement.from_phy2log(phy2log, 5, 1, 3, 2)
    ids = torch.tensor([0] * 100 + [1] * 60).view(-1, 1)
    l2p, rc = plan.layer_tensors(0)
    static = gpu_token_counts(choose_replicas(l2p, rc, 2, ids, "static"), 2, 3)
    balanced = gpu_token_counts(choose_replicas(l2p, rc, 2, ids, "balanced"), 2, 3)
    assert static.tolist() == [110, 50, 0]
    assert balanced.tolist() == [80, 80, 0]


def test_recorder_counts_window_and_merge() -> None:
    rec = ExpertLoadRecorder(num_layers=2, num_experts=6, window_steps=2)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 6, (7, 3), generator=g) for _ in range(3)]
    for ids in steps:
        rec.record(0, ids)
        rec.record(1, ids[:2])
        rec.step()

    def naive(batch: list[torch.Tensor]) -> np.ndarray:
        out = np.zeros(6)
        for ids in batch:
            for e in ids.reshape(-1).tolist():
                out[e] += 1
        return out

    load = rec.load()
    np.testing.assert_array_equal(load[0], naive(steps[1:]))  # the last 2 closed steps
    np.testing.assert_array_equal(load[1], naive([s[:2] for s in steps[1:]]))
    other = ExpertLoadRecorder(2, 6, window_steps=2)
    other.record(1, torch.tensor([[5, 5]]))
    rec.merge(other)
    assert rec.load()[1, 5] == load[1, 5] + 2
    with pytest.raises(ValueError, match="layer"):
        rec.record(2, steps[0])
    with pytest.raises(ValueError, match="shape"):
        rec.merge(np.zeros((3, 6)))


@FAST
@given(st.lists(st.integers(0, 500), min_size=1, max_size=6), st.integers(0, 1000))
def test_water_level_fills_exactly_the_tokens(bases: list[int], tokens: int) -> None:
    from raymoe.eplb.replica import _water_level

    base = torch.tensor([bases + [float("inf")] * 2], dtype=torch.float64)  # padded like log2phy rows
    level = float(_water_level(base, torch.tensor([float(tokens)], dtype=torch.float64))[0])
    assert sum(max(0.0, level - b) for b in bases) == pytest.approx(tokens, abs=1e-6)


def test_balanced_choice_reaches_the_water_level_and_handles_empty_steps() -> None:
    # expert 0 on GPUs 0, 1, 2; GPU 0 also has 90 fixed tokens, GPU 1 30: the optimum puts 0 / 60 / 90
    phy2log = np.array([[0, 1, 0, 2, 0, 3]])
    plan = Placement.from_phy2log(phy2log, 4, 1, 3, 2)
    l2p, rc = plan.layer_tensors(0)
    ids = torch.tensor([0] * 150 + [1] * 90 + [2] * 30, dtype=torch.int32).view(-1, 1)
    counts = gpu_token_counts(choose_replicas(l2p, rc, 2, ids, "balanced", num_gpus=3), 2, 3)
    assert counts.tolist() == [90, 90, 90]
    empty = choose_replicas(l2p, rc, 2, torch.empty(0, 8, dtype=torch.long), "balanced", num_gpus=3)
    assert empty.shape == (0, 8)
