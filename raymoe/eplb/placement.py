"""The placement of one deployment unit: which logical expert each physical slot hosts, per MoE layer.

`Placement` is what the policy returns and what the parallel runtime ships to its workers; its
three views (`phy2log`, `log2phy`, `replica_count`) are always derived from `phy2log`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-9


@dataclass(frozen=True, eq=False, slots=True)
class Placement:
    """A plan for every MoE layer of one deployment unit.

    Slot ``s`` of GPU ``g`` is physical slot ``g * slots_per_gpu + s``; GPU ``g`` is on node
    ``g // gpus_per_node``. `mode` names how it was planned (``"hierarchical"``, ``"global"``, or
    a caller's own label such as ``"decode"``).
    """

    phy2log: np.ndarray  # int64 [layers, num_slots]
    log2phy: np.ndarray  # int64 [layers, experts, max_replicas], padded with -1
    replica_count: np.ndarray  # int64 [layers, experts]
    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    mode: str = "global"

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
        mode: str = "global",
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
            mode=mode,
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
        return np.where(mean > 0, gpu.max(axis=1) / np.maximum(mean, EPS), 1.0)

    def imbalance(self, load: np.ndarray) -> float:
        """Mean over layers of busiest GPU load / mean GPU load."""
        return float(self.layer_imbalance(load).mean())

    def moves_from(self, previous: Placement | None) -> list[tuple[int, int, int, int]]:
        """(layer, gpu, slot, expert) weight copies needed to go from `previous` to this plan."""
        if previous is None:
            changed = np.ones_like(self.phy2log, dtype=bool)
        else:
            check_same_shape(self, previous)
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
        check_same_shape(self, previous)
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


def check_same_shape(a: Placement, b: Placement) -> None:
    """Raises ValueError unless `b` is a Placement of `a`'s unit shape, layers and experts."""
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
