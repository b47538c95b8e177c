"""The LoadTracker: its pure decisions, the tracker driven in-process against fake replicas, and the
real Ray actor (named, restarted when killed, ending itself when its app is gone).

The fake replica hosts a `FakeHost` (the `ExpertHost` protocol of raymoe.eplb.migration) and
migrates the way `EngineServer.migrate` does (begin, then commit with an empty step).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import pytest

from raymoe.eplb import rebalance
from raymoe.eplb.migration import ExpertHost, MigrationResult, MigrationStatus
from raymoe.eplb.placement import Placement
from raymoe.eplb.tracker import (
    Decision,
    ExpertState,
    LoadTracker,
    TrackerSettings,
    decide,
    due,
    expert_imbalance,
    imbalance_of,
    limit_moves,
    merge_loads,
    plan_placement,
)

LAYERS, EXPERTS, GPUS, SLOTS = 3, 8, 4, 3  # 12 slots: 4 redundant copies


def uniform_placement() -> Placement:
    return rebalance(np.ones((LAYERS, EXPERTS)), 1, GPUS, SLOTS, 1, mode="global")


def skewed_load(hot: int = 2, factor: float = 20.0) -> np.ndarray:
    """`hot` experts of one copy each in the uniform placement get `factor` times the others' load."""
    single = np.flatnonzero(uniform_placement().replica_count[0] == 1)[:hot]
    load = np.full((LAYERS, EXPERTS), 10.0)
    load[:, single] *= factor
    return load


class FakeHost:
    """An executor whose experts move: staged by `begin_migration`, committed by `commit_idle`."""

    def __init__(self, placement: Placement | None, load: np.ndarray, *, refuse: bool = False, delay_s: float = 0.0):
        self._placement = placement
        self._version = 0
        self.load = load
        self.refuse = refuse
        self.delay_s = delay_s
        self._staged: Placement | None = None
        self._last: MigrationResult | None = None

    @property
    def placement(self) -> Placement | None:
        return self._placement

    @property
    def placement_version(self) -> int:
        return self._version

    def expert_load(self) -> np.ndarray:
        return self.load

    def begin_migration(self, placement: Placement) -> None:
        if self._placement is None or self.refuse:
            raise RuntimeError("this unit refuses to migrate")
        self._staged = placement

    def migration_status(self) -> MigrationStatus:
        return MigrationStatus(self._version, False, self._staged is not None, self._last, None)

    def commit_idle(self) -> MigrationResult | None:
        if self._staged is None:
            return None
        time.sleep(self.delay_s)
        assert self._placement is not None
        moved = self._staged.num_moves_from(self._placement)
        self._placement, self._staged = self._staged, None
        self._version += 1
        self._last = MigrationResult(self._version, moved, moved * 1000, moved, 0, self.delay_s, 0.001)
        return self._last


class FakeReplica:
    """A unit replica's two calls (`expert_state`, `migrate`) over a FakeHost; records its migrations."""

    def __init__(self, rid: str, host: FakeHost) -> None:
        self.rid = rid
        self.host = host
        self.windows: list[tuple[float, float]] = []

    def state(self) -> ExpertState:
        h = self.host
        return ExpertState("decode", self.rid, h.placement_version, h.placement, h.load,
                           imbalance_of(h.placement, h.load), len(self.windows), h.migration_status().last,
                           False, None, 1, "global", 1024)

    def migrate(self, placement: Placement) -> MigrationResult:
        t0 = time.monotonic()
        self.host.begin_migration(placement)
        result = self.host.commit_idle()
        assert result is not None
        self.windows.append((t0, time.monotonic()))
        return result

    def set_load(self, load: np.ndarray) -> None:
        self.host.load = load

    def get_windows(self) -> list[tuple[float, float]]:
        return self.windows


class FakeUnit:
    """The `UnitClient` over in-process FakeReplicas (`gone`: the app was deleted)."""

    def __init__(self, replicas: dict[str, FakeReplica]) -> None:
        self.by_id = replicas
        self.gone = False

    def replicas(self) -> list[str] | None:
        return None if self.gone else sorted(self.by_id)

    def state(self, replica: str) -> ExpertState:
        return self.by_id[replica].state()

    def migrate(self, replica: str, placement: Placement, timeout_s: float) -> MigrationResult:
        return self.by_id[replica].migrate(placement)


