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


def _water_fill(base: np.ndarray, n: int) -> np.ndarray:
    """Integer split of n tokens over GPUs with loads `base` minimising the largest sum."""
    r = base.size
    order = np.argsort(base, kind="stable")
    srt = base[order].astype(np.float64)
    csum = np.cumsum(srt)
    k = np.arange(1, r + 1)
    level = (n + csum) / k
    nxt = np.append(srt[1:], np.inf)
    m = int(np.argmax(level <= nxt))  # first prefix whose level does not reach the next GPU
    h = level[m]
    x_sorted = np.zeros(r, dtype=np.int64)
    x_sorted[: m + 1] = np.floor(h - srt[: m + 1] + 1e-9).clip(min=0).astype(np.int64)
    rem = n - int(x_sorted.sum())
    if rem > 0:
        extra = np.argsort(srt[: m + 1] + x_sorted[: m + 1], kind="stable")[:rem]
        x_sorted[extra] += 1
    elif rem < 0:  # float rounding gave one too many somewhere
        take = np.argsort(-(srt + x_sorted), kind="stable")
        for i in take:
            if rem == 0:
                break
            d = min(int(x_sorted[i]), -rem)
            x_sorted[i] -= d
            rem += d
    x = np.empty(r, dtype=np.int64)
    x[order] = x_sorted
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
    gpu = np.where(log2phy >= 0, log2phy // slots_per_gpu, 0)
    gpu_load = np.zeros(num_gpus, dtype=np.int64)
    np.add.at(gpu_load, gpu[log2phy >= 0], split[log2phy >= 0])
    multi = np.nonzero((replica_count > 1) & (counts > 0))[0]
    multi = multi[np.argsort(-counts[multi], kind="stable")]
    for _ in range(passes):
        changed = False
        for e in multi.tolist():
            r = int(replica_count[e])
            g = gpu[e, :r]
            base = gpu_load[g] - split[e, :r]
            new = _water_fill(base, int(counts[e]))
            if not np.array_equal(new, split[e, :r]):
                changed = True
                gpu_load[g] = base + new
                split[e, :r] = new
        if not changed:
            break
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
