"""DeepSeek's published EPLB algorithm (deepseek-ai/EPLB, eplb.py), re-implemented from its
description for side-by-side comparison with raymoe.eplb on the same traces.

balanced_packing: items sorted by weight, each to the lightest pack that still has room.
replicate_experts: every extra slot goes to the expert with the highest load per replica.
Hierarchical (when groups divide nodes): pack groups onto nodes, replicate inside each node,
pack the node's physical experts onto its GPUs. Otherwise the same with one node and one group.
Like the original, it loops in Python per layer in the packing step and does not forbid two
replicas of one expert on a GPU.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    num_layers, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        idx = np.broadcast_to(np.arange(num_items), weight.shape).copy()
        return idx, np.zeros_like(idx)
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    indices = np.argsort(-weight, axis=-1, kind="stable")
    for i in range(num_layers):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in indices[i].tolist():
            pack = min(
                (j for j in range(num_packs) if pack_items[j] < per_pack), key=pack_weights.__getitem__
            )
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += float(weight[i, item])
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy), (n, 1))
    rank = np.zeros((n, num_phy), dtype=np.int64)
    logcnt = np.ones((n, num_log), dtype=np.int64)
    rows = np.arange(n)
    for i in range(num_log, num_phy):
        red = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = red
        rank[:, i] = logcnt[rows, red]
        logcnt[rows, red] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus
    # Step 1: groups to nodes.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)).reshape(
        num_layers, -1
    )
    mlog2log = _inverse(log2mlog)
    # Step 2: replicas inside nodes.
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, num_logical // num_nodes)
    phy2mlog, _phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)
    # Step 3: physical experts to GPUs.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=-1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1)
        + np.arange(0, num_logical, num_logical // num_nodes)[None, :, None]
    ).reshape(num_layers, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, axis=-1)


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """phy2log [layers, num_replicas] like DeepSeek's `rebalance_experts`."""
    weight = np.asarray(weight, dtype=np.float64)
    if num_groups % num_nodes == 0:
        return rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
