"""The LoadTracker: re-plans a unit kind's expert placement from live load and migrates its replicas.

DeepSeek-V3 (report, section 3.4): "high-load experts are detected based on statistics collected
during the online deployment and are adjusted periodically". One tracker per unit kind of an app
(prefill, decode) runs as a named Ray actor beside the app. Every `poll_s` it reads each
replica's `ExpertState` (windowed load, placement), merges the loads, and measures the current
placement's imbalance. When `interval_s` has passed, or the imbalance exceeds
`trigger_imbalance`, it re-plans in its own process (`rebalance(..., previous=placement)`) and,
unless the projected gain (current / re-planned imbalance) is below `min_gain`, asks the
replicas to migrate to the plan, one at a time, so the others keep their full capacity. A
replica that refuses or fails is reported (metric + log line) and the loop keeps going.

The decisions are pure functions (`merge_loads`, `imbalance_of`, `plan_placement`, `due`,
`decide`) tested without Ray; `LoadTracker` is a thin shell over them and a `UnitClient` (the
replicas of one deployment, through Serve: `ServeUnit`). Serving never depends on the tracker:
it only calls the replicas' `expert_state` and `migrate`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from raymoe.eplb.migration import MigrationResult
from raymoe.eplb.placement import EPS, Placement
from raymoe.eplb.policy import rebalance

log = logging.getLogger("raymoe.eplb.tracker")

TRACKER_NAMESPACE = "raymoe"
HISTORY = 32  # re-plan events a tracker keeps


# --- messages (they cross process boundaries) --------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExpertState:
    """One replica's answer to `expert_state()`: its placement and windowed expert load."""

    role: str
    replica: str
    placement_version: int
    placement: Placement | None  # None: a single-process unit hosting every expert
    load: np.ndarray | None  # [moe_layers, experts] over the window; None: this unit records none
    imbalance: float  # its placement over its own load (1.0 without load)
    migrations: int  # migrations this replica committed
    last_migration: MigrationResult | None
    staging: bool  # a migration is in flight
    error: str | None  # why the latest migration failed, or why there is no load
    num_groups: int  # what `rebalance` plans with for this unit
    plan_mode: Literal["auto", "global"]
    window_steps: int


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """A tracker's knobs (the unit's `eplb:` section, `raymoe.serve.config.EplbSection`)."""

    interval_s: float = 600.0
    poll_s: float = 10.0
    trigger_imbalance: float | None = None
    min_gain: float = 1.05
    tolerance: float = 0.03
    max_moves: int | None = None
    migration_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What one re-plan decided: migrate, or skip and why."""

    migrate: bool
    reason: str  # interval | trigger | forced, or why it skipped
    current: float
    projected: float
    moves: int

    @property
    def gain(self) -> float:
        return self.current / max(self.projected, EPS)


@dataclass(frozen=True, slots=True)
class RebalanceResult:
    """One replica's outcome of a re-plan (`POST /v1/experts/rebalance` answers a list of them)."""

    role: str
    replica: str
    placement_version: int
    moved: int
    error: str | None = None
    result: MigrationResult | None = None


@dataclass(frozen=True, slots=True)
class TrackerEvent:
    """One re-plan in the tracker's short history."""

    at: float  # time.time()
    decision: Decision
    results: list[RebalanceResult]


@dataclass(slots=True)
class TrackerReport:
    """A tracker's view of its unit kind (`LoadTracker.report()`; `GET /v1/experts` adds it)."""

    role: str
    replicas: int
    imbalance: float | None  # current placement over the merged window (None before the first poll)
    projected_imbalance: float | None  # the latest re-plan's
    polls: int
    replans: int
    skipped: int
    migrations: int
    errors: int
    last_error: str | None
    history: list[TrackerEvent] = field(default_factory=list)


def describe(exc: BaseException) -> str:
    """One line for a failure: a Ray task error's cause (its own text carries the remote traceback)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


# --- pure decisions ----------------------------------------------------------------------------
def merge_loads(loads: list[np.ndarray]) -> np.ndarray | None:
    """The unit kind's load: every replica's window added (None when no replica records load)."""
    arrs = [np.asarray(x, dtype=np.float64) for x in loads if x is not None]
    if not arrs:
        return None
    shape = arrs[0].shape
    for a in arrs[1:]:
        if a.shape != shape:
            raise ValueError(f"expert load: replicas disagree on the shape ({list(shape)} vs {list(a.shape)})")
    return np.sum(arrs, axis=0)


def expert_imbalance(load: np.ndarray) -> float:
    """Mean over layers of the busiest expert / mean expert: a placement of one expert per GPU (what a
    single-process unit, which hosts every expert, would have on an expert-parallel unit)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=1)
    per_layer = np.where(mean > 0, load.max(axis=1) / np.maximum(mean, EPS), 1.0)
    return float(per_layer.mean())


