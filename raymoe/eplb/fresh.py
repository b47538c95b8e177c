"""The fresh planner: a plan made from the load alone (replicate, pack, refine).

* replicate: replica counts that minimise the largest per-replica load (as DeepSeek's EPLB does);
* pack: replicas longest-first onto the lightest GPU that does not yet hold that expert;
* refine: a local search that swaps replicas between the busiest GPU and any other GPU while
  that lowers the pair's maximum.

A unit is one layer (global mode) or one node of one layer (hierarchical mode, the expert groups
first packed onto nodes by `pack_groups`). The functions work on a batch of B independent units,
each with n local experts, P GPUs and k slots per GPU (n <= P * k, k <= n). Pure numpy,
deterministic.
"""

from __future__ import annotations

import numpy as np


def plan_fresh(load: np.ndarray, to_global: np.ndarray, p: int, k: int, refine_swaps: int) -> np.ndarray:
    """Fresh plan [layers * U, P, k] (global expert ids) of the U units of every layer of `load`.

    `to_global` [layers * U, n] maps each unit's local expert ids to global ones.
    """
    units = to_global.shape[0] // load.shape[0]
    w = np.take_along_axis(np.repeat(load, units, axis=0), to_global, axis=1)
    slots = plan_units(w, p, k, refine_swaps)
    return np.take_along_axis(to_global, slots.reshape(len(w), -1), axis=1).reshape(slots.shape)


def plan_units(w: np.ndarray, p: int, k: int, refine_swaps: int) -> np.ndarray:
    """Plans B units from scratch, loads `w` [B, n]: [B, P, k] local expert ids."""
    n = w.shape[1]
    counts = replicate(w, p * k, cap=p)
    slots = pack(w, counts, p, k)
    slots = refine(slots, w / counts, refine_swaps, n)
    return slots


