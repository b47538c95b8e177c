"""Expert placement: which logical expert each physical slot of each GPU hosts, per MoE layer.

The policy is a pure function over arrays (numpy in, `Placement` out), so the load tracker can
run it anywhere and tests can drive it alone. It improves on DeepSeek's published EPLB in two
ways (figures in docs/BENCHMARKS.md):

* balance: replica counts minimise the largest per-replica load (as EPLB does), replicas are
  packed longest-first onto GPUs that do not yet hold that expert, and a local search then swaps
  replicas between the busiest GPU and any other GPU while that lowers the pair's maximum;
* migration: with `previous`, the plan keeps every replica in its slot, changes replica counts
  only where the bottleneck needs it, fills the freed slots, and refines with a small swap
  budget; a fresh plan (relabelled to overlap the previous one as much as possible) replaces it
  in a layer only when it balances that layer more than `tolerance` better.

Regimes (`mode=`, also accepted as `regime=`):

* ``"hierarchical"`` (prefill-style): the expert groups are packed onto nodes (each group's
  experts and all their replicas stay on one node, so node-limited routing sends no more traffic
  across nodes), then replicas and GPU packing are planned inside each node;
* ``"global"`` (decode-style): replicas and packing over all GPUs;
* ``"auto"`` (default): hierarchical when there are several nodes, the groups divide evenly over
  them and each node's slots can hold its experts; global otherwise (DeepSeek's rule).

Shared expert: it can be balanced as a routed expert that every token selects. Append one column
to `load` holding the number of tokens in the window (every token uses it once) and plan with
``mode="global"`` (or ``num_groups=1``): it then gets replicas in proportion to its load (about
a ninth of all slots at top-8 routing). The caller maps logical id ``num_routed`` to the shared
expert when it builds dispatch tables (the decode unit: 256 routed + 1 shared on 320 GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Regime = Literal["auto", "hierarchical", "global"]

_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class Placement:
    """A plan for every MoE layer of one deployment unit.

    Slot ``s`` of GPU ``g`` is physical slot ``g * slots_per_gpu + s``; GPU ``g`` is on node
    ``g // gpus_per_node``.
    """

    phy2log: np.ndarray  # int64 [layers, num_slots]
    log2phy: np.ndarray  # int64 [layers, experts, max_replicas], padded with -1
    replica_count: np.ndarray  # int64 [layers, experts]
    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    regime: str = "global"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.replica_count.shape[1])

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @classmethod
    def from_phy2log(
        cls,
        phy2log: np.ndarray,
        num_experts: int,
        num_nodes: int,
        gpus_per_node: int,
        slots_per_gpu: int,
        regime: str = "global",
        stats: dict[str, Any] | None = None,
    ) -> Placement:
        """Derives `log2phy` and `replica_count` so the three views always agree."""
        phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
        if phy2log.ndim != 2 or phy2log.shape[1] != num_nodes * gpus_per_node * slots_per_gpu:
            raise ValueError(
                f"phy2log: expected shape [layers, {num_nodes * gpus_per_node * slots_per_gpu}], "
                f"got {list(phy2log.shape)}"
            )
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(f"phy2log: expert ids must lie in [0, {num_experts})")
        num_layers, num_slots = phy2log.shape
        counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        np.add.at(counts, (np.arange(num_layers)[:, None], phy2log), 1)
        max_rep = max(1, int(counts.max(initial=1)))
        # Slots sorted by expert (stable, so replicas appear in slot order) give log2phy rows.
        order = np.argsort(phy2log, axis=1, kind="stable")
        sorted_exp = np.take_along_axis(phy2log, order, axis=1)
        starts = np.cumsum(counts, axis=1) - counts
        rank = np.arange(num_slots)[None, :] - np.take_along_axis(starts, sorted_exp, axis=1)
        log2phy = np.full((num_layers, num_experts, max_rep), -1, dtype=np.int64)
        layer_idx = np.broadcast_to(np.arange(num_layers)[:, None], order.shape)
        log2phy[layer_idx, sorted_exp, rank] = order
        return cls(
            phy2log=phy2log,
            log2phy=log2phy,
            replica_count=counts,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            slots_per_gpu=slots_per_gpu,
            regime=regime,
            stats=dict(stats or {}),
        )

    def gpu_load(self, load: np.ndarray) -> np.ndarray:
        """[layers, gpus] tokens per GPU when each expert's tokens split evenly over its replicas."""
        load = np.asarray(load, dtype=np.float64)
        per_replica = load / np.maximum(self.replica_count, 1)
        slot_load = np.take_along_axis(per_replica, self.phy2log, axis=1)
        return slot_load.reshape(self.num_layers, self.num_gpus, self.slots_per_gpu).sum(-1)

    def layer_imbalance(self, load: np.ndarray) -> np.ndarray:
        """[layers] busiest GPU load / mean GPU load (1.0 for a layer without load)."""
        gpu = self.gpu_load(load)
        mean = gpu.mean(axis=1)
        return np.where(mean > 0, gpu.max(axis=1) / np.maximum(mean, _EPS), 1.0)

    def imbalance(self, load: np.ndarray) -> float:
        """Mean over layers of busiest GPU load / mean GPU load."""
        return float(self.layer_imbalance(load).mean())

    def moves_from(self, previous: Placement | None) -> list[tuple[int, int, int, int]]:
        """(layer, gpu, slot, expert) weight copies needed to go from `previous` to this plan."""
        if previous is None:
            changed = np.ones_like(self.phy2log, dtype=bool)
        else:
            _check_same_shape(self, previous)
            changed = self.phy2log != previous.phy2log
        layers, slots = np.nonzero(changed)
        experts = self.phy2log[layers, slots]
        k = self.slots_per_gpu
        return [
            (int(layer), int(s // k), int(s % k), int(e))
            for layer, s, e in zip(layers.tolist(), slots.tolist(), experts.tolist(), strict=True)
        ]

    def num_moves_from(self, previous: Placement) -> int:
        """Number of slots whose expert changes (cheap form of `len(moves_from(previous))`)."""
        _check_same_shape(self, previous)
        return int((self.phy2log != previous.phy2log).sum())

    def layer_tensors(self, layer: int, device: Any = "cpu") -> tuple[Any, Any]:
        """(log2phy [experts, max_replicas], replica_count [experts]) of one layer as torch tensors."""
        import torch

        return (
            torch.as_tensor(self.log2phy[layer], device=device),
            torch.as_tensor(self.replica_count[layer], device=device),
        )

    def nodes_of_experts(self) -> np.ndarray:
        """[layers, experts, num_nodes] bool: which nodes hold a replica of each expert."""
        node_of_slot = np.arange(self.num_slots) // (self.gpus_per_node * self.slots_per_gpu)
        out = np.zeros((self.num_layers, self.num_experts, self.num_nodes), dtype=bool)
        layer_idx = np.broadcast_to(np.arange(self.num_layers)[:, None], self.phy2log.shape)
        out[layer_idx, self.phy2log, np.broadcast_to(node_of_slot, self.phy2log.shape)] = True
        return out


def _check_same_shape(a: Placement, b: Placement) -> None:
    if not isinstance(b, Placement):
        raise ValueError(f"previous: expected a Placement, got {type(b).__name__}")
    if (a.num_nodes, a.gpus_per_node, a.slots_per_gpu) != (b.num_nodes, b.gpus_per_node, b.slots_per_gpu):
        raise ValueError(
            "previous: planned for "
            f"{b.num_nodes}x{b.gpus_per_node} GPUs x {b.slots_per_gpu} slots, "
            f"not {a.num_nodes}x{a.gpus_per_node} x {a.slots_per_gpu}"
        )
    if a.phy2log.shape != b.phy2log.shape or a.num_experts != b.num_experts:
        raise ValueError(
            f"previous: shape {list(b.phy2log.shape)} with {b.num_experts} experts does not match "
            f"{list(a.phy2log.shape)} with {a.num_experts} experts"
        )


# --------------------------------------------------------------------------------------------
# Batched building blocks. A batch holds B independent units (a layer, or a layer's node), each
# with n local experts, P GPUs and k slots per GPU (n <= P * k, k <= n).


def _replicate(w: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
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


def _expand(counts: np.ndarray) -> np.ndarray:
    """Expert id of every replica [B, M], replicas of one expert adjacent, experts in id order."""
    b, n = counts.shape
    m = int(counts[0].sum())
    ends = np.cumsum(counts, axis=1) + (np.arange(b) * m)[:, None]
    pos = np.arange(b * m)
    idx = np.searchsorted(ends.ravel(), pos, side="right")
    return (idx % n).reshape(b, m)


def _pack(w: np.ndarray, counts: np.ndarray, num_gpus: int, k: int) -> np.ndarray:
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


def _refine(
    slots: np.ndarray,
    per_rep: np.ndarray,
    max_swaps: int | np.ndarray,
    n_experts: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Local search: swap a replica of the busiest GPU with a lighter one elsewhere while the
    pair's larger load drops. Keeps the one-replica-per-GPU rule. Returns (slots, swaps per unit)."""
    slots = slots.copy()
    b, p, k = slots.shape
    budget = np.broadcast_to(np.asarray(max_swaps, dtype=np.int64), (b,)).copy()
    swaps = np.zeros(b, dtype=np.int64)
    if p < 2:
        return slots, swaps
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
    return slots, swaps


def _match_greedy(overlap: np.ndarray) -> np.ndarray:
    """perm[new] = old, a one-to-one map greedily maximising the summed overlap [P_new, P_old]."""
    p = overlap.shape[0]
    perm = np.full(p, -1, dtype=np.int64)
    used_old = np.zeros(p, dtype=bool)
    nz_new, nz_old = np.nonzero(overlap)
    order = np.argsort(-overlap[nz_new, nz_old], kind="stable")
    for a, c in zip(nz_new[order].tolist(), nz_old[order].tolist(), strict=True):
        if perm[a] < 0 and not used_old[c]:
            perm[a] = c
            used_old[c] = True
    free_old = np.nonzero(~used_old)[0]
    perm[perm < 0] = free_old
    return perm


def _gpu_overlap(new: np.ndarray, old: np.ndarray, n_experts: int) -> np.ndarray:
    """[P, P] number of experts GPU a of `new` shares with GPU c of `old` (one unit)."""
    p = new.shape[0]
    on_new = np.zeros((p, n_experts), dtype=np.int64)
    on_old = np.zeros((p, n_experts), dtype=np.int64)
    on_new[np.arange(p)[:, None], new] = 1
    on_old[np.arange(p)[:, None], old] = 1
    return on_new @ on_old.T


def _align_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Reorders each GPU's slots [..., k] so experts already in a slot of `old` keep that slot."""
    eq = new[..., :, None] == old[..., None, :]  # [..., i(new), j(old)]
    matched = eq.any(-1)
    target = eq.argmax(-1)
    taken = eq.any(-2)
    free_sorted = np.argsort(taken, axis=-1, kind="stable")  # free positions first, in order
    rank = np.cumsum(~matched, axis=-1) - 1
    fill_pos = np.take_along_axis(free_sorted, np.clip(rank, 0, None), axis=-1)
    target = np.where(matched, target, fill_pos)
    out = np.empty_like(new)
    np.put_along_axis(out, target, new, axis=-1)
    return out


# --------------------------------------------------------------------------------------------


def _validate(
    load: Any, num_nodes: int, gpus_per_node: int, slots_per_gpu: int, num_groups: int, regime: str
) -> np.ndarray:
    if type(load).__module__.startswith("torch"):  # a torch tensor, without importing torch here
        load = load.detach().to("cpu").double().numpy()
    arr = np.asarray(load, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"load: expected a 2-D array [layers, experts], got shape {list(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"load: needs at least one layer and one expert, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("load: contains NaN or infinite values")
    if (arr < 0).any():
        raise ValueError("load: contains negative token counts")
    for name, v in (
        ("num_nodes", num_nodes),
        ("gpus_per_node", gpus_per_node),
        ("slots_per_gpu", slots_per_gpu),
        ("num_groups", num_groups),
    ):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if regime not in ("auto", "hierarchical", "global"):
        raise ValueError(f"mode: expected 'auto', 'hierarchical' or 'global', got {regime!r}")
    n_exp = arr.shape[1]
    num_gpus = num_nodes * gpus_per_node
    num_slots = num_gpus * slots_per_gpu
    if num_slots < n_exp:
        raise ValueError(
            f"too few slots: {num_gpus} GPUs x {slots_per_gpu} slots = {num_slots} < {n_exp} experts "
            "(every expert needs at least one replica)"
        )
    if slots_per_gpu > n_exp:
        raise ValueError(
            f"slots_per_gpu={slots_per_gpu} exceeds the {n_exp} experts: a GPU cannot hold two "
            "replicas of one expert"
        )
    if n_exp % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {n_exp} experts")
    return arr


def _hierarchical_problem(n_exp: int, num_nodes: int, gpus_per_node: int, k: int, num_groups: int) -> str | None:
    """Why the hierarchical regime does not apply (None when it does)."""
    if num_nodes < 2:
        return "a single node (use the global regime)"
    if num_groups % num_nodes:
        return f"num_groups={num_groups} does not divide evenly over num_nodes={num_nodes}"
    per_node = n_exp // num_nodes
    if per_node > gpus_per_node * k:
        return (
            f"each node would host {per_node} experts but has only {gpus_per_node} x {k} slots"
        )
    if k > per_node:
        return f"slots_per_gpu={k} exceeds the {per_node} experts of a node"
    return None


def _pack_groups(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """Node of each group [L, num_groups]: longest-first then pairwise swaps on the node sums."""
    num_layers, num_groups = group_load.shape
    per_node = num_groups // num_nodes
    counts = np.ones_like(group_load, dtype=np.int64)
    packed = _pack(group_load, counts, num_nodes, per_node)
    packed, _ = _refine(packed, group_load, 4 * num_groups, num_groups)
    return _packed_to_groups(packed, num_groups)


def _fresh_units(w: np.ndarray, p: int, k: int, refine_swaps: int) -> np.ndarray:
    """Plan B units from scratch: [B, P, k] local expert ids."""
    n = w.shape[1]
    counts = _replicate(w, p * k, cap=p)
    slots = _pack(w, counts, p, k)
    slots, _ = _refine(slots, w / counts, refine_swaps, n)
    return slots


def _counts_of(slots: np.ndarray, n: int) -> np.ndarray:
    b = slots.shape[0]
    counts = np.zeros((b, n), dtype=np.int64)
    np.add.at(counts, (np.arange(b)[:, None], slots.reshape(b, -1)), 1)
    return counts


def _anchored_units(
    w: np.ndarray, prev: np.ndarray, p: int, k: int, count_tol: float, swap_budget: int
) -> np.ndarray:
    """Re-plan B units starting from `prev` [B, P, k] (local ids, -1 = slot whose expert left the
    unit): minimal replica-count changes, replicas kept in place, new replicas into the freed
    slots, then a few improving swaps."""
    b, n = w.shape
    rows = np.arange(b)
    old_counts = _counts_of(np.where(prev >= 0, prev, n), n + 1)[:, :n]
    counts = old_counts.copy()
    free = (prev < 0).sum(axis=(1, 2))
    # 1) every expert gets a replica, then free slots go to the highest load per replica.
    for _ in range(p * k):
        zero = counts == 0
        has_zero = zero.any(axis=1)
        todo = has_zero | (free > 0)
        if not todo.any():
            break
        z = np.argmax(np.where(zero, w + 1.0, -1.0), axis=1)  # heaviest expert without a replica
        g = np.argmax(np.where(counts < p, w / np.maximum(counts, 1), -np.inf), axis=1)
        tgt = np.where(has_zero, z, g)
        give = np.where(counts >= 2, w / np.maximum(counts - 1, 1), np.inf)
        donor = np.argmin(give, axis=1)
        steal = todo & (free == 0)
        counts[rows[todo], tgt[todo]] += 1
        counts[rows[steal], donor[steal]] -= 1
        free = free - (todo & ~steal)
    # 2) move replicas from the cheapest donor to the bottleneck while it is clearly suboptimal.
    best = _replicate(w, p * k, cap=p)
    target = (w / best).max(axis=1) * (1.0 + count_tol)
    for _ in range(p * k):
        ratio = w / counts
        a = np.argmax(np.where(counts < p, ratio, -np.inf), axis=1)
        top = ratio.max(axis=1)
        give = np.where(counts >= 2, w / np.maximum(counts - 1, 1), np.inf)
        give[rows, a] = np.inf
        c = np.argmin(give, axis=1)
        need = (top > target + _EPS) & (give[rows, c] < top - _EPS) & (counts[rows, a] < p)
        if not need.any():
            break
        rr = rows[need]
        counts[rr, a[need]] += 1
        counts[rr, c[need]] -= 1
    changed = np.nonzero((counts != old_counts).any(axis=1) | (prev < 0).any(axis=(1, 2)))[0]
    slots = prev.copy()
    per_rep = w / counts
    for u in changed.tolist():
        _fill_unit(slots[u], per_rep[u], counts[u], old_counts[u])
    slots, _ = _refine(slots, per_rep, swap_budget, n)
    return slots


def _fill_unit(s: np.ndarray, per_rep: np.ndarray, counts: np.ndarray, old_counts: np.ndarray) -> None:
    """In place on one unit's slots [P, k]: drop surplus replicas (from the busiest GPUs), then put
    the new replicas, heaviest first, into freed slots on the lightest GPU not holding the expert."""
    p, k = s.shape
    gl = np.where(s >= 0, per_rep[np.clip(s, 0, None)], 0.0).sum(axis=1)
    for e in np.nonzero(counts < old_counts)[0].tolist():
        gs, js = np.nonzero(s == e)
        pick = np.argsort(-gl[gs], kind="stable")[: int(old_counts[e] - counts[e])]
        for gi, ji in zip(gs[pick].tolist(), js[pick].tolist(), strict=True):
            s[gi, ji] = -1
            gl[gi] -= per_rep[e]
    holds = np.zeros((p, per_rep.shape[0]), dtype=bool)
    holds[np.nonzero(s >= 0)[0], s[s >= 0]] = True
    adds = np.nonzero(counts > old_counts)[0]
    adds = adds[np.argsort(-per_rep[adds], kind="stable")]
    for e in adds.tolist():
        for _ in range(int(counts[e] - old_counts[e])):
            fg, fj = np.nonzero(s < 0)
            ok = ~holds[fg, e]
            if not ok.any():
                # Every free slot is on a GPU that holds e: move a replica from a GPU without e into
                # one of those free slots, which frees a slot where e may go.
                gi, ji = int(fg[0]), int(fj[0])
                for g2 in np.argsort(gl).tolist():
                    if holds[g2, e]:
                        continue
                    movable = [j for j in range(k) if s[g2, j] >= 0 and not holds[gi, s[g2, j]]]
                    if movable:
                        j2 = movable[0]
                        moved = int(s[g2, j2])
                        s[gi, ji], s[g2, j2] = moved, -1
                        holds[gi, moved], holds[g2, moved] = True, False
                        gl[gi] += per_rep[moved]
                        gl[g2] -= per_rep[moved]
                        break
                fg, fj = np.nonzero(s < 0)
                ok = ~holds[fg, e]
            cand = np.nonzero(ok)[0]
            pick = cand[np.argmin(gl[fg[cand]])]
            gi, ji = int(fg[pick]), int(fj[pick])
            s[gi, ji] = e
            holds[gi, e] = True
            gl[gi] += per_rep[e]


def _layer_imbalance_units(slots: np.ndarray, w: np.ndarray, units_per_layer: int) -> np.ndarray:
    """[layers] imbalance of B = layers * units_per_layer unit plans (one unit = some GPUs)."""
    b, p, k = slots.shape
    counts = _counts_of(slots, w.shape[1])
    per_rep = w / np.maximum(counts, 1)
    gl = np.take_along_axis(per_rep, slots.reshape(b, -1), axis=1).reshape(b, p, k).sum(-1)
    gl = gl.reshape(b // units_per_layer, units_per_layer * p)
    mean = gl.mean(axis=1)
    return np.where(mean > 0, gl.max(axis=1) / np.maximum(mean, _EPS), 1.0)


def rebalance(
    load: Any,
    num_nodes: int,
    gpus_per_node: int,
    slots_per_gpu: int,
    num_groups: int,
    previous: Placement | None = None,
    mode: Regime | None = None,
    *,
    regime: Regime | None = None,
    tolerance: float = 0.03,
    refine_swaps: int | None = None,
    move_swaps: int | None = None,
) -> Placement:
    """Plans every layer's placement from `load` [layers, logical experts] (tokens per expert).

    `mode` picks the regime (``"auto"`` by default; ``regime=`` is the same knob under its older
    name). `previous` makes the plan migration-aware (see the module docstring); `tolerance` is how much
    worse (relative imbalance) a layer's anchored plan may be than a fresh one and still be kept.
    `refine_swaps` / `move_swaps` cap the local search per unit for fresh / anchored plans.
    Raises ValueError naming the problem for negative or NaN load, too few slots, groups that do
    not divide the experts, or a hierarchical request that the shape does not allow.
    """
    if mode is not None and regime is not None and mode != regime:
        raise ValueError(f"mode={mode!r} and regime={regime!r} disagree: pass one of them")
    regime = mode if mode is not None else regime if regime is not None else "auto"
    w_all = _validate(load, num_nodes, gpus_per_node, slots_per_gpu, num_groups, regime)
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance: expected a fraction in [0, 1), got {tolerance}")
    num_layers, n_exp = w_all.shape
    k = slots_per_gpu
    num_gpus = num_nodes * gpus_per_node
    why_not = _hierarchical_problem(n_exp, num_nodes, gpus_per_node, k, num_groups)
    if regime == "hierarchical" and why_not:
        raise ValueError(f"mode='hierarchical' is not possible: {why_not}")
    chosen = "hierarchical" if regime == "hierarchical" or (regime == "auto" and why_not is None) else "global"
    if previous is not None:
        shape_ref = Placement.from_phy2log(
            np.zeros((num_layers, num_gpus * k), dtype=np.int64), n_exp, num_nodes, gpus_per_node, k
        )
        _check_same_shape(shape_ref, previous)

    prev_phy = None if previous is None else previous.phy2log
    if refine_swaps is None:
        refine_swaps = 4 * gpus_per_node * k if chosen == "hierarchical" else 4 * num_gpus * k
    if chosen == "global":
        units, p, n = 1, num_gpus, n_exp
        to_fresh = np.broadcast_to(np.arange(n_exp), (num_layers, n_exp))  # local id -> expert
        to_anchor = to_fresh
    else:
        units, p, n = num_nodes, gpus_per_node, n_exp // num_nodes
        group_size = n_exp // num_groups
        gpn = num_groups // num_nodes
        group_load = w_all.reshape(num_layers, num_groups, group_size).sum(-1)
        fresh_groups = _pack_groups(group_load, num_nodes)
        anchor_groups = fresh_groups
        if prev_phy is not None:
            anchor_groups = _regroup(
                group_load, fresh_groups, prev_phy, group_size, num_nodes, gpus_per_node * k, tolerance
            )
        to_fresh = _local_maps(fresh_groups, num_nodes, gpn, group_size).reshape(num_layers * num_nodes, n)
        to_anchor = _local_maps(anchor_groups, num_nodes, gpn, group_size).reshape(num_layers * num_nodes, n)
    if move_swaps is None:
        move_swaps = max(2, (p * k) // 16)
    stats: dict[str, Any] = {"regime": chosen}

    w = np.take_along_axis(np.repeat(w_all, units, axis=0), to_fresh, axis=1)
    fresh = _fresh_units(w, p, k, refine_swaps)  # [B, P, k] local ids
    fresh = np.take_along_axis(to_fresh, fresh.reshape(len(w), -1), axis=1).reshape(fresh.shape)
    if prev_phy is None:
        return Placement.from_phy2log(fresh.reshape(num_layers, -1), n_exp, num_nodes, gpus_per_node, k, chosen, stats)

    # Anchored plan: previous slots in each unit's local ids, -1 where that expert left the unit.
    w = np.take_along_axis(np.repeat(w_all, units, axis=0), to_anchor, axis=1)
    inv = np.full((len(w), n_exp), -1, dtype=np.int64)
    np.put_along_axis(inv, to_anchor, np.broadcast_to(np.arange(n), to_anchor.shape), axis=1)
    prev_units = prev_phy.reshape(num_layers * units, p * k)
    prev_local = np.take_along_axis(inv, prev_units, axis=1)
    # A unit cannot keep two replicas of one expert on a GPU, nor more than it has GPUs: drop extras.
    prev_local = _drop_duplicates(prev_local.reshape(-1, p, k))
    anc = _anchored_units(w, prev_local, p, k, tolerance / 2, move_swaps)
    anc = np.take_along_axis(to_anchor, anc.reshape(len(w), -1), axis=1).reshape(anc.shape)
    # Per layer: keep the anchored plan unless the fresh one is more than `tolerance` better.
    w_units = np.repeat(w_all, units, axis=0)
    imb_fresh = _layer_imbalance_units(fresh, w_units, units)
    imb_anc = _layer_imbalance_units(anc, w_units, units)
    keep = imb_anc <= imb_fresh * (1 + tolerance)
    if not keep.all():
        # Second try for those layers: the fresh plan's replica counts, reached from the previous
        # slots (surplus replicas dropped, new ones into the freed slots), then a longer search.
        again = np.nonzero(~keep)[0]
        anc2, ok2 = _anchored_to_counts(
            fresh.reshape(num_layers, -1), prev_local, w, to_anchor, again, units, p, k, n_exp, 4 * move_swaps
        )
        if ok2.any():
            imb2 = _layer_imbalance_units(anc2.reshape(-1, p, k), np.repeat(w_all[again], units, axis=0), units)
            use = ok2 & (imb2 <= imb_fresh[again] * (1 + tolerance))
            anc.reshape(num_layers, units, p, k)[again[use]] = anc2[use]
            keep[again[use]] = True
    out = anc.reshape(num_layers, units, p, k)
    fresh_l = fresh.reshape(num_layers, units, p, k)
    prev_l = prev_phy.reshape(num_layers, units, p, k)
    for layer in np.nonzero(~keep)[0].tolist():
        out[layer] = _align_to_previous(fresh_l[layer], prev_l[layer], n_exp)
    stats["anchored_layers"] = int(keep.sum())
    return Placement.from_phy2log(out.reshape(num_layers, -1), n_exp, num_nodes, gpus_per_node, k, chosen, stats)


def _anchored_to_counts(
    fresh_phy: np.ndarray,
    prev_local: np.ndarray,
    w: np.ndarray,
    to_anchor: np.ndarray,
    layers: np.ndarray,
    units: int,
    p: int,
    k: int,
    n_exp: int,
    swaps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Plans `layers` from their previous slots with the fresh plan's replica counts:
    ([len(layers), units, P, k] global ids, [len(layers)] whether it applied). It applies where
    every unit's experts have exactly that unit's slots in the fresh plan (same grouping)."""
    n = to_anchor.shape[1]
    fresh_counts = _counts_of(fresh_phy[layers], n_exp)  # [l, n_exp]
    idx = (layers[:, None] * units + np.arange(units)).reshape(-1)  # unit rows of these layers
    counts = np.take_along_axis(np.repeat(fresh_counts, units, axis=0), to_anchor[idx], axis=1)
    ok = (counts.sum(axis=1) == p * k).reshape(len(layers), units).all(axis=1)
    rows = idx.reshape(len(layers), units)[ok].reshape(-1)
    slots = prev_local[rows].copy()
    cnt = np.take_along_axis(np.repeat(fresh_counts[ok], units, axis=0), to_anchor[rows], axis=1)
    per_rep = w[rows] / np.maximum(cnt, 1)
    for u in range(len(rows)):
        old = _counts_of(np.where(slots[u : u + 1] >= 0, slots[u : u + 1], n), n + 1)[0, :n]
        _fill_unit(slots[u], per_rep[u], cnt[u], old)
    slots, _ = _refine(slots, per_rep, swaps, n)
    out = np.zeros((len(layers), units, p, k), dtype=np.int64)
    glob = np.take_along_axis(to_anchor[rows], slots.reshape(len(rows), -1), axis=1)
    out[ok] = glob.reshape(-1, units, p, k)
    return out, ok


def _drop_duplicates(slots: np.ndarray) -> np.ndarray:
    """Marks (-1) the second and later copies of an expert on one GPU of [B, P, k]."""
    srt = np.sort(slots, axis=-1)
    order = np.argsort(slots, axis=-1, kind="stable")
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=-1)
    return np.where(dup, -1, slots)


def _regroup(
    group_load: np.ndarray,
    fresh_groups: np.ndarray,
    prev_phy: np.ndarray,
    group_size: int,
    num_nodes: int,
    slots_per_node: int,
    tolerance: float,
) -> np.ndarray:
    """Node of each group for an anchored re-plan: the previous grouping improved by the fewest
    group swaps, or the fresh grouping relabelled onto the previous nodes if that is clearly better."""
    num_layers, num_groups = group_load.shape
    gpn = num_groups // num_nodes
    prev_groups = _node_of_group_from(prev_phy, num_groups, group_size, num_nodes, slots_per_node)
    out = np.empty_like(fresh_groups)
    ok = (prev_groups >= 0).all(axis=1)
    fresh_max = _max_node(group_load, fresh_groups, num_nodes)
    out[ok] = prev_groups[ok]
    # Moving a group moves all its experts' weights: swap groups only where the node loads drifted
    # clearly past a fresh grouping.
    fix = ok & (_max_node(group_load, np.where(ok[:, None], prev_groups, 0), num_nodes) > (1 + tolerance / 2) * fresh_max)
    if fix.any():
        packed = _groups_to_packed(prev_groups[fix], num_nodes, gpn)
        packed, _ = _refine(packed, group_load[fix], 4 * num_groups, num_groups)
        out[fix] = _packed_to_groups(packed, num_groups)
    use_fresh = ~ok | (_max_node(group_load, out, num_nodes) > (1 + tolerance / 2) * fresh_max)
    for layer in np.nonzero(use_fresh)[0].tolist():
        relabel = fresh_groups[layer]
        if ok[layer]:
            overlap = np.zeros((num_nodes, num_nodes), dtype=np.int64)
            np.add.at(overlap, (fresh_groups[layer], prev_groups[layer]), 1)
            relabel = _match_greedy(overlap)[fresh_groups[layer]]
        out[layer] = relabel
    return out


def _groups_to_packed(node_of_group: np.ndarray, num_nodes: int, gpn: int) -> np.ndarray:
    order = np.argsort(node_of_group, axis=1, kind="stable")
    return order.reshape(len(node_of_group), num_nodes, gpn)


def _packed_to_groups(packed: np.ndarray, num_groups: int) -> np.ndarray:
    num_layers, num_nodes, _ = packed.shape
    out = np.empty((num_layers, num_groups), dtype=np.int64)
    out[np.arange(num_layers)[:, None, None], packed] = np.arange(num_nodes)[None, :, None]
    return out


def _align_to_previous(new: np.ndarray, old: np.ndarray, n_exp: int) -> np.ndarray:
    """Relabels units (nodes) then GPUs then slots of one layer's fresh plan [U, P, k] to overlap
    `old` as much as possible; the plan's balance and group-on-node property are unchanged."""
    u, p, k = new.shape
    if u > 1:
        node_new = np.zeros((u, n_exp), dtype=np.int64)
        node_old = np.zeros((u, n_exp), dtype=np.int64)
        node_new[np.arange(u)[:, None], new.reshape(u, -1)] = 1
        node_old[np.arange(u)[:, None], old.reshape(u, -1)] = 1
        perm = _match_greedy(node_new @ node_old.T)
        placed = np.empty_like(new)
        placed[perm] = new
        new = placed
    out = np.empty_like(new)
    for i in range(u):
        perm = _match_greedy(_gpu_overlap(new[i], old[i], n_exp))
        out[i][perm] = new[i]
    return _align_slots(out, old)


def _node_of_group_from(
    phy2log: np.ndarray, num_groups: int, group_size: int, num_nodes: int, slots_per_node: int
) -> np.ndarray:
    """[L, groups] node holding all of each group's replicas in a previous plan, -1 if split."""
    num_layers = phy2log.shape[0]
    node_of_slot = np.arange(phy2log.shape[1]) // slots_per_node
    group = phy2log // group_size
    seen = np.zeros((num_layers, num_groups, num_nodes), dtype=bool)
    seen[np.arange(num_layers)[:, None], group, node_of_slot[None, :]] = True
    single = seen.sum(-1) == 1
    node = seen.argmax(-1)
    out = np.where(single, node, -1)
    # a node must hold exactly groups/nodes groups
    per_node = num_groups // num_nodes
    ok = np.ones(num_layers, dtype=bool)
    for nd in range(num_nodes):
        ok &= (out == nd).sum(axis=1) == per_node
    out[~ok] = -1
    return out


def _max_node(group_load: np.ndarray, node_of_group: np.ndarray, num_nodes: int) -> np.ndarray:
    num_layers = group_load.shape[0]
    node_load = np.zeros((num_layers, num_nodes))
    np.add.at(node_load, (np.arange(num_layers)[:, None], np.clip(node_of_group, 0, None)), group_load)
    return node_load.max(axis=1)


def _local_maps(node_of_group: np.ndarray, num_nodes: int, gpn: int, group_size: int) -> np.ndarray:
    """[L, nodes, experts per node] global expert id of each node-local expert id."""
    num_layers, num_groups = node_of_group.shape
    order = np.argsort(node_of_group, axis=1, kind="stable")  # groups sorted by node
    groups = order.reshape(num_layers, num_nodes, gpn)
    experts = groups[..., None] * group_size + np.arange(group_size)
    return experts.reshape(num_layers, num_nodes, gpn * group_size)
