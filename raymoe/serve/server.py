"""The replicas: one Serve replica = one deployment unit driving one `LLMEngine`.

The engine steps in its own engine-core process beside the replica (`raymoe.serve.engine_core`:
add, abort, step and export all run there, in order; one msgspec-encoded batch per step comes
back over ZMQ IPC), or with `engine_process: false` on a thread of the replica. The replica's
asyncio loop takes requests and hands each request's outputs to its queue or its subscriber's
stream. For a multi-GPU unit the engine runs on the executor that
`raymoe.executors.build_executor(engine_config, unit.parallel_config())` builds (the
expert-parallel runtime's workers, created by the engine-core actor); nothing else here changes.

- `PrefillServer.prefill`: runs the prompt, returns the first token and a KV ticket.
- `DecodeServer.decode`: receives the KV, joins the decode batch, holds the request until it ends.
- `LLMServer.generate`: both in one unit (non-disaggregated mode).
- `stream_outputs`: one long-lived stream per subscriber (an ingress replica) carrying the new
  tokens of all its requests on this replica, one message per stream interval: the way vLLM's
  engine core sends one batch of outputs per step to its API server, instead of one Ray Serve
  stream message per request per interval (the per-message cost dominated the serving path).
  Each message is an `OutputBatch` of typed `OutputDelta`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from raymoe.engine.executor import PromptLogprobs, TopLogprobs
from raymoe.engine.outputs import EngineStats, KVHandoff, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.eplb.migration import MigrationError, MigrationResult
from raymoe.eplb.placement import Placement
from raymoe.eplb.tracker import ExpertState, imbalance_of
from raymoe.serve.config import ServeConfig, UnitConfig
from raymoe.serve.engine_core import (
    EngineClient,
    EngineCore,
    ExpertSnapshot,
    KVMeta,
    ProcessEngineClient,
    StepBatch,
    ThreadEngineClient,
)
from raymoe.serve.kv_transport import DirectTransport, KVTicket, ObjectStoreTransport, make_transport
from raymoe.serve.protocol import QueueFullError, RequestRejected, UnitUnavailable

logger = logging.getLogger("ray.serve")


@dataclass
class TokenChunk:
    """New tokens of one request (several engine steps' worth when the consumer lags)."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str | None = None  # whole output text, on the finishing chunk
    logprobs: list[float] | None = None  # per token, with params.logprobs
    top_logprobs: list[TopLogprobs | None] | None = None  # per token, with params.top_logprobs
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs, on the first chunk


@dataclass(slots=True)
class OutputDelta:
    """One request's news in a `stream_outputs` message: new tokens, its end, or its failure."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None  # whole output text, on the finishing delta
    error: str | None = None  # the request failed (finished): why
    # unavailable: its unit failed (503); rejected: the engine refused it after the caller was answered
    error_kind: Literal["unavailable", "rejected"] | None = None
    logprobs: list[float] | None = None  # per token, with params.logprobs
    top_logprobs: list[TopLogprobs | None] | None = None  # per token, with params.top_logprobs
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs, on the request's first delta


def _output_batch(rows: list[tuple[Any, ...]]) -> OutputBatch:
    return OutputBatch([OutputDelta(*row) for row in rows])


@dataclass(slots=True)
class OutputBatch:
    """One `stream_outputs` message: the deltas of every request of one subscriber on one replica.

    Ray pickles each message: as rows of field values it costs about what plain tuples did (one
    reduce per message instead of one per delta: ~1.7x a list of tuples for 16 deltas, a
    dataclass per delta ~7x; docs/ARCHITECTURE.md)."""

    deltas: list[OutputDelta]

    def __reduce__(self) -> tuple[Any, ...]:
        rows = [
            (d.request_id, d.token_ids, d.finished, d.finish_reason, d.text, d.error, d.error_kind, d.logprobs,
             d.top_logprobs, d.prompt_logprobs)
            for d in self.deltas
        ]
        return (_output_batch, (rows,))


class _Outbox:
    """A subscriber's output deltas between two stream messages (filled by the step loop)."""

    __slots__ = ("deltas", "ready", "urgent", "generation", "attached", "since")

    def __init__(self) -> None:
        self.deltas: list[OutputDelta] = []
        self.ready = asyncio.Event()
        self.urgent = asyncio.Event()  # a first or last token: sent without waiting out the interval
        self.generation = 0  # a new stream for the same subscriber supersedes the old one
        self.attached = False  # a stream is reading it
        self.since = time.monotonic()  # created or last detached

    def push(self, delta: OutputDelta, urgent: bool = False) -> None:
        self.deltas.append(delta)
        self.ready.set()
        if urgent:
            self.urgent.set()


@dataclass
class _Streamed:
    """A request whose tokens go through a subscriber's stream; `done` ends its `decode` call."""

    outbox: _Outbox
    done: asyncio.Event
    started: bool = False  # its first token went out (TTFT is not held back by the stream interval)


@dataclass
class PrefillResult:
    first_token_id: int
    finished: bool  # the first token already ended the request (stop / length)
    finish_reason: str | None
    text: str | None
    prompt_len: int
    ticket: KVTicket | None  # None when finished
    first_logprob: float | None = None  # with params.logprobs
    first_top_logprobs: TopLogprobs | None = None  # with params.top_logprobs
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs (computed by this prefill)


def _replica_id() -> str:
    """This Serve replica's id; "local" only outside a replica (a test driving a server in-process)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not in a replica; any other error is real and propagates
        return "local"


class EngineServer:
    """Common part: the engine core's client, per-request queues and streams, stats and gauges."""

    role = "llm"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config)
        self.config = cfg
        unit: UnitConfig = cfg.units()[self.role]
        self.unit = unit
        ec = cfg.engine_config(unit)
        self.core: EngineClient
        if cfg.engine_process:
            gpus = 1 if unit.num_gpus == 1 else 0  # a one-GPU unit's GPU is its engine core's
            serve_kv = cfg.kv_ticket_ttl_s if self.role == "prefill" and cfg.kv_transport == "direct" else None
            self.core = ProcessEngineClient(ec, unit.parallel_config(), unit.torch_threads, gpus, cfg.metrics_interval_s,
                                            serve_kv_ttl_s=serve_kv, env=cfg.engine_env)
        else:
            self.core = ThreadEngineClient(EngineCore.build(ec, unit.parallel_config(), unit.torch_threads),
                                           cfg.metrics_interval_s)
        self.replica = _replica_id()
        # with the engine on a thread here, it drops the GIL in every torch op and must win it back
        # from the event loop streaming tokens: a shorter switch interval trades loop latency for step time
        sys.setswitchinterval(unit.gil_switch_interval_ms / 1000.0)
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}  # requests answered by one output
        self._streamed: dict[str, _Streamed] = {}  # requests whose tokens go through stream_outputs
        self._outboxes: dict[str, _Outbox] = {}  # subscriber -> its pending deltas
        self._handoffs: dict[str, KVHandoff] = {}
        self._held: dict[str, KVMeta] = {}  # handoffs the core holds itself, by request id
        self._loop_task: asyncio.Task[None] | None = None  # stepping (thread) or reading the core (process)
        self._stats: EngineStats | None = None  # after the latest step
        self._metrics: Any = None
        self._last_publish = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self._step_batch = 0
        self._failure: BaseException | None = None  # the unit failed: no more steps, health check fails
        self._migrations = 0  # expert migrations this replica committed
        self._start_tracker()

    # --- the engine core's news (on the replica's event loop) ---------------------------------
    def _deliver(self, batch: StepBatch, handoffs: list[KVHandoff]) -> None:
        """One step's outputs: each to its request's queue or its subscriber's outbox."""
        self._stats = batch.stats
        self._steps, self._step_seconds, self._step_batch = batch.steps, batch.step_seconds, batch.step_batch
        for h in handoffs:
            self._handoffs[h.request_id] = h
        for m in batch.held:  # kept by the core for decode to fetch (kv_transport: direct)
            self._held[m.request_id] = m
        for out in batch.outputs:
            st = self._streamed.get(out.request_id)
            if st is not None and out.error is not None:  # it failed alone: a 400-type error event
                logger.info("%s replica %s: request %s failed: %s", self.role, self.replica, out.request_id, out.error)
                self._fail_streamed(out.request_id, st, RequestRejected(out.error))
                continue
            if st is not None:
                urgent = out.finished or not st.started
                st.started = st.started or bool(out.new_token_ids)
                st.outbox.push(
                    OutputDelta(out.request_id, out.new_token_ids, out.finished, out.finish_reason,
                                out.text if out.finished else None, logprobs=out.new_logprobs,
                                top_logprobs=out.new_top_logprobs, prompt_logprobs=out.prompt_logprobs),
                    urgent,
                )
                if out.finished:
                    del self._streamed[out.request_id]
                    st.done.set()
                continue
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        self._publish()

    def _idle(self) -> None:
        """The engine has no work: publish and do the timed housekeeping anyway."""
        self._publish(force=True)

    def _unavailable(self) -> UnitUnavailable:
        return UnitUnavailable(
            f"{self.role} replica {self.replica}: its deployment unit failed ({self._failure!r}); "
            "the replica is being restarted"
        )

    async def _next(self, q: asyncio.Queue[Any]) -> RequestOutput:
        item = await q.get()
        if isinstance(item, BaseException):
            raise self._unavailable()
        return item

    def _fail_all(self, exc: BaseException) -> None:
        """A failed step leaves the unit's state unknown: fail every request in flight (their streams
        end with 503), refuse new ones, and let the health check hand the replica to Serve to restart."""
        self._failure = exc
        for q in self._queues.values():
            q.put_nowait(exc)  # type: ignore[arg-type]
        msg = str(self._unavailable())
        for rid, st in self._streamed.items():
            st.outbox.push(OutputDelta(rid, [], True, error=msg, error_kind="unavailable"), urgent=True)
            st.done.set()
        self._streamed.clear()

    def _ensure_loop(self) -> None:
        if self._failure is not None:
            raise self._unavailable()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = self.core.start(self)

    def metrics(self) -> Any:
        if self._metrics is None:
            from raymoe.serve.metrics import ReplicaMetrics

            self._metrics = ReplicaMetrics(self.role, self.replica)
        return self._metrics

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_publish < self.config.metrics_interval_s:
            return
        self._last_publish = now
        self._reap_subscribers(now)
        self._tick(now)
        s = self._stats
        if s is not None:
            self.metrics().engine(s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_free)

    # --- requests --------------------------------------------------------------------------------
    def _check_room(self) -> None:
        """Refuse a new request (QueueFullError: 503) when too many already wait for the engine."""
        self._ensure_loop()
        # in flight beyond what the engine can run at once is waiting; counted here, not from the
        # last step's stats, so a burst between two steps is bounded too
        running_capacity = self.unit.engine.max_num_seqs * self.core.info.dp_size
        in_flight = len(self._queues) + len(self._streamed)
        waiting = in_flight - running_capacity
        if waiting >= self.unit.max_waiting_requests:
            raise QueueFullError(
                f"{self.role} replica {self.replica}: {in_flight} requests in flight, "
                f"{waiting} beyond max_num_seqs x dp ({running_capacity}) "
                f"(max_waiting_requests={self.unit.max_waiting_requests})"
            )

    def _admit(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        self._check_room()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def _outbox(self, subscriber: str) -> _Outbox:
        box = self._outboxes.get(subscriber)
        if box is None:
            box = self._outboxes[subscriber] = _Outbox()
        return box

    def _admit_streamed(self, request_id: str, subscriber: str) -> _Streamed:
        self._check_room()
        st = self._streamed[request_id] = _Streamed(self._outbox(subscriber), asyncio.Event())
        return st

    async def _hold(
        self, request_id: str, st: _Streamed, join: Callable[[], Awaitable[None]], *, answer_first: bool
    ) -> AsyncIterator[str]:
        """Add a streamed request to the engine (`join`), yield this replica's id, return when the
        request ends. `answer_first`: yield once admitted, before `join`, and fail the request
        through its stream if `join` fails (the ingress already answered 200).

        The caller's open call is the request's lease: cancelling it aborts the request (client gone),
        and it counts as one ongoing request for Serve's routing and backpressure."""
        finished = False
        try:
            if answer_first:
                yield self.replica
                try:
                    await join()
                except Exception as exc:
                    self._fail_streamed(request_id, st, exc)
                    finished = True
                    return
            else:
                await join()
                yield self.replica
            await st.done.wait()
            finished = True
        finally:
            if not finished:
                self._abort_soon(request_id)

    def _fail_streamed(self, request_id: str, st: _Streamed, exc: Exception) -> None:
        """End one streamed request with an error delta: `rejected` (the client's fault) or `unavailable`."""
        self._streamed.pop(request_id, None)
        kind: Literal["unavailable", "rejected"] = "rejected" if isinstance(exc, RequestRejected) else "unavailable"
        if kind == "unavailable":
            logger.warning("%s replica %s: request %s failed: %r", self.role, self.replica, request_id, exc)
        # the client sees a rejection's own message; the ingress words an unavailable unit itself
        st.outbox.push(OutputDelta(request_id, [], True, error=str(exc), error_kind=kind), urgent=True)
        st.done.set()

    async def stream_outputs(self, subscriber: str, replica: str = "") -> AsyncIterator[OutputBatch]:
        """The new tokens of all of `subscriber`'s requests here: an empty first message (attached),
        then one message per stream interval while any request of it produced tokens (at once for a
        request's first token or its end, like vLLM's stream interval)."""
        if replica and replica != self.replica:
            raise UnitUnavailable(f"{self.role} replica {replica} is gone (this is {self.replica})")
        box = self._outbox(subscriber)
        box.generation += 1
        mine = box.generation
        box.attached = True
        interval = self.config.stream_interval_ms / 1000.0
        try:
            yield OutputBatch([])
            last_sent = time.monotonic()
            while box.generation == mine:
                await box.ready.wait()
                wait = last_sent + interval - time.monotonic()
                if wait > 0 and not box.urgent.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(box.urgent.wait(), timeout=wait)
                if box.generation != mine:
                    return
                box.ready.clear()
                box.urgent.clear()
                deltas, box.deltas = box.deltas, []
                last_sent = time.monotonic()
                yield OutputBatch(deltas)
        finally:
            if box.generation == mine:
                box.attached = False
                box.since = time.monotonic()

    def _tick(self, now: float) -> None:
        """Housekeeping on the metrics timer (every `metrics_interval_s`, idle or not)."""

    def _reap_subscribers(self, now: float) -> None:
        """An ingress whose stream has been gone for `subscriber_ttl_s` is not coming back (restarted,
        died): abort its requests here and drop what was buffered for it."""
        ttl = self.config.subscriber_ttl_s
        for subscriber, box in list(self._outboxes.items()):
            if box.attached or now - box.since < ttl:
                continue
            for rid in [r for r, st in self._streamed.items() if st.outbox is box]:
                self._streamed[rid].done.set()
                self._abort_soon(rid)
            del self._outboxes[subscriber]

    async def _add(self, request_id: str, add: Awaitable[Any]) -> None:
        """Await the engine core's admission of a request; its ValueError is the client's 400."""
        try:
            await add
        except ValueError as exc:
            self._queues.pop(request_id, None)
            self._streamed.pop(request_id, None)
            raise RequestRejected(str(exc)) from None

    def _abort_soon(self, request_id: str) -> None:
        """Abort in the engine core without awaiting (safe from a cancelled task's cleanup)."""
        self._queues.pop(request_id, None)
        self._streamed.pop(request_id, None)
        self._handoffs.pop(request_id, None)
        if self._held.pop(request_id, None) is not None:
            self.core.drop_kv(request_id)  # its prefill finished as it was cancelled
        self.core.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        s = await self.core.call("stats")
        return {
            "role": self.role,
            "replica": self.replica,
            "in_flight": len(self._queues) + len(self._streamed),
            "subscribers": len(self._outboxes),
            "steps": self._steps,
            "step_seconds": self._step_seconds,
            "mean_running_per_step": self._step_batch / max(1, self._steps),
            **asdict(s),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Read by raymoe.serve.routing.EngineLoadRouter (Serve polls it periodically)."""
        s = self._stats
        if s is None:  # no step yet: the router treats the replica as empty
            return {}
        return {
            "kv_blocks_free": s.kv_blocks_free,
            "kv_blocks_total": s.kv_blocks_total,
            "waiting": s.waiting,
            "running": s.running,
        }

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"{self.role} replica {self.replica}: deployment unit failed: {self._failure!r}")
        if self._loop_task is not None and self._loop_task.done() and not self._loop_task.cancelled():
            exc = self._loop_task.exception()
            if exc is not None:
                raise RuntimeError(f"{self.role} engine loop died: {exc!r}")

    # --- expert placement: the LoadTracker's side of a replica (raymoe.eplb.tracker) --------------
    def _start_tracker(self) -> None:
        """Get or create this unit kind's tracker (or end it when `eplb` is off), so a restarted
        replica finds it and a redeployed app's settings reach it. Never in the way of serving."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        from raymoe.serve.app import ensure_tracker

        try:
            app = serve.get_replica_context().app_name
        except RayServeException:  # not in a Serve replica (a test driving a server in-process)
            return
        try:
            ensure_tracker(app, self.role, type(self).__name__, self.unit)
        except Exception as exc:  # the tracker is optional: log, keep serving
            logger.error("%s replica %s: load tracker not started: %r", self.role, self.replica, exc)

    def _check_replica(self, replica: str) -> None:
        if replica and replica != self.replica:
            raise UnitUnavailable(f"{self.role} replica {replica} is gone (this is {self.replica})")

    def _plan_args(self) -> tuple[int, Literal["auto", "global"]]:
        """(num_groups, mode) `rebalance` re-plans this unit with (what its initial placement used)."""
        p = self.unit.parallel
        if p is None or p.shared_expert_gpus:  # one process, or the decode layout (shared expert as a column)
            return 1, "global"
        return self.core.info.n_group, "auto" if p.node_limited else "global"

    async def expert_state(self, replica: str = "") -> ExpertState:
        """This replica's placement and windowed expert load (read in the engine core, between steps)."""
        self._check_replica(replica)
        if self._failure is not None:
            raise self._unavailable()
        groups, mode = self._plan_args()
        if not self.core.info.hosts_experts:
            return ExpertState(self.role, self.replica, 0, None, None, 1.0, 0, None, False,
                               f"{self.core.info.executor} records no expert load", groups, mode,
                               self.unit.load_window_steps())
        snap: ExpertSnapshot = await self.core.call("expert_snapshot")
        placement, load, status = snap.placement, snap.load, snap.status
        return ExpertState(
            role=self.role, replica=self.replica, placement_version=status.placement_version, placement=placement,
            load=load, imbalance=imbalance_of(placement, load), migrations=self._migrations,
            last_migration=status.last, staging=status.staging or status.pending_commit, error=status.error,
            num_groups=groups, plan_mode=mode, window_steps=self.unit.load_window_steps(),
        )

    async def migrate(self, placement: Placement, replica: str = "") -> MigrationResult:
        """Move to `placement`: staging starts in the engine core and runs beside the steps; the next
        step commits it (or an empty step, `commit_idle`, when the engine has no work). Answers once
        committed; MigrationError when the unit refuses it or staging failed (the old placement stays)."""
        self._check_replica(replica)
        if self._failure is not None:
            raise self._unavailable()
        if not self.core.info.hosts_experts or not await self.core.call("can_migrate"):
            raise MigrationError(f"{self.role} replica {self.replica}: hosts every expert in one process, nothing to move")
        before = (await self.core.call("migration_status")).placement_version
        try:
            await self.core.call("begin_migration", placement)
        except (ValueError, RuntimeError) as exc:
            raise MigrationError(f"{self.role} replica {self.replica}: migration refused: {exc}") from None
        deadline = time.monotonic() + self.unit.eplb.migration_timeout_s
        while True:
            status = await self.core.call("migration_status")
            if not status.staging and not status.pending_commit:
                break
            if status.pending_commit and not await self.core.call("has_work"):
                await self.core.call("commit_idle")  # no step would come: commit with an empty one
                continue
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"{self.role} replica {self.replica}: migration not committed within "
                    f"eplb.migration_timeout_s={self.unit.eplb.migration_timeout_s}"
                )
            await asyncio.sleep(0.02)
        if status.placement_version > before and status.last is not None:
            self._migrations += 1
            return status.last
        raise MigrationError(f"{self.role} replica {self.replica}: migration failed: {status.error or 'not committed'}")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.core.shutdown()


class PrefillServer(EngineServer):
    role = "prefill"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        super().__init__(config)
        self.direct = self.config.kv_transport == "direct"  # the engine core holds and serves the KV itself
        self.transport = ObjectStoreTransport()
        self._pinned: dict[str, tuple[KVTicket, float]] = {}  # request id -> (ticket, expiry), object store

    def _pin(self, ticket: KVTicket) -> None:
        self._pinned[ticket.request_id] = (ticket, time.monotonic() + self.config.kv_ticket_ttl_s)

    def _tick(self, now: float) -> None:
        """Expire pins on the timer, not only when a new request pins: an idle replica drops them too."""
        for rid in [r for r, (_, exp) in self._pinned.items() if exp < now]:
            del self._pinned[rid]  # decode never picked it up (or the release was lost)

    async def release(self, request_id: str, replica: str = "") -> bool:
        """Drop a handed-off request's KV (decode has it, or the request is gone); routed by `replica`.

        With `direct` the ingress calls it only for a request that ended before decode fetched."""
        if self.direct:
            self.core.drop_kv(request_id)
            return True
        return self._pinned.pop(request_id, None) is not None

    async def stats(self) -> dict[str, Any]:
        held = await self.core.call("held_kv") if self.direct else len(self._pinned)
        return {**await super().stats(), "pinned_kv_handoffs": held}

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams) -> PrefillResult:
        q = self._admit(request_id)
        await self._add(request_id, self.core.add(request_id, prompt, params, prefill_only=True))
        try:
            out = await self._next(q)
        except BaseException:
            self._abort_soon(request_id)
            raise
        self._queues.pop(request_id, None)
        handoff = self._handoffs.pop(request_id, None)
        held = self._held.pop(request_id, None)
        if out.error is not None:  # it failed alone (its sampling, its output): the client's 400
            raise RequestRejected(out.error)
        token = out.new_token_ids[0]
        lp = out.new_logprobs[0] if out.new_logprobs else None
        top = out.new_top_logprobs[0] if out.new_top_logprobs else None
        if out.finish_reason == "prefill":
            if held is not None:
                address = await self.core.kv_address()
                ticket = DirectTransport.ticket(request_id, held.nbytes, out.prompt_len, address, self.replica)
            else:
                assert handoff is not None
                ticket = self.transport.send(handoff, self.replica)
                self._pin(ticket)
            return PrefillResult(token, False, None, None, out.prompt_len, ticket, lp, top, out.prompt_logprobs)
        return PrefillResult(token, True, out.finish_reason, out.text, out.prompt_len, None, lp, top, out.prompt_logprobs)


