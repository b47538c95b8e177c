"""Per-step replica choice: which physical slot serves each routed (token, logical expert) pair.

Runs on the device that holds the routing tensors, before each MoE layer's dispatch.

* ``static``: each expert's pairs are dealt round-robin over its replicas in token order. Stateless
  and cheap; each replica gets its expert's tokens to within one.
* ``balanced`` (dynamic redundancy): starting from the static split, each expert with several
  replicas in turn has its tokens re-spread by water-filling over its replicas' GPUs, given the
  load every other expert puts there. A pass never raises the busiest GPU's count, so the result
  is never worse than static; two passes get most of the gain. Only the per-expert token counts
  (a few hundred integers) leave the device for the water-filling.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ReplicaChoice = Literal["static", "balanced"]


def _check(log2phy: torch.Tensor, replica_count: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if log2phy.dim() != 2:
        raise ValueError(f"log2phy: expected [experts, max_replicas], got shape {list(log2phy.shape)}")
    if replica_count.shape != log2phy.shape[:1]:
        raise ValueError(
            f"replica_count: expected shape [{log2phy.shape[0]}], got {list(replica_count.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids: expected an integer tensor, got {topk_ids.dtype}")


def _pair_rank(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each pair among its expert's pairs in token order, pairs per expert)."""
    counts = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank, counts


def _water_fill(base: list[int], n: int) -> list[int]:
    """Integer split of n tokens over GPUs with loads `base` minimising the largest sum.

    Plain Python: an expert has a handful of replicas, where numpy's per-call cost dominates.
    """
    r = len(base)
    order = sorted(range(r), key=base.__getitem__)
    total = 0
    m = 0
    for i, idx in enumerate(order):
        total += base[idx]
        m = i + 1
        if m == r or n + total <= base[order[m]] * m:  # the level does not reach the next GPU
            break
    level = (n + total) // m  # >= every included base: they are integers below the real level
    x = [0] * r
    for idx in order[:m]:
        x[idx] = level - base[idx]
    for idx in order[: n + total - level * m]:
        x[idx] += 1
    return x


def _balanced_split(
    counts: np.ndarray, log2phy: np.ndarray, replica_count: np.ndarray, slots_per_gpu: int, num_gpus: int,
    passes: int,
) -> np.ndarray:
    """Tokens per (expert, replica) [E, R]: static split refined by per-expert water-filling."""
    num_experts, max_rep = log2phy.shape
    rc = np.maximum(replica_count, 1)
    j = np.arange(max_rep)[None, :]
    split = np.where(j < rc[:, None], counts[:, None] // rc[:, None] + (j < (counts % rc)[:, None]), 0)
    valid = log2phy >= 0
    gpu = np.where(valid, log2phy // slots_per_gpu, 0)
    load_arr = np.zeros(num_gpus, dtype=np.int64)
    np.add.at(load_arr, gpu[valid], split[valid])
    multi = np.nonzero((replica_count > 1) & (counts > 0))[0]
    multi = multi[np.argsort(-counts[multi], kind="stable")].tolist()
    gpu_load = load_arr.tolist()
    gpus = {e: gpu[e, : int(replica_count[e])].tolist() for e in multi}
    parts = {e: split[e, : int(replica_count[e])].tolist() for e in multi}
    n_of = {e: int(counts[e]) for e in multi}
    for _ in range(passes):
        changed = False
        for e in multi:
            g, old = gpus[e], parts[e]
            base = [gpu_load[gi] - xi for gi, xi in zip(g, old, strict=True)]
            new = _water_fill(base, n_of[e])
            if new != old:
                changed = True
                for gi, b, xi in zip(g, base, new, strict=True):
                    gpu_load[gi] = b + xi
                parts[e] = new
        if not changed:
            break
    for e in multi:
        split[e, : len(parts[e])] = parts[e]
    return split


def choose_replicas(
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    slots_per_gpu: int,
    topk_ids: torch.Tensor,
    mode: ReplicaChoice = "static",
    *,
    num_gpus: int | None = None,
    passes: int = 2,
) -> torch.Tensor:
    """Physical slot [T, K] for each routed pair of `topk_ids` [T, K] (logical expert ids).

    `log2phy` [experts, max_replicas] (padded with -1) and `replica_count` [experts] are one
    layer of a `Placement` (`Placement.layer_tensors(layer, device)`); GPU of a slot is
    `slot // slots_per_gpu`.
    """
    _check(log2phy, replica_count, topk_ids)
    if mode not in ("static", "balanced"):
        raise ValueError(f"mode: expected 'static' or 'balanced', got {mode!r}")
    num_experts = log2phy.shape[0]
    flat = topk_ids.reshape(-1).long()
    if flat.numel() == 0:
        return torch.empty_like(topk_ids, dtype=torch.long)
    rank, counts = _pair_rank(flat, num_experts)
    rc = replica_count.to(flat.device).long().clamp(min=1)
    if mode == "static":
        replica = rank % rc[flat]
    else:
        if num_gpus is None:
            num_gpus = int(log2phy.max().item()) // slots_per_gpu + 1
        split = _balanced_split(
            counts.cpu().numpy(), log2phy.cpu().numpy(), replica_count.cpu().numpy(), slots_per_gpu,
            num_gpus, passes,
        )
        cum = torch.from_numpy(np.cumsum(split, axis=1)).to(flat.device)  # [E, R]
        replica = (rank[:, None] >= cum[flat]).sum(dim=1)
    slots = log2phy.to(flat.device)[flat, replica]
    return slots.view(topk_ids.shape)


def gpu_token_counts(slots: torch.Tensor, slots_per_gpu: int, num_gpus: int) -> torch.Tensor:
    """Tokens each GPU computes for a step's chosen slots (for metrics and the benchmarks)."""
    return torch.bincount(slots.reshape(-1) // slots_per_gpu, minlength=num_gpus)
