"""The migration-aware re-planner: a new plan that keeps as many replicas in their slots as it can.

Starting from the previous plan, each unit keeps every replica in its slot, changes replica
counts only where the bottleneck needs it, fills the freed slots and refines with a small swap
budget. A layer whose anchored plan is more than `tolerance` worse than the fresh plan is tried
again with the fresh plan's replica counts; failing that it takes the fresh plan, relabelled
(nodes, then GPUs, then slots) to overlap the previous one. Pure numpy, deterministic.
"""

from __future__ import annotations

import numpy as np

from raymoe.eplb.fresh import counts_of, packed_to_groups, refine, replicate
from raymoe.eplb.placement import EPS


def replan(
    load: np.ndarray,
    fresh: np.ndarray,
    previous: np.ndarray,
    to_global: np.ndarray,
    p: int,
    k: int,
    tolerance: float,
    move_swaps: int,
) -> np.ndarray:
    """phy2log [layers, slots] re-planned from `previous` (the old phy2log) for `load` [layers, experts].

    `fresh` [layers * U, P, k] is the fresh plan of the U units of every layer (global ids) and
    `to_global` [layers * U, n] maps each unit's local expert ids to global ones in the anchored
    grouping (the same as the fresh one in the global mode).
    """
    num_layers, n_exp = load.shape
    units = to_global.shape[0] // num_layers
    n = to_global.shape[1]
    w_units = np.repeat(load, units, axis=0)
    w = np.take_along_axis(w_units, to_global, axis=1)
    # Previous slots in each unit's local ids, -1 where that expert left the unit.
    inv = np.full((len(w), n_exp), -1, dtype=np.int64)
    np.put_along_axis(inv, to_global, np.broadcast_to(np.arange(n), to_global.shape), axis=1)
    prev_local = np.take_along_axis(inv, previous.reshape(num_layers * units, p * k), axis=1)
    # A unit cannot keep two replicas of one expert on a GPU, nor more than it has GPUs: drop extras.
    prev_local = _drop_duplicates(prev_local.reshape(-1, p, k))
    anc = _anchored_units(w, prev_local, p, k, tolerance / 2, move_swaps)
    anc = np.take_along_axis(to_global, anc.reshape(len(w), -1), axis=1).reshape(anc.shape)
    # Per layer: keep the anchored plan unless the fresh one is more than `tolerance` better.
    imb_fresh = _layer_imbalance_units(fresh, w_units, units)
    imb_anc = _layer_imbalance_units(anc, w_units, units)
    keep = imb_anc <= imb_fresh * (1 + tolerance)
    if not keep.all():
        # Second try for those layers: the fresh plan's replica counts, reached from the previous
        # slots (surplus replicas dropped, new ones into the freed slots), then a longer search.
        again = np.nonzero(~keep)[0]
        anc2, ok2 = _anchored_to_counts(
            fresh.reshape(num_layers, -1), prev_local, w, to_global, again, units, p, k, n_exp, 4 * move_swaps
        )
        if ok2.any():
            imb2 = _layer_imbalance_units(anc2.reshape(-1, p, k), np.repeat(load[again], units, axis=0), units)
            use = ok2 & (imb2 <= imb_fresh[again] * (1 + tolerance))
            anc.reshape(num_layers, units, p, k)[again[use]] = anc2[use]
            keep[again[use]] = True
    out = anc.reshape(num_layers, units, p, k)
    fresh_l = fresh.reshape(num_layers, units, p, k)
    prev_l = previous.reshape(num_layers, units, p, k)
    for layer in np.nonzero(~keep)[0].tolist():
        out[layer] = _align_to_previous(fresh_l[layer], prev_l[layer], n_exp)
    return out.reshape(num_layers, -1)