def fake_unit(n: int = 2, *, placement: Placement | None = None, load: np.ndarray | None = None,
              refuse: tuple[str, ...] = ()) -> FakeUnit:
    placement = placement if placement is not None else uniform_placement()
    load = load if load is not None else skewed_load()
    return FakeUnit({f"r{i}": FakeReplica(f"r{i}", FakeHost(placement, load, refuse=f"r{i}" in refuse))
                     for i in range(n)})


# --- pure decisions ----------------------------------------------------------------------------
def test_fake_host_is_an_expert_host() -> None:
    assert isinstance(FakeHost(uniform_placement(), skewed_load()), ExpertHost)


def test_merge_loads_adds_replicas_and_checks_shapes() -> None:
    a, b = np.ones((2, 3)), np.full((2, 3), 2.0)
    assert merge_loads([a, b]).tolist() == np.full((2, 3), 3.0).tolist()
    assert merge_loads([None, a]).tolist() == a.tolist()  # type: ignore[list-item]
    assert merge_loads([]) is None
    with pytest.raises(ValueError, match="disagree"):
        merge_loads([a, np.ones((2, 4))])


def test_imbalance_current_and_of_a_single_process_unit() -> None:
    p = uniform_placement()
    assert imbalance_of(p, np.ones((LAYERS, EXPERTS))) == pytest.approx(1.0, abs=0.2)
    assert imbalance_of(p, np.zeros((LAYERS, EXPERTS))) == 1.0
    skew = skewed_load()
    assert imbalance_of(p, skew) > 1.5
    # one process hosts every expert: the imbalance of one expert per GPU (what EP would face)
    assert imbalance_of(None, skew) == pytest.approx(expert_imbalance(skew))
    assert expert_imbalance(skew) == pytest.approx(200 / ((2 * 200 + 6 * 10) / 8))


def test_due_on_interval_trigger_or_forced() -> None:
    s = TrackerSettings(interval_s=600, trigger_imbalance=1.5)
    assert due(100.0, 0.0, 1.2, s) is None
    assert due(700.0, 0.0, 1.2, s) == "interval"
    assert due(100.0, 0.0, 1.6, s) == "trigger"
    assert due(100.0, 0.0, 1.0, s, forced=True) == "forced"
    assert due(100.0, 0.0, 9.0, TrackerSettings(interval_s=600)) is None  # no trigger set


def test_decide_skips_below_min_gain_unless_forced() -> None:
    s = TrackerSettings(min_gain=1.2)
    assert decide(2.0, 1.0, 5, "interval", s) == Decision(True, "interval", 2.0, 1.0, 5)
    low = decide(1.1, 1.0, 5, "interval", s)
    assert not low.migrate and "min_gain" in low.reason
    assert decide(1.1, 1.0, 5, "forced", s).migrate
    assert not decide(2.0, 1.0, 0, "forced", s).migrate  # nothing to move


def test_replan_lowers_imbalance_and_max_moves_caps_whole_layers() -> None:
    prev, load = uniform_placement(), skewed_load()
    plan = plan_placement(prev, load, num_groups=1, mode="global", tolerance=0.03)
    assert plan.imbalance(load) < prev.imbalance(load)
    moves = plan.num_moves_from(prev)
    assert moves > 0
    per_layer = (plan.phy2log != prev.phy2log).sum(axis=1)
    cap = int(per_layer.max())
    capped = limit_moves(plan, prev, load, cap)
    assert 0 < capped.num_moves_from(prev) <= cap
    changed = (capped.phy2log != prev.phy2log).any(axis=1)
    # every layer is either the plan's or the previous one, whole
    for layer in range(LAYERS):
        want = plan.phy2log[layer] if changed[layer] else prev.phy2log[layer]
        assert (capped.phy2log[layer] == want).all()
    assert capped.imbalance(load) < prev.imbalance(load)
    assert (capped.replica_count >= 1).all()


