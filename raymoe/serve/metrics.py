"""Serving metrics through `ray.util.metrics`: they reach the Ray dashboard and Prometheus.

Latencies are measured where the client sees them (the ingress); engine gauges per replica
(tagged with role and replica id); the KV handoff on the decode side, where it completes.
Names are the Prometheus names without Ray's prefix (Ray may add `ray_`).
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
_BYTES_BUCKETS = [2.0**k for k in range(10, 34, 2)]


class IngressMetrics:
    def __init__(self, model: str) -> None:
        tags = ("model", "endpoint")
        self.model = model
        self.ttft = Histogram(
            "raymoe_ttft_seconds", "time to first token", boundaries=_LATENCY_BUCKETS, tag_keys=tags
        )
        self.tpot = Histogram(
            "raymoe_tpot_seconds", "time per output token after the first", boundaries=_TPOT_BUCKETS, tag_keys=tags
        )
        self.e2e = Histogram(
            "raymoe_request_seconds", "request latency", boundaries=_LATENCY_BUCKETS, tag_keys=tags
        )
        self.prompt_tokens = Counter("raymoe_prompt_tokens_total", "prompt tokens received", tag_keys=tags)
        self.generation_tokens = Counter(
            "raymoe_generation_tokens_total", "tokens generated", tag_keys=tags
        )
        self.requests = Counter(
            "raymoe_requests_total", "requests by outcome", tag_keys=("model", "endpoint", "status")
        )

    def finished(
        self, endpoint: str, status: str, prompt: int, generated: int, ttft: float | None, tpot: float | None, e2e: float
    ) -> None:
        tags = {"model": self.model, "endpoint": endpoint}
        self.requests.inc(1, {**tags, "status": status})
        if prompt:
            self.prompt_tokens.inc(prompt, tags)
        if generated:
            self.generation_tokens.inc(generated, tags)
        if ttft is not None:
            self.ttft.observe(ttft, tags)
        if tpot is not None:
            self.tpot.observe(tpot, tags)
        self.e2e.observe(e2e, tags)


class ReplicaMetrics:
    def __init__(self, role: str, replica: str) -> None:
        self.tags = {"role": role, "replica": replica}
        keys = ("role", "replica")
        self.running = Gauge("raymoe_running_requests", "requests in the running batch", tag_keys=keys)
        self.waiting = Gauge("raymoe_waiting_requests", "requests waiting for the engine", tag_keys=keys)
        self.kv_used = Gauge("raymoe_kv_blocks_used", "KV cache blocks in use", tag_keys=keys)
        self.kv_free = Gauge("raymoe_kv_blocks_free", "KV cache blocks free", tag_keys=keys)
        self.handoff_bytes = Counter("raymoe_kv_handoff_bytes_total", "latent KV bytes handed off", tag_keys=keys)
        self.handoff_seconds = Histogram(
            "raymoe_kv_handoff_seconds",
            "prefill export to decode receipt of one request's KV",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=keys,
        )
        self.handoff_size = Histogram(
            "raymoe_kv_handoff_request_bytes", "latent KV bytes per request", boundaries=_BYTES_BUCKETS, tag_keys=keys
        )

    def engine(self, running: int, waiting: int, kv_used: int, kv_free: int) -> None:
        self.running.set(running, self.tags)
        self.waiting.set(waiting, self.tags)
        self.kv_used.set(kv_used, self.tags)
        self.kv_free.set(kv_free, self.tags)

    def handoff(self, nbytes: int, seconds: float) -> None:
        self.handoff_bytes.inc(nbytes, self.tags)
        self.handoff_size.observe(nbytes, self.tags)
        self.handoff_seconds.observe(max(seconds, 0.0), self.tags)


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