def replicate(w: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """Replica counts [B, n] minimising max w/r (greedy is optimal for that), at most `cap` each."""
    b, n = w.shape
    counts = np.ones((b, n), dtype=np.int64)
    rows = np.arange(b)
    # Ties (e.g. all-zero load) go to the expert with fewest replicas, then the lowest id.
    tiebreak = 1e-12 * (1.0 + w.max(axis=1, keepdims=True))
    for _ in range(num_slots - n):
        score = np.where(counts < cap, w / counts - counts * tiebreak, -np.inf)
        counts[rows, np.argmax(score, axis=1)] += 1
    return counts


def pack(w: np.ndarray, counts: np.ndarray, num_gpus: int, k: int) -> np.ndarray:
    """Longest-first packing of replicas onto GPUs, no GPU holding one expert twice: [B, P, k]."""
    b, n = w.shape
    items = _expand(counts)  # [B, M]
    per_rep = w / counts
    item_load = np.take_along_axis(per_rep, items, axis=1)
    order = np.argsort(-item_load, axis=1, kind="stable")  # stable: an expert's replicas stay adjacent
    items = np.take_along_axis(items, order, axis=1)
    item_load = np.take_along_axis(item_load, order, axis=1)
    m = items.shape[1]
    rows = np.arange(b)
    gpu_load = np.zeros((b, num_gpus))
    fill = np.zeros((b, num_gpus), dtype=np.int64)
    present = np.zeros((b, num_gpus, n), dtype=bool)
    out = np.zeros((b, num_gpus, k), dtype=np.int64)
    stuck = np.zeros(b, dtype=bool)
    for t in range(m):
        e = items[:, t]
        allowed = (fill < k) & ~present[rows, :, e]
        none = ~allowed.any(axis=1)
        if none.any():
            stuck |= none
            allowed[none] = fill[none] < k
        g = np.argmin(np.where(allowed, gpu_load, np.inf), axis=1)
        out[rows, g, fill[rows, g]] = e
        fill[rows, g] += 1
        gpu_load[rows, g] += item_load[:, t]
        present[rows, g, e] = True
    if stuck.any():
        # Round-robin over the load-sorted replica list is always valid (an expert's r <= P
        # replicas are adjacent, so they land on r different GPUs); the local search then balances.
        idx = np.nonzero(stuck)[0]
        rr = items[idx].reshape(len(idx), k, num_gpus).transpose(0, 2, 1)
        out[idx] = rr
    return out


def _expand(counts: np.ndarray) -> np.ndarray:
    """Expert id of every replica [B, M], replicas of one expert adjacent, experts in id order."""
    b, n = counts.shape
    m = int(counts[0].sum())
    ends = np.cumsum(counts, axis=1) + (np.arange(b) * m)[:, None]
    pos = np.arange(b * m)
    idx = np.searchsorted(ends.ravel(), pos, side="right")
    return (idx % n).reshape(b, m)


def refine(
    slots: np.ndarray,
    per_rep: np.ndarray,
    max_swaps: int | np.ndarray,
    n_experts: int,
) -> np.ndarray:
    """Local search: swaps a replica of the busiest GPU with a lighter one elsewhere while the
    pair's larger load drops, at most `max_swaps` per unit; keeps the one-replica-per-GPU rule."""
    slots = slots.copy()
    b, p, k = slots.shape
    budget = np.broadcast_to(np.asarray(max_swaps, dtype=np.int64), (b,)).copy()
    swaps = np.zeros(b, dtype=np.int64)
    if p < 2:
        return slots
    rows_all = np.arange(b)
    load = np.take_along_axis(per_rep, slots.reshape(b, -1), axis=1).reshape(b, p, k)
    gpu_load = load.sum(-1)
    present = np.zeros((b, p, n_experts), dtype=bool)
    present[rows_all[:, None, None], np.arange(p)[None, :, None], slots] = True
    # Gains below 0.1% of the mean GPU load are not worth a swap (and would take many rounds).
    min_gain = 1e-3 * gpu_load.mean(axis=1)
    active = np.nonzero((budget > 0) & (gpu_load.max(axis=1) > gpu_load.mean(axis=1) + min_gain))[0]
    while active.size:
        r = active
        na = r.size
        ar = np.arange(na)
        h = np.argmax(gpu_load[r], axis=1)  # [na]
        lh = gpu_load[r, h]  # [na]
        xh = load[r, h]  # [na, k]
        eh = slots[r, h]  # [na, k]
        d = xh[:, :, None, None] - load[r][:, None, :, :]  # [na, k(i on h), p, k(j on g)]
        new_g = gpu_load[r][:, None, :, None] + d
        new_h = lh[:, None, None, None] - d
        score = np.maximum(new_g, new_h)
        tol = np.maximum(1e-9 * np.maximum(lh, 1.0), min_gain[r])[:, None, None, None]
        ok = (d > tol) & (score < lh[:, None, None, None] - tol)
        # expert of item i must not be on g; expert of item j must not be on h
        ok &= ~present[r[:, None, None], np.arange(p)[None, None, :], eh[:, :, None]][:, :, :, None]
        ok &= ~present[r[:, None, None], h[:, None, None], slots[r]][:, None, :, :]
        ok[ar, :, h, :] = False
        score = np.where(ok, score, np.inf).reshape(na, -1)
        best = np.argmin(score, axis=1)
        improve = np.isfinite(score[ar, best])
        if not improve.any():
            break
        r, best, h = r[improve], best[improve], h[improve]
        i, g, j = np.unravel_index(best, (k, p, k))
        ei, ej = slots[r, h, i], slots[r, g, j]
        xi, xj = load[r, h, i], load[r, g, j]
        slots[r, h, i], slots[r, g, j] = ej, ei
        load[r, h, i], load[r, g, j] = xj, xi
        gpu_load[r, h] += xj - xi
        gpu_load[r, g] += xi - xj
        present[r, h, ei] = False
        present[r, g, ej] = False
        present[r, h, ej] = True
        present[r, g, ei] = True
        swaps[r] += 1
        active = r[swaps[r] < budget[r]]
    return slots


def counts_of(slots: np.ndarray, n: int) -> np.ndarray:
    """Replicas of each of n experts [B, n] in B units' slots [B, ...] (ids in [0, n))."""
    b = slots.shape[0]
    counts = np.zeros((b, n), dtype=np.int64)
    np.add.at(counts, (np.arange(b)[:, None], slots.reshape(b, -1)), 1)
    return counts


def pack_groups(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """Node of each group [L, num_groups]: longest-first then pairwise swaps on the node sums."""
    num_layers, num_groups = group_load.shape
    per_node = num_groups // num_nodes
    counts = np.ones_like(group_load, dtype=np.int64)
    packed = pack(group_load, counts, num_nodes, per_node)
    packed = refine(packed, group_load, 4 * num_groups, num_groups)
    return packed_to_groups(packed, num_groups)


def packed_to_groups(packed: np.ndarray, num_groups: int) -> np.ndarray:
    """Node of each group [L, num_groups] from the groups packed per node [L, nodes, groups per node]."""
    num_layers, num_nodes, _ = packed.shape
    out = np.empty((num_layers, num_groups), dtype=np.int64)
    out[np.arange(num_layers)[:, None, None], packed] = np.arange(num_nodes)[None, :, None]
    return out


def local_maps(node_of_group: np.ndarray, num_nodes: int, gpn: int, group_size: int) -> np.ndarray:
    """[L, nodes, experts per node] global expert id of each node-local expert id."""
    num_layers, num_groups = node_of_group.shape
    order = np.argsort(node_of_group, axis=1, kind="stable")  # groups sorted by node
    groups = order.reshape(num_layers, num_nodes, gpn)
    experts = groups[..., None] * group_size + np.arange(group_size)
    return experts.reshape(num_layers, num_nodes, gpn * group_size)