# --- the tracker in-process --------------------------------------------------------------------
def test_replans_on_interval_and_migrates_every_replica_one_at_a_time() -> None:
    unit = fake_unit(2)
    for r in unit.by_id.values():
        r.host.delay_s = 0.05
    t = LoadTracker("app", "decode", unit, TrackerSettings(interval_s=1e9, min_gain=1.05), run=False)
    assert t.poll() == []  # not due yet: the interval counts from the start
    t.settings = TrackerSettings(interval_s=0.0, min_gain=1.05)
    results = t.poll()
    assert [r.replica for r in results] == ["r0", "r1"]
    assert all(r.moved > 0 and r.placement_version == 1 and r.error is None for r in results)
    first_end, second_start = unit.by_id["r0"].windows[0][1], unit.by_id["r1"].windows[0][0]
    assert first_end <= second_start  # one replica at a time
    rep = t.report()
    assert rep.migrations == 2 and rep.replans == 1 and rep.skipped == 0
    assert rep.projected_imbalance is not None and rep.imbalance is not None
    assert rep.projected_imbalance < rep.imbalance
    # now balanced: the next re-plan finds nothing worth moving and is skipped, with a count
    assert t.poll() == []
    rep = t.report()
    assert rep.skipped == 1 and rep.migrations == 2 and not rep.history[-1].decision.migrate


def test_trigger_replans_before_the_interval() -> None:
    unit = fake_unit(1)
    t = LoadTracker("app", "decode", unit, TrackerSettings(interval_s=1e9, trigger_imbalance=1.3), run=False)
    results = t.poll()
    assert len(results) == 1 and results[0].moved > 0
    assert t.report().history[-1].decision.reason == "trigger"


def test_skew_below_min_gain_is_skipped_with_a_count_but_forced_migrates() -> None:
    unit = fake_unit(1, load=skewed_load(factor=1.3))
    t = LoadTracker("app", "decode", unit, TrackerSettings(interval_s=0.0, min_gain=3.0), run=False)
    assert t.poll() == []
    rep = t.report()
    assert rep.skipped == 1 and rep.migrations == 0
    assert unit.by_id["r0"].host.placement_version == 0
    forced = t.rebalance(True)
    assert len(forced) == 1 and forced[0].placement_version == 1


