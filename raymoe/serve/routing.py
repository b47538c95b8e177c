"""Request routing over engine replicas (Serve's custom request-router interface).

Each engine replica reports `record_routing_stats()` (KV blocks free/total, running, waiting);
the router ranks the candidate replicas with it and with its own count of requests in flight:

- `least_loaded` (prefill): fewest requests queued or running, then most free KV.
- `kv_room` (decode): replicas with at least `min_free_kv_fraction` of their KV free first,
  then fewest requests in flight, then most free KV.

Stats are refreshed every `request_routing_stats_period_s`; the in-flight count covers the gap.
A call with a `replica=` keyword goes to that replica (releasing KV a prefill replica pinned).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class EngineLoadRouter(RequestRouter):
    def initialize_state(self, policy: str = "least_loaded", min_free_kv_fraction: float = 0.05, **_: Any) -> None:
        if policy not in ("least_loaded", "kv_room"):
            raise ValueError(f"EngineLoadRouter: unknown policy {policy!r} (least_loaded, kv_room)")
        self.policy = policy
        self.min_free_kv_fraction = min_free_kv_fraction

    def _in_flight(self, replica: RunningReplica) -> int:
        n = self.replica_queue_len_cache.get(replica.replica_id)
        return int(n) if n is not None else 0

    def rank(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        def key(r: RunningReplica) -> tuple[float, ...]:
            s = r.routing_stats or {}
            total = max(1, int(s.get("kv_blocks_total", 1)))
            free_frac = float(s.get("kv_blocks_free", total)) / total
            in_flight = self._in_flight(r)
            if self.policy == "kv_room":
                return (free_frac < self.min_free_kv_fraction, in_flight, -free_frac)
            return (in_flight + int(s.get("waiting", 0)), -free_frac)

        return sorted(replicas, key=key)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target:  # a call about state one replica holds (PrefillServer.release)
            exact = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if exact:
                return [exact]
        return [[r] for r in self.rank(candidate_replicas)]
