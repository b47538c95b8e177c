"""The load tracker's metrics through `ray.util.metrics` (Ray dashboard, Prometheus), beside the tracker
they describe: the eplb layer does not reach up into the serving layer for them."""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_STAGE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
_COMMIT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class TrackerMetrics:
    """A LoadTracker's metrics (one unit kind, tagged `role`).

    Expert load is a gauge per (layer, expert): each expert's tokens over the window relative to its
    layer's mean (1.0 = an even share). A Grafana heatmap draws it as it is (layer rows, expert
    columns, or hottest expert per layer over time) and a busy expert keeps its identity, which a
    per-layer histogram of loads would lose; DeepSeek-V3's 58 MoE layers x 257 experts are ~15k
    series per unit kind, published only by the tracker (one process), every `poll_s`."""

    def __init__(self, app: str, role: str) -> None:
        self.tags = {"app": app, "role": role}
        keys = ("app", "role")
        self.expert_load = Gauge(
            "raymoe_expert_load", "expert tokens over the load window / the layer's mean", tag_keys=(*keys, "layer", "expert")
        )
        self.imbalance_now = Gauge(
            "raymoe_expert_imbalance", "busiest GPU / mean GPU tokens of the current placement (mean over layers)",
            tag_keys=keys,
        )
        self.imbalance_planned = Gauge(
            "raymoe_expert_imbalance_projected", "busiest GPU / mean GPU tokens of the latest re-plan", tag_keys=keys
        )
        self.migrations = Counter("raymoe_expert_migrations_total", "replica migrations committed", tag_keys=keys)
        self.moved = Counter("raymoe_experts_moved_total", "expert copies moved by migrations", tag_keys=keys)
        self.moved_bytes = Counter("raymoe_expert_bytes_moved_total", "expert weight bytes moved", tag_keys=keys)
        self.stage_s = Histogram(
            "raymoe_expert_stage_seconds", "begin_migration to every worker staged", boundaries=_STAGE_BUCKETS,
            tag_keys=keys,
        )
        self.commit_s = Histogram(
            "raymoe_expert_commit_seconds", "extra time of the commit step", boundaries=_COMMIT_BUCKETS, tag_keys=keys
        )
        self.skips = Counter(
            "raymoe_expert_replans_skipped_total", "re-plans not migrated (gain below min_gain, nothing to move)",
            tag_keys=(*keys, "reason"),
        )
        self.errors = Counter(
            "raymoe_tracker_errors_total", "tracker polls or replica migrations that failed", tag_keys=(*keys, "kind")
        )

    def load(self, load: Any) -> None:
        mean = load.mean(axis=1, keepdims=True)
        ratio = load / (mean + (mean == 0))
        for layer, row in enumerate(ratio.tolist()):
            for expert, value in enumerate(row):
                self.expert_load.set(value, {**self.tags, "layer": str(layer), "expert": str(expert)})

    def imbalance(self, current: float, projected: float | None) -> None:
        self.imbalance_now.set(current, self.tags)
        if projected is not None:
            self.imbalance_planned.set(projected, self.tags)

    def migrated(self, result: Any) -> None:
        self.migrations.inc(1, self.tags)
        if result.moved:
            self.moved.inc(result.moved, self.tags)
        if result.bytes:
            self.moved_bytes.inc(result.bytes, self.tags)
        self.stage_s.observe(result.stage_s, self.tags)
        self.commit_s.observe(result.commit_s, self.tags)

    def skipped(self, reason: str) -> None:
        self.skips.inc(1, {**self.tags, "reason": "no_moves" if reason == "no moves" else "min_gain"})

    def error(self, kind: str) -> None:
        self.errors.inc(1, {**self.tags, "kind": kind})