class RecordingMetrics:
    """Stands in for TrackerMetrics: what the tracker published."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, args))


def test_a_refusing_replica_is_reported_and_the_others_still_migrate(caplog: pytest.LogCaptureFixture) -> None:
    unit = fake_unit(3, refuse=("r1",))
    t = LoadTracker("app", "decode", unit, TrackerSettings(interval_s=0.0), run=False)
    metrics = t._metrics = RecordingMetrics()
    with caplog.at_level("ERROR", logger="raymoe.eplb.tracker"):
        results = {r.replica: r for r in t.poll()}
    assert ("error", ("migrate",)) in metrics.calls
    assert [name for name, _ in metrics.calls].count("migrated") == 2
    assert any("replica r1: migration failed" in r.getMessage() for r in caplog.records)
    assert results["r0"].moved > 0 and results["r2"].moved > 0
    assert results["r1"].moved == 0 and "refuses" in (results["r1"].error or "")
    rep = t.report()
    assert rep.errors == 1 and "r1" in (rep.last_error or "") and rep.migrations == 2
    # the loop goes on: r1 is tried again on the next re-plan
    assert "r1" in {r.replica for r in t.rebalance(True)}


def test_a_single_process_unit_is_measured_never_migrated() -> None:
    unit = fake_unit(1, placement=None)
    unit.by_id["r0"].host._placement = None
    t = LoadTracker("app", "llm", unit, TrackerSettings(interval_s=0.0), run=False)
    assert t.poll() == [] and t.rebalance(True) == []
    rep = t.report()
    assert rep.imbalance == pytest.approx(expert_imbalance(skewed_load()))
    assert rep.migrations == 0 and rep.replans == 0


def test_a_replica_that_fails_its_state_is_skipped_and_the_tracker_goes_on() -> None:
    unit = fake_unit(2)

    def broken() -> ExpertState:
        raise ConnectionError("replica is restarting")

    unit.by_id["r1"].state = broken  # type: ignore[method-assign]
    t = LoadTracker("app", "decode", unit, TrackerSettings(interval_s=0.0), run=False)
    results = t.poll()
    assert [r.replica for r in results] == ["r0"]
    assert t.report().errors == 1


# --- the Ray actor -----------------------------------------------------------------------------
def _remote_replica() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class RemoteReplica(FakeReplica):
        pass

    return RemoteReplica


class RemoteUnit:
    """The UnitClient over FakeReplica actors (picklable: the tracker actor holds it)."""

    def __init__(self, actors: dict[str, Any], gone_flag: Any) -> None:
        self.actors = actors
        self.gone_flag = gone_flag  # a FakeReplica actor whose load being None means "app deleted"

    def replicas(self) -> list[str] | None:
        import ray

        return None if ray.get(self.gone_flag.state.remote()).load is None else sorted(self.actors)

    def state(self, replica: str) -> ExpertState:
        import ray

        return ray.get(self.actors[replica].state.remote())

    def migrate(self, replica: str, placement: Placement, timeout_s: float) -> MigrationResult:
        import ray

        return ray.get(self.actors[replica].migrate.remote(placement), timeout=timeout_s)


@pytest.fixture
def ray_session(ray_cluster: Any) -> Any:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster


def _wait(pred: Any, timeout: float = 60.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_the_actor_restarts_when_killed_and_ends_with_its_app(ray_session: Any) -> None:
    import os
    import signal

    import ray

    from raymoe.eplb.tracker import find_tracker, start_tracker, stop_tracker, tracker_name

    Replica = _remote_replica()
    placement = uniform_placement()
    replica = Replica.remote("r0", FakeHost(placement, skewed_load()))
    flag = Replica.remote("flag", FakeHost(None, np.ones((1, 1))))
    unit = RemoteUnit({"r0": replica}, flag)
    settings = TrackerSettings(interval_s=0.5, poll_s=0.2, min_gain=1.01)
    tracker = start_tracker("testapp", "decode", unit, settings)
    try:
        assert find_tracker("testapp", "decode") is not None
        assert tracker_name("testapp", "decode") == "raymoe-tracker-testapp-decode"
        pid = ray.get(tracker.pid.remote())
        # a redeploy's replicas find the same actor and hand it their settings
        again = start_tracker("testapp", "decode", unit, settings)
        assert ray.get(again.pid.remote()) == pid
        _wait(lambda: ray.get(tracker.report.remote()).migrations >= 1, what="a migration on the interval")
        assert ray.get(replica.state.remote()).placement_version == 1
        # serving never waits on it: the replica answers while the tracker is down
        os.kill(pid, signal.SIGKILL)
        assert ray.get(replica.state.remote(), timeout=10).placement_version == 1
        # Ray restarts it (max_restarts=-1): same name, its loop runs again and re-plans on new skew
        ray.get(replica.set_load.remote(skewed_load()[:, ::-1].copy()))
        _wait(lambda: ray.get(tracker.report.remote()).polls >= 2, what="the restarted tracker polling")
        _wait(lambda: ray.get(replica.state.remote()).placement_version >= 2, what="a migration after the restart")
        # the app is deleted: the tracker ends itself (no restart)
        ray.get(flag.set_load.remote(None))
        _wait(lambda: find_tracker("testapp", "decode") is None, what="the tracker to end with its app")
        assert stop_tracker("testapp", "decode") is False
    finally:
        if find_tracker("testapp", "decode") is not None:
            ray.kill(tracker, no_restart=True)


# --- the `eplb:` config section and the command line -------------------------------------------
def test_eplb_section_is_validated_and_check_config_covers_it() -> None:
    from pathlib import Path

    from raymoe.serve.config import ServeConfig, check_args, load_config_file

    eplb = {"enabled": True, "interval_s": 60, "poll_s": 5, "trigger_imbalance": 1.4, "min_gain": 1.1,
            "tolerance": 0.05, "max_moves": 16, "window_steps": 256}
    parallel = {"nodes": 1, "gpus_per_node": 2, "node_limited": False, "replica_choice": "balanced", "overlap": True}
    cfg = ServeConfig.model_validate({"decode": {"parallel": parallel, "eplb": eplb}})
    s = cfg.decode.eplb.tracker_settings()
    assert (s.interval_s, s.poll_s, s.trigger_imbalance, s.min_gain, s.tolerance, s.max_moves) == (60, 5, 1.4, 1.1, 0.05, 16)
    got = cfg.decode.parallel_config()
    assert got is not None and got.load_window_steps == 256 and cfg.decode.load_window_steps() == 256
    assert (got.node_limited, got.replica_choice, got.overlap) == (False, "balanced", True)
    assert ServeConfig().decode.eplb.enabled is False and ServeConfig().decode.eplb.interval_s == 600
    problems = check_args({"decode": {"eplb": {"interval_s": 0, "min_gain": 0.5, "every": 3}}}, inspect_checkpoint=False)
    assert any(p.startswith("decode.eplb.interval_s: ") for p in problems), problems
    assert any(p.startswith("decode.eplb.min_gain: ") for p in problems), problems
    assert any(p.startswith("decode.eplb.every: ") for p in problems), problems
    slow = check_args({"decode": {"eplb": {"enabled": True, "interval_s": 10, "poll_s": 30}}}, inspect_checkpoint=False)
    assert slow == ["decode.eplb.poll_s: 30.0 is longer than interval_s 10.0 (the tracker re-plans from its polls)"]
    cpu = check_args({"prefill": {"eplb": {"enabled": True, "window_steps": 10}}}, inspect_checkpoint=False)
    assert cpu and cpu[0].startswith("prefill.eplb.window_steps: only an expert-parallel unit")
    two = check_args({"decode": {"parallel": {**parallel, "load_window_steps": 64}, "eplb": eplb}}, inspect_checkpoint=False)
    assert two and two[0].startswith("decode.eplb.window_steps: 256 disagrees with parallel.load_window_steps 64")
    # the production layout: decode runs the flat exchange, both unit kinds run a tracker
    h800 = load_config_file(Path(__file__).resolve().parents[1] / "deployments/h800-disaggregated.yaml")
    assert h800.decode.parallel is not None and h800.decode.parallel.node_limited is False
    assert h800.prefill.parallel is not None and h800.prefill.parallel.node_limited is True
    assert h800.prefill.eplb.enabled and h800.decode.eplb.enabled and h800.decode.eplb.interval_s == 600
    local = load_config_file(Path(__file__).resolve().parents[1] / "deployments/local-ep.yaml")
    for unit in (local.prefill, local.decode):
        assert unit.parallel is not None and (unit.parallel.nodes, unit.parallel.gpus_per_node) == (1, 2)
        assert unit.eplb.enabled and unit.eplb.interval_s == 60


def test_experts_command_prints_one_line_per_unit() -> None:
    from raymoe.cli import experts_lines

    body = {
        "units": [
            {"role": "prefill", "replica": "p1", "placement_version": 0, "imbalance": 8.0, "migrations": 0,
             "last_migration": None, "expert_parallel": False},
            {"role": "decode", "replica": "d1", "placement_version": 2, "imbalance": 1.234, "migrations": 2,
             "last_migration": {"moved": 12, "bytes": 3 << 20, "stage_s": 0.31, "commit_s": 0.004},
             "expert_parallel": True},
        ],
        "trackers": {"decode": {"projected_imbalance": 1.1, "skipped": 3}},
    }
    lines = experts_lines(body)
    assert len(lines) == 2
    assert lines[0].startswith("prefill") and "imbalance=8.000" in lines[0] and "single process" in lines[0]
    assert "placement_version=2" in lines[1] and "moved=12 (3.0 MiB)" in lines[1] and "commit=4.0ms" in lines[1]
    assert "re-planned=1.100 skipped=3" in lines[1]


def test_grafana_import_provisions_the_dashboards(capsys: pytest.CaptureFixture[str]) -> None:
    """Against a stand-in of Grafana's HTTP API: the health check, then one POST per dashboard."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from raymoe.cli import main

    pytest.importorskip("grafana_client")
    posted: list[dict[str, Any]] = []
    auth: list[str | None] = []

    class Grafana(BaseHTTPRequestHandler):
        def _json(self, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # the health check reads the frontend settings / health
            auth.append(self.headers.get("Authorization"))
            self._json({"buildInfo": {"version": "11.0.0"}, "database": "ok", "version": "11.0.0"})

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", 0))
            posted.append({"path": self.path, "body": json.loads(self.rfile.read(n))})
            self._json({"status": "success", "uid": posted[-1]["body"]["dashboard"]["uid"]})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Grafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["grafana-import", "--url", url, "--api-key", "tok"]) == 0
    finally:
        server.shutdown()
    assert [p["path"] for p in posted] == ["/api/dashboards/db"]
    dash = posted[0]["body"]["dashboard"]
    assert dash["uid"] == "raymoe-serving" and posted[0]["body"]["overwrite"] is True
    assert any(p.get("type") == "row" and p["title"] == "Experts" for p in dash["panels"])
    assert "Bearer tok" in auth
    assert "imported" in capsys.readouterr().out