def imbalance_of(placement: Placement | None, load: np.ndarray | None) -> float:
    """Busiest GPU / mean GPU tokens, mean over layers (1.0 without load)."""
    if load is None or not np.asarray(load).any():
        return 1.0
    return expert_imbalance(load) if placement is None else placement.imbalance(load)


def limit_moves(plan: Placement, previous: Placement, load: np.ndarray, max_moves: int) -> Placement:
    """The plan with only its most useful layers (imbalance removed per copy moved) until `max_moves`:
    each layer's plan is whole, so the result is valid; the others keep the previous slots."""
    changed = plan.phy2log != previous.phy2log
    moves = changed.sum(axis=1)
    if int(moves.sum()) <= max_moves:
        return plan
    gain = previous.layer_imbalance(load) - plan.layer_imbalance(load)
    order = np.argsort(-(gain / np.maximum(moves, 1)), kind="stable")
    phy2log = previous.phy2log.copy()
    budget = max_moves
    for layer in order.tolist():
        if moves[layer] == 0 or gain[layer] <= 0 or moves[layer] > budget:
            continue
        phy2log[layer] = plan.phy2log[layer]
        budget -= int(moves[layer])
    return Placement.from_phy2log(
        phy2log, plan.num_experts, plan.num_nodes, plan.gpus_per_node, plan.slots_per_gpu, plan.mode
    )


def plan_placement(
    previous: Placement, load: np.ndarray, *, num_groups: int, mode: Literal["auto", "global"],
    tolerance: float, max_moves: int | None = None,
) -> Placement:
    """A few-move re-plan of `previous` for `load` (`rebalance` with `previous`), capped at `max_moves`."""
    plan = rebalance(
        load, previous.num_nodes, previous.gpus_per_node, previous.slots_per_gpu, num_groups,
        previous=previous, mode=mode, tolerance=tolerance,
    )
    plan = Placement.from_phy2log(
        plan.phy2log, plan.num_experts, plan.num_nodes, plan.gpus_per_node, plan.slots_per_gpu, previous.mode
    )
    if max_moves is not None:
        plan = limit_moves(plan, previous, load, max_moves)
    return plan


def due(now: float, last_replan: float, current: float, settings: TrackerSettings, *, forced: bool = False) -> str | None:
    """Why a re-plan is due now (forced, interval, trigger), or None."""
    if forced:
        return "forced"
    if now - last_replan >= settings.interval_s:
        return "interval"
    if settings.trigger_imbalance is not None and current > settings.trigger_imbalance:
        return "trigger"
    return None


def decide(current: float, projected: float, moves: int, reason: str, settings: TrackerSettings) -> Decision:
    """Migrate, unless the plan moves nothing or (not forced) gains less than `min_gain`."""
    if moves == 0:
        return Decision(False, "no moves", current, projected, 0)
    d = Decision(True, reason, current, projected, moves)
    if reason != "forced" and d.gain < settings.min_gain:
        return Decision(False, f"gain {d.gain:.3f} below min_gain {settings.min_gain}", current, projected, moves)
    return d


# --- the replicas of one unit kind -------------------------------------------------------------
class UnitClient(Protocol):
    """How a tracker reaches the replicas of its unit kind."""

    def replicas(self) -> list[str] | None:
        """Ids of the running replicas; None when the app (or its deployment) is gone."""
        ...

    def state(self, replica: str) -> ExpertState: ...

    def migrate(self, replica: str, placement: Placement, timeout_s: float) -> MigrationResult: ...


def serve_details() -> Any:
    """An ObjectRef to the Serve controller's instance details (what `serve status` and the dashboard
    read): `ray.get` it, or `await` it on an event loop."""
    from ray.serve.context import _get_global_client

    return _get_global_client()._controller.get_serve_instance_details.remote()


def running_replicas(details: dict[str, Any], app: str, deployment: str) -> list[str] | None:
    """Running replica ids of a deployment in `serve_details()`; None when the app or deployment is gone."""
    dep = (details.get("applications", {}).get(app) or {}).get("deployments", {}).get(deployment)
    if dep is None:
        return None
    return sorted(r["replica_id"] for r in dep.get("replicas", []) if str(r.get("state")).endswith("RUNNING"))


