"""The driver side of an expert-parallel deployment unit: an `Executor` over GPU worker actors.

Ray is the control plane only: one STRICT_PACK placement group per node, one worker actor per
GPU, one Ray call per worker per step (the inputs of its DP rank), health through the results.
The data plane (TP all-reduce, dispatch/combine all-to-alls) is torch.distributed inside the
unit, rendezvousing at a TCP store the driver hosts. A worker that dies fails the step at once
with a clear error; the unit is then torn down and must be rebuilt as a whole. Expert placements
change live (`begin_migration`): workers stage the weights beside the steps, and a step commits.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from raymoe.engine.config import EngineConfig
from raymoe.engine.executor import ModelInput, SamplerOutput
from raymoe.eplb import Placement, rebalance
from raymoe.eplb.migration import MigrationError, MigrationResult, MigrationStatus
from raymoe.eplb.placement import check_same_shape
from raymoe.model.config import ModelConfig
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.dispatch import LayerStats
from raymoe.parallel.migration import StagingReport
from raymoe.parallel.topology import Topology
from raymoe.parallel.worker import (
    GPUWorker,
    MigrationOrder,
    PlacementMaps,
    WorkerMigrationStatus,
    WorkerSpec,
    WorkerStepResult,
)

log = logging.getLogger(__name__)


class UnitFailure(RuntimeError):
    """The deployment unit lost a worker (or a step timed out): it is down and must be restarted whole."""


@dataclass
class StepStats:
    """One step of the unit, summed over workers and MoE layers (bytes of hidden states, dispatch + combine)."""

    bytes_inter_node: int = 0
    bytes_intra_node: int = 0
    busiest_gpu_tokens: float = 0.0  # per MoE layer: max over GPUs of (token, expert) pairs computed, mean over layers
    mean_gpu_tokens: float = 0.0
    worker_seconds: list[float] = field(default_factory=list)

    @classmethod
    def from_workers(cls, per_worker: list[dict[int, LayerStats]], seconds: list[float]) -> StepStats:
        layers = sorted({layer for s in per_worker for layer in s})
        out = cls(worker_seconds=seconds)
        busiest, mean = [], []
        for layer in layers:
            tokens = [s[layer].expert_tokens if layer in s else 0 for s in per_worker]
            busiest.append(max(tokens))
            mean.append(sum(tokens) / len(tokens))
            for s in per_worker:
                if layer in s:
                    out.bytes_inter_node += s[layer].bytes_inter_node
                    out.bytes_intra_node += s[layer].bytes_intra_node
        out.busiest_gpu_tokens = float(np.mean(busiest)) if busiest else 0.0
        out.mean_gpu_tokens = float(np.mean(mean)) if mean else 0.0
        return out


class _UnitMetrics:
    """The unit's exchange counters as Ray metrics (dashboard, Prometheus): bytes per link kind, expert batch."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.bytes = metrics.Counter(
            "raymoe_ep_exchange_bytes", "hidden-state bytes sent by dispatch + combine", tag_keys=("link",)
        )
        self.busiest = metrics.Gauge(
            "raymoe_ep_busiest_gpu_tokens", "busiest GPU's (token, expert) pairs per MoE layer in the last step"
        )
        self.steps = metrics.Counter("raymoe_ep_steps", "steps run by expert-parallel units")

    def record(self, s: StepStats) -> None:
        if s.bytes_inter_node:
            self.bytes.inc(s.bytes_inter_node, tags={"link": "inter_node"})
        if s.bytes_intra_node:
            self.bytes.inc(s.bytes_intra_node, tags={"link": "intra_node"})
        self.busiest.set(s.busiest_gpu_tokens)
        self.steps.inc()


@dataclass
class _Migration:
    """The migration in flight: staged on every worker (each reports its `StagingReport`), then committed."""

    placement: Placement
    version: int
    reports: list[StagingReport | None]

    @property
    def staged(self) -> bool:
        return all(r is not None and r.done and r.error is None for r in self.reports)

    @property
    def ended(self) -> bool:
        return all(r is not None and r.done for r in self.reports)


def initial_placement(
    topo: Topology, model: ModelConfig, node_limited: bool, load: np.ndarray | None = None
) -> Placement:
    """Placement of every MoE layer from `load` (uniform without statistics): groups on nodes when node-limited."""
    n_moe = len(model.moe_layers)
    if topo.shared_expert_gpus:
        from raymoe.parallel.placement import decode_placement

        return decode_placement(topo, n_moe, load)
    if load is None:
        load = np.ones((n_moe, model.n_routed_experts))
    return rebalance(
        load, topo.nodes, topo.gpus_per_node, topo.slots_per_gpu, model.n_group,
        mode="auto" if node_limited else "global",
    )