def test_grafana_import_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from raymoe.cli import main

    pytest.importorskip("grafana_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert main(["grafana-import", "--url", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raymoe: error: Grafana at http://127.0.0.1:{port} is not reachable")
    monkeypatch.setitem(sys.modules, "grafana_client", None)  # not installed
    assert main(["grafana-import"]) == 2
    assert capsys.readouterr().err.strip() == "raymoe: error: grafana-client is not installed: pip install 'raymoe[grafana]'"


# --- the replica side: EngineServer.migrate / expert_state over a fake executor -----------------
def _server(host: Any, busy: bool = False) -> Any:
    """An EngineServer whose engine is a stand-in holding `host` as its executor (no model, no Ray)."""
    from types import SimpleNamespace

    from raymoe.serve.config import ServeConfig
    from raymoe.serve.engine_core import EngineCore, ThreadEngineClient
    from raymoe.serve.server import DecodeServer

    srv = object.__new__(DecodeServer)
    cfg = ServeConfig.model_validate({"decode": {"eplb": {"enabled": True, "migration_timeout_s": 5}}})
    srv.config, srv.unit, srv.replica = cfg, cfg.decode, "rep-1"
    engine = SimpleNamespace(executor=host, has_unfinished_requests=lambda: busy, dp_size=1,
                             model_config=SimpleNamespace(n_group=1))
    srv.core = ThreadEngineClient(EngineCore(engine), 1.0)  # type: ignore[arg-type]
    srv._failure = None
    srv._migrations = 0
    return srv


