"""The expert-placement surface of the app: `GET /v1/experts` and `POST /v1/experts/rebalance`.

The ingress reads each unit replica's `expert_state` straight from the replicas (so the table
does not depend on a tracker being up) and adds each tracker's report; a rebalance goes to the
trackers, which plan and migrate one replica at a time and answer when done.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from raymoe.eplb.migration import MigrationResult
from raymoe.eplb.tracker import (
    ExpertState,
    RebalanceResult,
    TrackerReport,
    describe,
    find_tracker,
    running_replicas,
    serve_details,
)
from raymoe.serve.protocol import APIError

DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer", "llm": "LLMServer"}
TRACKER_TIMEOUT_S = 5.0


def migration_body(r: MigrationResult | None) -> dict[str, Any] | None:
    return None if r is None else dataclasses.asdict(r)


def unit_body(s: ExpertState) -> dict[str, Any]:
    """One row of `GET /v1/experts`."""
    return {
        "role": s.role,
        "replica": s.replica,
        "placement_version": s.placement_version,
        "imbalance": round(float(s.imbalance), 6),
        "migrations": s.migrations,
        "last_migration": migration_body(s.last_migration),
        "expert_parallel": s.placement is not None,
        "staging": s.staging,
        "window_tokens": None if s.load is None else int(s.load.sum()),
        "error": s.error,
    }


def tracker_body(r: TrackerReport) -> dict[str, Any]:
    last = r.history[-1] if r.history else None
    return {
        "replicas": r.replicas,
        "imbalance": r.imbalance,
        "projected_imbalance": r.projected_imbalance,
        "polls": r.polls,
        "replans": r.replans,
        "skipped": r.skipped,
        "migrations": r.migrations,
        "errors": r.errors,
        "last_error": r.last_error,
        "last_replan": None if last is None else {
            "reason": last.decision.reason, "migrated": last.decision.migrate,
            "imbalance": last.decision.current, "projected_imbalance": last.decision.projected,
            "moves": last.decision.moves,
        },
    }


def result_body(r: RebalanceResult) -> dict[str, Any]:
    return {"role": r.role, "replica": r.replica, "placement_version": r.placement_version, "moved": r.moved,
            "error": r.error, "migration": migration_body(r.result)}


async def experts_body(app: str, handles: dict[str, Any]) -> dict[str, Any]:
    """`GET /v1/experts`: every unit replica's state (`handles`: role -> its deployment's handle)."""
    details = await serve_details()
    units: list[dict[str, Any]] = []
    trackers: dict[str, Any] = {}
    for role, handle in handles.items():
        ids = running_replicas(details, app, DEPLOYMENTS[role]) or []
        states = await asyncio.gather(
            *(handle.options(stream=False).expert_state.remote(replica=rid) for rid in ids), return_exceptions=True
        )
        for rid, st in zip(ids, states, strict=True):
            if isinstance(st, BaseException):
                units.append({"role": role, "replica": rid, "placement_version": None, "imbalance": None,
                              "migrations": None, "last_migration": None, "error": f"expert_state failed: {describe(st)}"})
            else:
                units.append(unit_body(st))
        tracker = find_tracker(app, role)
        if tracker is not None:
            try:
                report = await asyncio.wait_for(tracker.report.remote(), TRACKER_TIMEOUT_S)
                trackers[role] = tracker_body(report)
            except Exception as exc:  # a tracker restarting: the table stands without it
                trackers[role] = {"error": f"tracker did not answer: {describe(exc)}"}
    return {"units": units, "trackers": trackers}


def rebalance_roles(body: bytes, roles: list[str]) -> list[str]:
    """The unit kinds `POST /v1/experts/rebalance` asks for (JSON `{"role": ...}`, optional)."""
    import json

    if not body.strip():
        return roles
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise APIError(400, f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"role"}:
        raise APIError(400, 'expected {"role": "prefill" | "decode"} or no body')
    role = doc.get("role")
    if role is None:
        return roles
    if role not in roles:
        raise APIError(400, f"role: {role!r} is not a unit kind of this app ({', '.join(roles)})", param="role")
    return [role]


async def rebalance_body(app: str, roles: list[str]) -> dict[str, Any]:
    """`POST /v1/experts/rebalance`: each tracker re-plans now (no `min_gain`) and migrates its replicas."""
    trackers = {role: find_tracker(app, role) for role in roles}
    missing = [r for r, t in trackers.items() if t is None]
    if len(missing) == len(roles):
        raise APIError(409, f"no load tracker runs for {', '.join(missing)}: set eplb.enabled for the unit",
                       type="invalid_request_error", code="eplb_disabled")
    results: list[dict[str, Any]] = []
    for tracker in trackers.values():
        if tracker is not None:
            results.extend(result_body(r) for r in await tracker.rebalance.remote(True))
    return {"results": results, "skipped_roles": missing}