class ExpertParallelExecutor:
    """Runs the engine's steps on one deployment unit of `nodes x gpus_per_node` worker actors."""

    FAILURE_GRACE_S = 5.0  # after a failed call, how long to wait for the others to say which worker died

    def __init__(self, config: EngineConfig, parallel: ParallelConfig, *, placement: Placement | None = None) -> None:
        """Place and start the workers; they load their weights and size their caches (`kv_cache_tokens` on each
        device), and every rank gets the smallest budget, so `num_kv_blocks` is the same on all of them."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=parallel.ray_address or "auto", log_to_driver=False)
        self.parallel = parallel
        self.model_config = ModelConfig.from_checkpoint(config.model)
        self.topo = Topology.from_config(parallel, self.model_config)
        self.placement = placement or initial_placement(self.topo, self.model_config, parallel.node_limited)
        self.placement_version = 0  # +1 per committed migration
        self.last_migration: MigrationResult | None = None
        self._migration: _Migration | None = None
        self._migration_error: str | None = None
        self._block_size = config.block_size
        self._num_kv_blocks = 0  # set once the workers have reported what fits
        self._failure: str | None = None
        self.last_stats = StepStats()
        self._metrics: _UnitMetrics | None = None
        self._store: Any = torch.distributed.TCPStore(
            "0.0.0.0", 0, is_master=True, wait_for_workers=False,  # port 0: the OS picks a free one
            timeout=timedelta(seconds=parallel.collective_timeout_s),
        )
        host = ray.util.get_node_ip_address()
        unit_id = f"raymoe-unit-{uuid.uuid4().hex[:8]}/"
        g = self.topo.gpus_per_node
        bundle: dict[str, float] = {"GPU": 1}
        if parallel.node_resource:
            bundle[parallel.node_resource] = 0.001
        self.pgs = [placement_group([dict(bundle)] * g, strategy="STRICT_PACK") for _ in range(self.topo.nodes)]
        ready = [pg.ready() for pg in self.pgs]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=parallel.placement_timeout_s)
        if len(done) < len(ready):
            self._teardown()
            raise UnitFailure(
                f"cannot place the unit: {self.topo.nodes} node(s) with {g} free GPU(s) each are needed "
                f"(one STRICT_PACK placement group per node); only {len(done)} placed within "
                f"placement_timeout_s={parallel.placement_timeout_s}"
            )
        actor = ray.remote(GPUWorker)
        maps = PlacementMaps.of(self.placement)
        self.workers = [
            actor.options(
                num_gpus=1,
                num_cpus=parallel.worker_cpus,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pgs[self.topo.node_of(r)], placement_group_bundle_index=self.topo.local_of(r)
                ),
            ).remote(
                WorkerSpec(
                    rank=r, topo=self.topo, engine=config, parallel=parallel, maps=maps,
                    store_host=host, store_port=self._store.port, unit_id=unit_id,
                )
            )
            for r in range(self.topo.world_size)
        ]
        tokens = min(self._gather([w.setup.remote() for w in self.workers]))
        self._num_kv_blocks = -(-tokens // self._block_size)
        self._gather([w.allocate_kv_cache.remote(self._num_kv_blocks) for w in self.workers])

    # --- Executor protocol -----------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.topo.dp_size

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    def execute(self, inputs: list[ModelInput | None]) -> list[SamplerOutput | None]:
        return self._step(inputs, want_logits=False)  # type: ignore[return-value]

    def compute_logits(self, inputs: list[ModelInput | None]) -> list[torch.Tensor | None]:
        """A step that returns each rank's float32 logits of its sampled rows instead of tokens (tests, checks)."""
        return self._step(inputs, want_logits=True)  # type: ignore[return-value]

    def read_kv(self, dp_rank: int, block_ids: list[int]) -> torch.Tensor:
        self._check_blocks(dp_rank, block_ids)
        return self._gather([self.workers[self.topo.attention_group(dp_rank)[0]].read_kv.remote(block_ids)])[0]

    def write_kv(self, dp_rank: int, block_ids: list[int], kv: torch.Tensor) -> None:
        self._check_blocks(dp_rank, block_ids)
        c = self.model_config
        want = (c.num_hidden_layers, len(block_ids), self._block_size, c.kv_cache_dim)
        if tuple(kv.shape) != want:
            raise ValueError(f"kv shape {tuple(kv.shape)} does not match {want}")
        self._gather([self.workers[r].write_kv.remote(block_ids, kv) for r in self.topo.attention_group(dp_rank)])

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "the unit was shut down"
        self._teardown()

    # --- beyond the protocol ---------------------------------------------------------------------
    def expert_load(self) -> np.ndarray:
        """[moe_layers, experts] routed assignments over the last `load_window_steps` steps, all ranks merged
        (each rank records its own with `raymoe.eplb.recorder.ExpertLoadRecorder`): `rebalance`'s input."""
        per_worker = self._gather([w.expert_load.remote() for w in self.workers])
        return np.sum(per_worker, axis=0)

    # --- live expert migration (raymoe.eplb.migration.ExpertHost) -------------------------------------
    def begin_migration(self, placement: Placement) -> None:
        """Start moving to `placement` (e.g. `rebalance(expert_load(), ..., previous=self.placement)`) while
        steps go on: every worker stages the experts it gains (from a peer that hosts them, else from the
        checkpoint) on a background thread; the first step once all have staged commits on every rank.

        Not thread-safe, like `execute`: call it (and `migration_status`, `commit_idle`) from the thread
        that steps the engine. ValueError: a placement of another shape; RuntimeError: one in flight.
        """
        if self._migration is not None:
            raise RuntimeError(f"a migration to placement version {self._migration.version} is in flight")
        try:
            check_same_shape(self.placement, placement)
        except ValueError as e:
            raise ValueError(f"placement: {e} (the unit's placement)") from None
        version = self.placement_version + 1
        order = MigrationOrder(version, PlacementMaps.of(placement))
        self._gather([w.begin_migration.remote(order) for w in self.workers])
        self._migration = _Migration(placement, version, [None] * len(self.workers))
        self._migration_error = None

    def migration_status(self) -> MigrationStatus:
        """Where the migration stands; while it stages, one cheap status call per worker (between steps)."""
        m = self._migration
        if m is not None and not m.staged:
            self._observe(self._gather([w.migration_status.remote() for w in self.workers]))
        m = self._migration
        return MigrationStatus(
            placement_version=self.placement_version,
            staging=m is not None and not m.staged,
            pending_commit=m is not None and m.staged,
            last=self.last_migration,
            error=self._migration_error,
        )

    def commit_idle(self) -> MigrationResult | None:
        """Commit a fully staged migration with an all-empty step (the engine has no work); None if none is staged."""
        if not self.migration_status().pending_commit:
            return None
        self._step([None] * self.dp_size, want_logits=False)
        return self.last_migration

    def migrate(self, placement: Placement, timeout_s: float = 120.0) -> MigrationResult:
        """begin_migration, wait for the staging, commit with an empty step: for offline use and tests.

        MigrationError: staging failed (the old placement stays). TimeoutError: still staging after
        `timeout_s` (it stays in flight: a later step or `commit_idle` commits it)."""
        self.begin_migration(placement)
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.commit_idle()
            if result is not None:
                return result
            if self._migration is None:
                raise MigrationError(self._migration_error or "migration failed")
            if time.monotonic() > deadline:
                v = self._migration.version
                raise TimeoutError(f"migration to placement version {v} still staging after {timeout_s} s")
            time.sleep(0.005)

    def worker_migration_status(self) -> list[WorkerMigrationStatus]:
        """Each worker's own view: its step counter, placement version, the step of its latest commit."""
        return self._gather([w.migration_status.remote() for w in self.workers])

    def _observe(self, statuses: list[WorkerMigrationStatus]) -> None:
        """Take the workers' staging reports; a staging that ended with an error anywhere is dropped everywhere."""
        m = self._migration
        if m is None:
            return
        for i, st in enumerate(statuses):
            if st.staging is not None and st.staging.version == m.version:
                m.reports[i] = st.staging
        if not m.ended or m.staged:
            return
        errors = [r.error for r in m.reports if r is not None and r.error is not None]
        self._gather([w.discard_migration.remote() for w in self.workers])
        self._migration = None
        why = "; ".join(errors)
        self._migration_error = f"migration to placement version {m.version} failed, the old placement stays: {why}"
        log.warning("expert-parallel unit: %s", self._migration_error)

    def _committed(self, m: _Migration, results: list[WorkerStepResult]) -> None:
        versions = {r.migration.placement_version for r in results}
        if versions != {m.version}:
            self._fail(f"placement version {m.version} committed on some workers only (versions {sorted(versions)})")
        reports = [r for r in m.reports if r is not None]
        self.placement, self.placement_version, self._migration = m.placement, m.version, None
        self.last_migration = MigrationResult(
            placement_version=m.version,
            moved=sum(r.copies for r in reports),
            bytes=sum(r.bytes for r in reports),
            from_peers=sum(r.from_peers for r in reports),
            from_disk=sum(r.from_disk for r in reports),
            stage_s=max(r.seconds for r in reports),
            commit_s=max(r.commit_s for r in results),
        )

    def set_options(
        self, *, overlap: bool | None = None, replica_choice: str | None = None, node_limited: bool | None = None
    ) -> None:
        """Switch overlap / replica choice / hierarchical exchange on a running unit (between steps, every
        worker at once; the placement stays as built)."""
        update: dict[str, Any] = {}
        if node_limited is not None:
            update["node_limited"] = node_limited
        if overlap is not None:
            update["overlap"] = overlap
        if replica_choice is not None:
            update["replica_choice"] = replica_choice
        self.parallel = ParallelConfig.model_validate({**self.parallel.model_dump(), **update})
        p = self.parallel
        self._gather([
            w.set_options.remote(overlap=p.overlap, replica_choice=p.replica_choice, node_limited=p.node_limited)
            for w in self.workers
        ])

    def worker_pids(self) -> list[int]:
        return self._gather([w.pid.remote() for w in self.workers])

    def _check_blocks(self, dp_rank: int, block_ids: list[int]) -> None:
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range (dp_size={self.dp_size})")
        if block_ids and not (0 <= min(block_ids) and max(block_ids) < self._num_kv_blocks):
            raise ValueError(f"block_ids out of range [0, {self._num_kv_blocks})")

    def _step(self, inputs: list[ModelInput | None], want_logits: bool) -> list[Any]:
        import ray

        if len(inputs) != self.dp_size:
            raise ValueError(f"{self.dp_size} DP ranks, got {len(inputs)} inputs")
        refs = [ray.put(inp) if inp is not None else None for inp in inputs]
        m = self._migration
        commit = m.version if m is not None and m.staged else None  # every rank switches at the start of this step
        calls = [
            w.step.remote(refs[self.topo.dp_rank_of(r)], want_logits, commit) for r, w in enumerate(self.workers)
        ]
        results: list[WorkerStepResult] = self._gather(calls)
        if m is not None and commit is not None:
            self._committed(m, results)
        else:
            self._observe([r.migration for r in results])
        self.last_stats = StepStats.from_workers([r.stats for r in results], [r.seconds for r in results])
        if self._metrics is None:
            self._metrics = _UnitMetrics()
        self._metrics.record(self.last_stats)
        return [results[self.topo.attention_group(d)[0]].output for d in range(self.dp_size)]

    def _gather(self, refs: list[Any]) -> list[Any]:
        """ray.get of one call per worker that fails at the first failed worker instead of waiting on the others."""
        import ray

        if self._failure is not None:
            raise UnitFailure(f"expert-parallel unit is down: {self._failure}")
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.parallel.step_timeout_s)
            if not ready:
                self._fail(f"no answer from {len(pending)} worker(s) within step_timeout_s={self.parallel.step_timeout_s}")
            for ref in ready:
                try:
                    out[index[ref]] = ray.get(ref)
                except ray.exceptions.RayError:
                    self._fail(self._diagnose(ref, pending, index, len(refs)))
        return out

    def _diagnose(self, first: Any, pending: list[Any], index: dict[Any, int], n: int) -> str:
        """Name the dead worker: its peers' collectives fail too, often first; wait briefly for the real cause."""
        import ray

        failed = [first]
        if pending:
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=self.FAILURE_GRACE_S)
            failed += more
        died, errors = [], []
        for ref in failed:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                died.append(f"worker {self._where(index[ref], n)} died ({type(e).__name__})")
            except ray.exceptions.RayTaskError as e:
                errors.append(f"worker {self._where(index[ref], n)} failed: {e.cause!r}")
        if died:
            return "; ".join(died) + (f" ({len(errors)} peer(s) failed after it)" if errors else "")
        return errors[0] if errors else "a worker failed"

    def _where(self, i: int, n: int) -> str:
        if n != self.topo.world_size:
            return f"call {i}"
        return f"rank {i} (node {self.topo.node_of(i)}, GPU {self.topo.local_of(i)})"

    def _fail(self, why: str) -> None:
        self._failure = why
        self._teardown()
        raise UnitFailure(f"expert-parallel unit failed: {why}; the unit is torn down and must be restarted as a whole")

    def _teardown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w, no_restart=True)
            except Exception:
                pass
        self.workers = []
        self._store = None  # the rendezvous is over; frees its port
        for pg in getattr(self, "pgs", []):
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.pgs = []

