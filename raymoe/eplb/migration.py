"""The contract between a unit whose experts can move and whoever moves them (the LoadTracker).

A unit reports its windowed expert load and its placement; a tracker plans a new placement
(`raymoe.eplb.rebalance(load, ..., previous=placement)`) in its own process and asks the unit to
migrate: `begin_migration` starts staging the gained expert copies on every worker off the step
path and returns at once; the next step (or `commit_idle` when the engine has no work) commits
on every rank at the same step. Typed messages only: they cross Ray process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from raymoe.eplb.placement import Placement


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """One committed migration of one unit."""

    placement_version: int  # the unit's version after the commit (starts at 0, +1 per commit)
    moved: int  # expert copies gained over all workers and layers
    bytes: int  # weight bytes moved into side buffers (peers + checkpoint)
    from_peers: int  # copies fetched from a worker that hosted the expert
    from_disk: int  # copies read from the checkpoint (no peer had the expert)
    stage_s: float  # begin_migration -> every worker staged (steps kept running)
    commit_s: float  # extra time of the commit step on the slowest worker


class MigrationError(RuntimeError):
    """Staging failed on a worker: the old placement stays in force (the unit keeps serving)."""


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """Where a unit's migration stands (polled by the serving layer and the tracker)."""

    placement_version: int
    staging: bool  # begin_migration called, not every worker has staged yet
    pending_commit: bool  # every worker staged: the next step (or commit_idle) commits
    last: MigrationResult | None  # the latest committed migration
    error: str | None  # why the latest migration failed (the old placement stayed); None when it did not


@runtime_checkable
class ExpertHost(Protocol):
    """An executor whose routed experts can be re-placed while it serves.

    `placement` is None for a unit that hosts every expert in one process (the single-process
    runner): it still reports `expert_load`, and migration there is refused (nothing to move).
    """

    @property
    def placement(self) -> Placement | None: ...

    @property
    def placement_version(self) -> int: ...

    def expert_load(self) -> np.ndarray:
        """[moe_layers, experts] routed (token, expert) assignments over the recorder's window; the
        decode layout adds the shared expert as one more column."""
        ...

    def begin_migration(self, placement: Placement) -> None:
        """Start staging `placement` (ValueError: wrong shape; RuntimeError: one already in flight)."""
        ...

    def migration_status(self) -> MigrationStatus: ...

    def commit_idle(self) -> MigrationResult | None:
        """Commit a fully staged migration with an empty step (the engine has no work); None if none is staged."""
        ...