def regroup(
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
        packed = refine(packed, group_load[fix], 4 * num_groups, num_groups)
        out[fix] = packed_to_groups(packed, num_groups)
    use_fresh = ~ok | (_max_node(group_load, out, num_nodes) > (1 + tolerance / 2) * fresh_max)
    for layer in np.nonzero(use_fresh)[0].tolist():
        relabel = fresh_groups[layer]
        if ok[layer]:
            overlap = np.zeros((num_nodes, num_nodes), dtype=np.int64)
            np.add.at(overlap, (fresh_groups[layer], prev_groups[layer]), 1)
            relabel = _match_greedy(overlap)[fresh_groups[layer]]
        out[layer] = relabel
    return out


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


def _groups_to_packed(node_of_group: np.ndarray, num_nodes: int, gpn: int) -> np.ndarray:
    order = np.argsort(node_of_group, axis=1, kind="stable")
    return order.reshape(len(node_of_group), num_nodes, gpn)


def _anchored_units(
    w: np.ndarray, prev: np.ndarray, p: int, k: int, count_tol: float, swap_budget: int
) -> np.ndarray:
    """Re-plan B units starting from `prev` [B, P, k] (local ids, -1 = slot whose expert left the
    unit): minimal replica-count changes, replicas kept in place, new replicas into the freed
    slots, then a few improving swaps."""
    b, n = w.shape
    rows = np.arange(b)
    old_counts = counts_of(np.where(prev >= 0, prev, n), n + 1)[:, :n]
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
    best = replicate(w, p * k, cap=p)
    target = (w / best).max(axis=1) * (1.0 + count_tol)
    for _ in range(p * k):
        ratio = w / counts
        a = np.argmax(np.where(counts < p, ratio, -np.inf), axis=1)
        top = ratio.max(axis=1)
        give = np.where(counts >= 2, w / np.maximum(counts - 1, 1), np.inf)
        give[rows, a] = np.inf
        c = np.argmin(give, axis=1)
        need = (top > target + EPS) & (give[rows, c] < top - EPS) & (counts[rows, a] < p)
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
    slots = refine(slots, per_rep, swap_budget, n)
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
    fresh_counts = counts_of(fresh_phy[layers], n_exp)  # [l, n_exp]
    idx = (layers[:, None] * units + np.arange(units)).reshape(-1)  # unit rows of these layers
    counts = np.take_along_axis(np.repeat(fresh_counts, units, axis=0), to_anchor[idx], axis=1)
    ok = (counts.sum(axis=1) == p * k).reshape(len(layers), units).all(axis=1)
    out = np.zeros((len(layers), units, p, k), dtype=np.int64)
    if not ok.any():  # every one of these layers was regrouped
        return out, ok
    rows = idx.reshape(len(layers), units)[ok].reshape(-1)
    slots = prev_local[rows].copy()
    cnt = np.take_along_axis(np.repeat(fresh_counts[ok], units, axis=0), to_anchor[rows], axis=1)
    per_rep = w[rows] / np.maximum(cnt, 1)
    for u in range(len(rows)):
        old = counts_of(np.where(slots[u : u + 1] >= 0, slots[u : u + 1], n), n + 1)[0, :n]
        _fill_unit(slots[u], per_rep[u], cnt[u], old)
    slots = refine(slots, per_rep, swaps, n)
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


def _layer_imbalance_units(slots: np.ndarray, w: np.ndarray, units_per_layer: int) -> np.ndarray:
    """[layers] imbalance of B = layers * units_per_layer unit plans (one unit = some GPUs)."""
    b, p, k = slots.shape
    counts = counts_of(slots, w.shape[1])
    per_rep = w / np.maximum(counts, 1)
    gl = np.take_along_axis(per_rep, slots.reshape(b, -1), axis=1).reshape(b, p, k).sum(-1)
    gl = gl.reshape(b // units_per_layer, units_per_layer * p)
    mean = gl.mean(axis=1)
    return np.where(mean > 0, gl.max(axis=1) / np.maximum(mean, EPS), 1.0)


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