class DecodeServer(EngineServer):
    role = "decode"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        super().__init__(config)
        self.transport = make_transport(self.config.kv_transport, self.config.kv_fetch_timeout_s)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()
        super().__del__()

    async def decode(
        self, request_id: str, ticket: KVTicket, params: SamplingParams, subscriber: str
    ) -> AsyncIterator[str]:
        """Receive the KV and join the decode batch. Yields this replica's id once admitted (the caller
        may answer 200 and send the first token while the KV is fetched), then holds until the
        request ends. Tokens go through `stream_outputs`."""
        st = self._admit_streamed(request_id, subscriber)

        async def join() -> None:
            handoff = await self.transport.receive(ticket)
            self.metrics().handoff(ticket.nbytes, time.time() - ticket.sent_at)
            await self._add(request_id, self.core.add_with_kv(request_id, handoff, params))

        hold = self._hold(request_id, st, join, answer_first=True)
        async with contextlib.aclosing(hold) as held:
            async for replica in held:
                yield replica


class LLMServer(EngineServer):
    """Prefill and decode in one unit: the non-disaggregated mode."""

    role = "llm"

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, subscriber: str
    ) -> AsyncIterator[str]:
        """Like `DecodeServer.decode`, from the prompt: yields the replica id once added, holds until done."""
        st = self._admit_streamed(request_id, subscriber)

        async def join() -> None:
            await self._add(request_id, self.core.add(request_id, prompt, params))

        # added before the answer: a prompt the engine refuses is still a plain 400
        async with contextlib.aclosing(self._hold(request_id, st, join, answer_first=False)) as held:
            async for replica in held:
                yield replica
