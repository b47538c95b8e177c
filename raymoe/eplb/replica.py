"""Per-step replica choice: which physical slot serves each routed (token, logical expert) pair.

Torch ops on the device of the tensors it is given, before each MoE layer's dispatch. The parallel
runtime gives it a host copy of the routing ids (raymoe/parallel/dispatch.py copies them to the
CPU every MoE layer), so today it runs on the CPU. On a GPU it would not be free of host syncs
either: `torch.bincount` on a CUDA tensor reads its input's range back to the host, and the
balanced mode asks whether any expert has several replicas.

* ``static``: each expert's pairs are dealt round-robin over its replicas in token order. Stateless
  and cheap; each replica gets its expert's tokens to within one.
* ``balanced`` (dynamic redundancy): starting from the static split, every expert with several
  replicas re-spreads its tokens by water-filling over its replicas' GPUs given the load the
  others put there (damped Jacobi rounds, vectorised over experts and replicas, a fixed number of
  small ops per round). The result is checked against static and never worse.
"""

from __future__ import annotations

from typing import Literal

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


def _pair_order(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pairs sorted by expert, stable in token order; start of each expert's run; pairs per expert)."""
    counts = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat.int(), stable=True)  # int32 keys sort about twice as fast
    starts = torch.cumsum(counts, 0) - counts
    return order, starts, counts


def _static_split(counts: torch.Tensor, replica_count: torch.Tensor, max_rep: int) -> torch.Tensor:
    """Tokens per (expert, replica) [E, R] when each expert's tokens are dealt round-robin."""
    rc = replica_count.clamp(min=1)[:, None]
    j = torch.arange(max_rep, device=counts.device)[None, :]
    c = counts[:, None]
    return torch.where(j < rc, c // rc + (j < c % rc).long(), 0)


def _water_level(base: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[E] level L with sum_j max(0, L - base[e, j]) = counts[e]; base [E, R] is inf where padded.

    With the bases sorted, filling the m lowest gives level (counts + their sum) / m; the true
    level is the smallest of these over m (adding a bucket below the level lowers it, above raises it).
    """
    sb, _ = torch.sort(base, dim=1)
    finite = torch.isfinite(sb)
    m = torch.arange(1, sb.shape[1] + 1, device=sb.device, dtype=sb.dtype)
    level = (counts[:, None] + torch.cumsum(torch.where(finite, sb, 0.0), dim=1)) / m
    return torch.where(finite, level, torch.inf).amin(dim=1)


def _balanced_split(
    counts: torch.Tensor, log2phy: torch.Tensor, replica_count: torch.Tensor, slots_per_gpu: int,
    num_gpus: int, iterations: int,
) -> torch.Tensor:
    """Tokens per (expert, replica) [E, R] minimising the busiest GPU, in torch on the tensors' device
    (a fixed number of small ops; one host sync, whether any expert has several replicas).

    Damped Jacobi water-filling: every expert at once re-spreads its tokens over its replicas'
    GPUs given the others' current load, moving 1/n of the way where n is the most multi-replica
    experts sharing one of its GPUs (so experts converging on one idle GPU do not overshoot it).
    The best iterate is rounded per expert (cumulative rounding keeps each expert's total exact),
    and the static split is kept when it is no worse, so balanced never loses to static.
    """
    num_experts, max_rep = log2phy.shape
    static = _static_split(counts, replica_count, max_rep)
    valid = log2phy >= 0
    gpu = torch.where(valid, log2phy // slots_per_gpu, 0)
    multi = valid & (replica_count > 1)[:, None]
    if iterations < 1 or not bool(multi.any()):
        return static
    c = counts.double()
    share = torch.zeros(num_gpus, dtype=torch.float64, device=c.device).scatter_add_(
        0, gpu[multi], torch.ones_like(gpu[multi], dtype=torch.float64)
    )
    step = 1.0 / torch.where(multi, share[gpu], 1.0).amax(dim=1).clamp(min=1.0)
    x = static.double()
    best, best_max = x, torch.full((), torch.inf, dtype=torch.float64, device=c.device)
    flat_gpu = gpu.reshape(-1)
    for _ in range(iterations):
        load = torch.zeros(num_gpus, dtype=torch.float64, device=c.device).scatter_add_(0, flat_gpu, x.reshape(-1))
        peak = load.max()
        better = peak < best_max
        best = torch.where(better, x, best)
        best_max = torch.minimum(peak, best_max)
        base = torch.where(valid, load[gpu] - x, torch.inf)
        target = torch.where(valid, (_water_level(base, c)[:, None] - base).clamp(min=0.0), 0.0)
        x = torch.where(multi, x + step[:, None] * (target - x), x)
    cum = torch.round(torch.cumsum(best, dim=1)).long()
    cum[:, -1] = counts
    rounded = torch.diff(cum, dim=1, prepend=torch.zeros_like(cum[:, :1]))

    def peak_of(split: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_gpus, dtype=torch.long, device=c.device).scatter_add_(
            0, flat_gpu, split.reshape(-1)
        ).max()

    return torch.where(peak_of(rounded) <= peak_of(static), rounded, static)


def choose_replicas(
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    slots_per_gpu: int,
    topk_ids: torch.Tensor,
    mode: ReplicaChoice = "static",
    *,
    num_gpus: int | None = None,
    iterations: int = 32,
) -> torch.Tensor:
    """Physical slot [T, K] for each routed pair of `topk_ids` [T, K] (logical expert ids).

    `log2phy` [experts, max_replicas] (padded with -1) and `replica_count` [experts] are one
    layer of a `Placement` (`Placement.layer_tensors(layer, device)`); GPU of a slot is
    `slot // slots_per_gpu`. Pass `num_gpus` (otherwise read from `log2phy`, a device sync);
    `iterations` bounds the balanced mode's water-filling rounds.
    """
    _check(log2phy, replica_count, topk_ids)
    if mode not in ("static", "balanced"):
        raise ValueError(f"mode: expected 'static' or 'balanced', got {mode!r}")
    num_experts = log2phy.shape[0]
    flat = topk_ids.reshape(-1).long()
    if flat.numel() == 0:
        return torch.empty_like(topk_ids, dtype=torch.long)
    order, starts, counts = _pair_order(flat, num_experts)
    l2p = log2phy.to(flat.device).long()
    if mode == "static":
        rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        rc = replica_count.to(flat.device).long().clamp(min=1)
        slots = l2p[flat, rank % rc[flat]]
    else:
        if num_gpus is None:
            num_gpus = int(log2phy.max().item()) // slots_per_gpu + 1
        split = _balanced_split(counts, l2p, replica_count.to(flat.device).long(), slots_per_gpu, num_gpus, iterations)
        # In expert-sorted order, pair p goes to the (expert, replica) whose run of the split covers
        # p: one searchsorted over the flattened cumulative split instead of a [pairs, R] compare.
        ends = torch.cumsum(split.reshape(-1), 0)
        cell = torch.searchsorted(ends, torch.arange(flat.numel(), device=flat.device), right=True)
        slots = torch.empty_like(flat)
        slots[order] = l2p.reshape(-1)[cell]
    return slots.view(topk_ids.shape)


def gpu_token_counts(slots: torch.Tensor, slots_per_gpu: int, num_gpus: int) -> torch.Tensor:
    """Tokens each GPU computes for a step's chosen slots (for metrics and the benchmarks)."""
    return torch.bincount(slots.reshape(-1) // slots_per_gpu, minlength=num_gpus)
