"""Serving metrics through `ray.util.metrics`: they reach the Ray dashboard and Prometheus.

Latencies are measured where the client sees them (the ingress); engine gauges per replica
(tagged with role and replica id); the KV handoff on the decode side, where it completes.
Names are the Prometheus names without Ray's prefix (Ray may add `ray_`).
"""

from __future__ import annotations

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