class ServeUnit:
    """The replicas of one unit deployment, through Serve (calls routed by `replica=`)."""

    def __init__(self, app: str, deployment: str, timeout_s: float = 30.0) -> None:
        self.app = app
        self.deployment = deployment
        self.timeout_s = timeout_s
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"app": self.app, "deployment": self.deployment, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handle = None  # a handle is per process: made again where it is used

    def _h(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app)
        return self._handle

    def replicas(self) -> list[str] | None:
        import ray

        return running_replicas(ray.get(serve_details(), timeout=self.timeout_s), self.app, self.deployment)

    def state(self, replica: str) -> ExpertState:
        return self._h().expert_state.remote(replica=replica).result(timeout_s=self.timeout_s)

    def migrate(self, replica: str, placement: Placement, timeout_s: float) -> MigrationResult:
        return self._h().migrate.remote(placement, replica=replica).result(timeout_s=timeout_s + self.timeout_s)


# --- the actor ---------------------------------------------------------------------------------
class LoadTracker:
    """One unit kind's tracker (run as a Ray actor: `start_tracker`). Its loop thread polls every
    `poll_s`; `rebalance(forced=True)` re-plans now. One re-plan at a time (a lock)."""

    def __init__(self, app: str, role: str, client: UnitClient, settings: TrackerSettings, *, run: bool = True) -> None:
        self.app = app
        self.role = role
        self.client = client
        self.settings = settings
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._metrics: Any = None
        self._last_replan = time.monotonic()  # the interval counts from the tracker's start
        self._imbalance: float | None = None
        self._projected: float | None = None
        self._replicas = 0
        self._polls = self._replans = self._skipped = self._migrations = self._errors = 0
        self._last_error: str | None = None
        self._history: deque[TrackerEvent] = deque(maxlen=HISTORY)
        self._gone = 0  # consecutive polls that found the app gone
        self._thread: threading.Thread | None = None
        if run:
            self._thread = threading.Thread(target=self._loop, name=f"raymoe-tracker-{role}", daemon=True)
            self._thread.start()

    # --- public (actor methods) ----------------------------------------------------------------
    def configure(self, settings: TrackerSettings) -> None:
        """New settings (a redeployed app's replicas pass theirs); the next poll uses them."""
        self.settings = settings

    def report(self) -> TrackerReport:
        return TrackerReport(
            role=self.role, replicas=self._replicas, imbalance=self._imbalance,
            projected_imbalance=self._projected, polls=self._polls, replans=self._replans,
            skipped=self._skipped, migrations=self._migrations, errors=self._errors,
            last_error=self._last_error, history=list(self._history),
        )

    def rebalance(self, forced: bool = True) -> list[RebalanceResult]:
        """Re-plan now (`forced`: skipping `min_gain` and the interval) and migrate every replica; the
        answer lists each replica's outcome (nothing moved: empty on a single-process unit)."""
        with self._lock:
            return self._tick(forced=forced)

    def poll(self) -> list[RebalanceResult]:
        """One loop iteration (what the loop thread runs every `poll_s`)."""
        with self._lock:
            return self._tick(forced=False)

    def pid(self) -> int:
        """The tracker's process (for operators and tests: which process to look at)."""
        import os

        return os.getpid()

    # --- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.poll()
            except _AppGone:
                log.info("tracker %s/%s: the app is gone, exiting", self.app, self.role)
                self._exit()
                return
            except Exception as exc:  # reported, never fatal: the next poll tries again
                self._error(f"poll failed: {describe(exc)}")

    def _exit(self) -> None:
        import ray

        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception:  # not running as an actor (a test drives the class in-process)
            self._stop.set()

    def metrics(self) -> Any:
        if self._metrics is None:
            from raymoe.eplb.metrics import TrackerMetrics

            self._metrics = TrackerMetrics(self.app, self.role)
        return self._metrics

    def _error(self, why: str, replica: str | None = None) -> None:
        self._errors += 1
        self._last_error = why if replica is None else f"replica {replica}: {why}"
        log.error("raymoe tracker %s/%s: %s", self.app, self.role, self._last_error)
        self.metrics().error("poll" if replica is None else "migrate")

    def _states(self) -> list[ExpertState]:
        ids = self.client.replicas()
        if ids is None:
            self._gone += 1
            if self._gone >= 2:  # twice in a row: not a redeploy's gap
                raise _AppGone()
            return []
        self._gone = 0
        states = []
        for rid in ids:
            try:
                states.append(self.client.state(rid))
            except Exception as exc:  # a replica starting or going away: skipped this poll
                self._error(f"expert_state failed: {describe(exc)}", rid)
        return states

    def _tick(self, *, forced: bool) -> list[RebalanceResult]:
        states = self._states()
        self._polls += 1
        self._replicas = len(states)
        load = merge_loads([s.load for s in states])
        if load is None:
            self._imbalance = None
            return []
        ref = max(states, key=lambda s: s.placement_version)  # the newest placement (restarted replicas lag)
        # the worst replica's: one that lags (restarted, or its migration failed) is caught up
        current = max(imbalance_of(s.placement, load) for s in states)
        self._imbalance = current
        m = self.metrics()
        m.load(load)
        m.imbalance(current, None)
        if ref.placement is None:  # a single-process unit: measured, nothing to move
            return []
        now = time.monotonic()
        reason = due(now, self._last_replan, current, self.settings, forced=forced)
        if reason is None:
            return []
        self._last_replan = now
        self._replans += 1
        s = self.settings
        plan = plan_placement(ref.placement, load, num_groups=ref.num_groups, mode=ref.plan_mode,
                              tolerance=s.tolerance, max_moves=s.max_moves)
        projected = plan.imbalance(load)
        self._projected = projected
        m.imbalance(current, projected)
        moves = max(plan.num_moves_from(st.placement) for st in states if st.placement is not None)
        decision = decide(current, projected, moves, reason, s)
        if not decision.migrate:
            self._skipped += 1
            m.skipped(decision.reason)
            log.info("raymoe tracker %s/%s: re-plan skipped (%s; imbalance %.3f, re-planned %.3f)",
                     self.app, self.role, decision.reason, current, projected)
            self._history.append(TrackerEvent(time.time(), decision, []))
            return []
        log.info("raymoe tracker %s/%s: migrating (%s; imbalance %.3f -> %.3f, %d copies)",
                 self.app, self.role, reason, current, projected, decision.moves)
        results = [self._migrate_one(st, plan) for st in states]  # one replica at a time
        self._history.append(TrackerEvent(time.time(), decision, results))
        return results

    def _migrate_one(self, st: ExpertState, plan: Placement) -> RebalanceResult:
        if st.placement is not None and not plan.num_moves_from(st.placement):
            return RebalanceResult(self.role, st.replica, st.placement_version, 0)
        try:
            r = self.client.migrate(st.replica, plan, self.settings.migration_timeout_s)
        except Exception as exc:  # refused or failed: the replica keeps its placement; reported, go on
            why = f"migration failed: {describe(exc)}"
            self._error(why, st.replica)
            return RebalanceResult(self.role, st.replica, st.placement_version, 0, error=why)
        self._migrations += 1
        self.metrics().migrated(r)
        return RebalanceResult(self.role, st.replica, r.placement_version, r.moved, result=r)


