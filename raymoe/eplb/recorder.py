"""Expert load statistics: per-(layer, logical expert) token counts over a sliding window of steps.

Every rank records its own routing results (one index_add per layer, on the routing device,
no host sync and no Python loop per token); the load tracker merges the ranks' snapshots (counts add) and feeds the
sum to `rebalance`.
"""

from __future__ import annotations

import numpy as np
import torch


class ExpertLoadRecorder:
    """Ring buffer of token counts: the last `window_steps` closed steps plus the open one."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int = 1024,
                 device: torch.device | str = "cpu") -> None:
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts), ("window_steps", window_steps)):
            if v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window_steps = window_steps
        # one scratch column past the experts: ids there are dropped without a check (a check would sync a GPU)
        self.counts = torch.zeros(window_steps + 1, num_layers, num_experts + 1, dtype=torch.int64, device=device)
        self.step_index = 0  # steps completed since creation
        self.merged = np.zeros((num_layers, num_experts), dtype=np.float64)  # counts added from elsewhere

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Adds one MoE layer's routed expert ids ([T, K], any integer dtype) to the current step.

        Ids at or past `num_experts` (e.g. a shared expert routed as one more id) are not counted;
        they are not checked either, since that would cost a device sync per layer.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} outside [0, {self.num_layers})")
        flat = topk_ids.reshape(-1).to(self.counts.device, torch.long).clamp(max=self.num_experts)
        self.counts[self.step_index % (self.window_steps + 1), layer].index_add_(0, flat, torch.ones_like(flat))

    def step(self) -> None:
        """Closes the current step; the oldest step leaves the window."""
        self.step_index += 1
        self.counts[self.step_index % (self.window_steps + 1)].zero_()

    def load(self) -> np.ndarray:
        """[layers, experts] float64 tokens over the window (plus merged counts): `rebalance`'s input."""
        return self.counts[..., : self.num_experts].sum(0).cpu().numpy().astype(np.float64) + self.merged

    def merge(self, other: ExpertLoadRecorder | np.ndarray) -> None:
        """Adds another rank's window (a recorder or its `load()`): counts add.

        The merged counts are a snapshot: they stay in `load()` until `reset()` and do not slide
        out with this recorder's steps (the tracker merges fresh snapshots each re-plan).
        """
        arr = other.load() if isinstance(other, ExpertLoadRecorder) else np.asarray(other, dtype=np.float64)
        if arr.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"merge: expected shape {[self.num_layers, self.num_experts]}, got {list(arr.shape)}"
            )
        self.merged += arr

    def reset(self) -> None:
        self.counts.zero_()
        self.merged[:] = 0
