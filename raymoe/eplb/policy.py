"""Expert placement policy: `rebalance` plans which logical expert each physical slot of each GPU
hosts, per MoE layer.

The policy is a pure function over arrays (numpy in, `Placement` out, no Ray, no I/O,
deterministic), so the load tracker can run it anywhere and tests can drive it alone. It improves
on DeepSeek's published EPLB in two ways (figures in docs/BENCHMARKS.md):

* balance (`raymoe.eplb.fresh`): replica counts minimise the largest per-replica load (as EPLB
  does), replicas are packed longest-first onto GPUs that do not yet hold that expert, and a
  local search then swaps replicas between the busiest GPU and any other GPU while that lowers
  the pair's maximum;
* migration (`raymoe.eplb.replan`): with `previous`, the plan keeps every replica in its slot,
  changes replica counts only where the bottleneck needs it, fills the freed slots, and refines
  with a small swap budget; a fresh plan (relabelled to overlap the previous one as much as
  possible) replaces it in a layer only when it balances that layer more than `tolerance` better.

Modes (`mode=`):

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

from typing import Any, Literal

import numpy as np

from raymoe.eplb.fresh import local_maps, pack_groups, plan_fresh
from raymoe.eplb.placement import Placement, check_same_shape
from raymoe.eplb.replan import regroup, replan

Mode = Literal["auto", "hierarchical", "global"]


def rebalance(
    load: Any,
    num_nodes: int,
    gpus_per_node: int,
    slots_per_gpu: int,
    num_groups: int,
    previous: Placement | None = None,
    mode: Mode = "auto",
    *,
    tolerance: float = 0.03,
    refine_swaps: int | None = None,
    move_swaps: int | None = None,
) -> Placement:
    """Plans every layer's placement from `load` [layers, logical experts] (tokens per expert).

    `mode` picks how (see the module docstring); the plan's `mode` says which one "auto" chose.
    `previous` makes the plan migration-aware; `tolerance` is how much worse (relative
    imbalance) a layer's anchored plan may be than a fresh one and still be kept.
    `refine_swaps` / `move_swaps` cap the local search per unit for fresh / anchored plans.
    Raises ValueError naming the problem for negative or NaN load, too few slots, groups that do
    not divide the experts, or a hierarchical request that the shape does not allow.
    """
    w_all = _validate(load, num_nodes, gpus_per_node, slots_per_gpu, num_groups, mode)
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance: expected a fraction in [0, 1), got {tolerance}")
    num_layers, n_exp = w_all.shape
    k = slots_per_gpu
    num_gpus = num_nodes * gpus_per_node
    why_not = _hierarchical_problem(n_exp, num_nodes, gpus_per_node, k, num_groups)
    if mode == "hierarchical" and why_not:
        raise ValueError(f"mode='hierarchical' is not possible: {why_not}")
    chosen = "hierarchical" if mode == "hierarchical" or (mode == "auto" and why_not is None) else "global"
    if previous is not None:
        shape_ref = Placement.from_phy2log(
            np.zeros((num_layers, num_gpus * k), dtype=np.int64), n_exp, num_nodes, gpus_per_node, k
        )
        check_same_shape(shape_ref, previous)
    if refine_swaps is None:
        refine_swaps = 4 * gpus_per_node * k if chosen == "hierarchical" else 4 * num_gpus * k
    # A unit is planned on its own: a layer (global), or a node of a layer (hierarchical), whose
    # local expert ids `to_fresh` maps to global ones.
    if chosen == "global":
        p = num_gpus
        to_fresh = np.broadcast_to(np.arange(n_exp), (num_layers, n_exp))
    else:
        p, n = gpus_per_node, n_exp // num_nodes
        group_size = n_exp // num_groups
        gpn = num_groups // num_nodes
        group_load = w_all.reshape(num_layers, num_groups, group_size).sum(-1)
        fresh_groups = pack_groups(group_load, num_nodes)
        to_fresh = local_maps(fresh_groups, num_nodes, gpn, group_size).reshape(num_layers * num_nodes, n)
    fresh = plan_fresh(w_all, to_fresh, p, k, refine_swaps)  # [layers * units, P, k]
    if previous is None:
        return Placement.from_phy2log(fresh.reshape(num_layers, -1), n_exp, num_nodes, gpus_per_node, k, chosen)

    to_anchor = to_fresh
    if chosen == "hierarchical":
        anchor_groups = regroup(
            group_load, fresh_groups, previous.phy2log, group_size, num_nodes, gpus_per_node * k, tolerance
        )
        to_anchor = local_maps(anchor_groups, num_nodes, gpn, group_size).reshape(num_layers * num_nodes, n)
    if move_swaps is None:
        move_swaps = max(2, (p * k) // 16)
    phy2log = replan(w_all, fresh, previous.phy2log, to_anchor, p, k, tolerance, move_swaps)
    return Placement.from_phy2log(phy2log, n_exp, num_nodes, gpus_per_node, k, chosen)


def _validate(
    load: Any, num_nodes: int, gpus_per_node: int, slots_per_gpu: int, num_groups: int, mode: str
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
    if mode not in ("auto", "hierarchical", "global"):
        raise ValueError(f"mode: expected 'auto', 'hierarchical' or 'global', got {mode!r}")
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
    """Why the hierarchical mode does not apply (None when it does)."""
    if num_nodes < 2:
        return "a single node (use the global mode)"
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