class _AppGone(Exception):
    """The tracker's app was deleted: the tracker ends itself (its lifetime is the app's)."""


def tracker_name(app: str, role: str) -> str:
    return f"raymoe-tracker-{app}-{role}"


def find_tracker(app: str, role: str) -> Any | None:
    """The named tracker actor of an app's unit kind, or None (eplb off, or not started yet)."""
    import ray

    try:
        return ray.get_actor(tracker_name(app, role), namespace=TRACKER_NAMESPACE)
    except ValueError:
        return None


def start_tracker(app: str, role: str, client: UnitClient, settings: TrackerSettings, *, max_restarts: int = -1) -> Any:
    """Get or create the tracker of an app's unit kind (detached, so it outlives the replica that made
    it; it ends itself when the app is deleted) and give it `settings`."""
    import ray

    # the tracker calls Serve handles from plain threads: Serve's router must run on a loop of its own,
    # whatever the replica that creates it runs with (an actor inherits its creator's env_vars)
    env = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    actor = ray.remote(LoadTracker).options(
        name=tracker_name(app, role), namespace=TRACKER_NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=4,
        runtime_env={"env_vars": env},
    ).remote(app, role, client, settings)
    actor.configure.remote(settings)
    return actor


def stop_tracker(app: str, role: str) -> bool:
    """End an app's tracker of a unit kind if it runs (its `eplb` was turned off); True if it did."""
    import ray

    actor = find_tracker(app, role)
    if actor is None:
        return False
    ray.kill(actor, no_restart=True)
    return True