class StagingHost(FakeHost):
    """Stages over a few status polls; `fail`: the staging ends with an error (old placement kept)."""

    def __init__(self, *args: Any, fail: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.polls = 0
        self.fail = fail
        self.error: str | None = None

    def migration_status(self) -> MigrationStatus:
        if self._staged is None:
            return MigrationStatus(self._version, False, False, self._last, self.error)
        self.polls += 1
        if self.polls < 3:
            return MigrationStatus(self._version, True, False, self._last, None)
        if self.fail:
            self._staged, self.error = None, "worker 1: peer fetch failed"
            return MigrationStatus(self._version, False, False, self._last, self.error)
        return MigrationStatus(self._version, False, True, self._last, None)


def test_replica_migrate_commits_on_an_idle_engine_and_reports_failures() -> None:
    import asyncio

    from raymoe.eplb.migration import MigrationError

    prev, load = uniform_placement(), skewed_load()
    plan = plan_placement(prev, load, num_groups=1, mode="global", tolerance=0.03)
    host = StagingHost(prev, load)
    srv = _server(host)
    result = asyncio.run(srv.migrate(plan))
    assert result.placement_version == 1 and result.moved == plan.num_moves_from(prev)
    assert host.placement is plan and srv._migrations == 1
    state = asyncio.run(srv.expert_state())
    assert state.placement_version == 1 and state.migrations == 1 and state.last_migration == result
    assert state.imbalance == pytest.approx(plan.imbalance(load)) and state.plan_mode == "global"
    with pytest.raises(Exception, match="is gone"):
        asyncio.run(srv.expert_state(replica="another"))
    # staging fails: the old placement stays, the error is the replica's answer
    failing = StagingHost(prev, load, fail=True)
    with pytest.raises(MigrationError, match="peer fetch failed"):
        asyncio.run(_server(failing).migrate(plan))
    assert failing.placement is prev and failing.placement_version == 0
    # refused: one already in flight / a unit hosting every expert
    refusing = StagingHost(prev, load, refuse=True)
    with pytest.raises(MigrationError, match="refused"):
        asyncio.run(_server(refusing).migrate(plan))
    with pytest.raises(MigrationError, match="nothing to move"):
        asyncio.run(_server(FakeHost(None, load)).migrate(plan))
    # a busy engine commits on its next step: nothing steps here, so the wait is bounded
    busy = StagingHost(prev, load)
    srv = _server(busy, busy=True)
    srv.unit.eplb.migration_timeout_s = 0.3
    with pytest.raises(MigrationError, match="not committed within"):
        asyncio.run(srv.migrate(plan))
