"""The replicas: one Serve replica = one deployment unit driving one `LLMEngine`.

The engine steps in a dedicated thread (one thread owns it: add, abort, step and export all
run there, in order), while the replica's asyncio loop takes requests and hands each request's
outputs to its queue. For a multi-GPU unit the engine gets the unit shape as
`EngineConfig.parallel` and drives the expert-parallel runtime's workers; nothing here changes.

- `PrefillServer.prefill`: runs the prompt, returns the first token and a KV ticket.
- `DecodeServer.decode`: receives the KV, joins the decode batch, streams tokens.
- `LLMServer.generate`: both in one unit (non-disaggregated mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from raymoe.engine.llm_engine import KVHandoff, LLMEngine, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.config import ServeConfig, UnitConfig
from raymoe.serve.kv_transport import KVTicket, make_transport
from raymoe.serve.protocol import QueueFullError, RequestRejected, UnitUnavailable


@dataclass
class TokenChunk:
    """New tokens of one request (several engine steps' worth when the consumer lags)."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str | None = None  # whole output text, on the finishing chunk


@dataclass
class PrefillResult:
    first_token_id: int
    finished: bool  # the first token already ended the request (stop / length)
    finish_reason: str | None
    text: str | None
    prompt_len: int
    ticket: KVTicket | None  # None when finished


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


class EngineServer:
    """Common part: the engine thread, the step loop, per-request queues, stats and gauges."""

    role = "llm"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config)
        self.config = cfg
        unit: UnitConfig = cfg.units()[self.role]
        self.unit = unit
        if unit.torch_threads is not None:
            import torch

            torch.set_num_threads(unit.torch_threads)
        self.engine = LLMEngine(cfg.engine_config(unit))
        self.replica = _replica_id()
        # the engine thread drops the GIL in every torch op and must win it back from the replica's
        # event loops streaming tokens; a shorter switch interval trades loop latency for step time
        sys.setswitchinterval(unit.gil_switch_interval_ms / 1000.0)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"raymoe-{self.role}-engine")
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._handoffs: dict[str, KVHandoff] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stats = self.engine.stats()
        self._metrics: Any = None
        self._last_publish = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self._step_batch = 0
        self._failure: BaseException | None = None  # the unit failed: no more steps, health check fails

    # --- the engine thread ---------------------------------------------------------------------
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outs = self.engine.step()
        if self.engine.last_step_ran:
            dt = time.perf_counter() - t0
            self._steps += 1
            self._step_seconds += dt
            self._step_batch += self._stats.running
        for out in outs:
            if out.finished and self.engine.requests.get(out.request_id) is not None:
                # a finished prefill_only request keeps its blocks: export them now, or free them
                if out.finish_reason == "prefill":
                    self._handoffs[out.request_id] = self.engine.export_kv(out.request_id)
                else:
                    self.engine.abort_request(out.request_id)
        self._stats = self.engine.stats()
        return outs

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

    def _ensure_loop(self) -> None:
        if self._failure is not None:
            raise self._unavailable()
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_unfinished_requests():
                self._publish(force=True)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.config.metrics_interval_s)
                continue
            try:
                outs = await self._call(self._step)
            except Exception as exc:
                self._fail_all(exc)
                raise
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            if not outs and not self.engine.last_step_ran:
                await asyncio.sleep(0.002)  # nothing could be scheduled (cache full): let aborts land
            self._publish()

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
        s = self._stats
        self.metrics().engine(s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_free)

    # --- requests --------------------------------------------------------------------------------
    def _admit(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        self._ensure_loop()
        # in flight beyond what the engine can run at once is waiting; counted here, not from the
        # last step's stats, so a burst between two steps is bounded too
        running_capacity = self.unit.engine.max_num_seqs * self.engine.dp_size
        waiting = len(self._queues) - running_capacity
        if waiting >= self.unit.max_waiting_requests:
            raise QueueFullError(
                f"{self.role} replica {self.replica}: {len(self._queues)} requests in flight, "
                f"{waiting} beyond max_num_seqs x dp ({running_capacity}) "
                f"(max_waiting_requests={self.unit.max_waiting_requests})"
            )
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        return q

    async def _add(self, fn: Callable[..., Any], request_id: str, *args: Any) -> None:
        try:
            await self._call(fn, request_id, *args)
        except ValueError as exc:
            self._queues.pop(request_id, None)
            raise RequestRejected(str(exc)) from None
        assert self._wake is not None
        self._wake.set()

    def _abort_soon(self, request_id: str) -> None:
        """Abort on the engine thread without awaiting (safe from a cancelled task's cleanup)."""
        self._queues.pop(request_id, None)
        self._handoffs.pop(request_id, None)
        self._thread.submit(self.engine.abort_request, request_id)

    async def _stream(self, request_id: str, q: asyncio.Queue[RequestOutput]) -> AsyncIterator[TokenChunk]:
        finished = False
        interval = self.config.stream_interval_ms / 1000.0
        last_sent = time.monotonic()
        try:
            while not finished:
                outs = [await self._next(q)]
                if interval > 0 and not outs[0].finished:
                    # vLLM's stream interval: one message per request per interval, not per token; each
                    # message is a Ray streaming item and an SSE event, so this bounds per-token overhead
                    wait = last_sent + interval - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                while not q.empty():
                    item = q.get_nowait()
                    if isinstance(item, BaseException):
                        raise self._unavailable()
                    outs.append(item)
                last_sent = time.monotonic()
                ids = [t for o in outs for t in o.new_token_ids]
                last = outs[-1]
                finished = last.finished
                yield TokenChunk(ids, finished, last.finish_reason, last.text)
        finally:
            if finished:
                self._queues.pop(request_id, None)
            else:
                self._abort_soon(request_id)

    async def abort(self, request_id: str) -> bool:
        self._queues.pop(request_id, None)
        return bool(await self._call(self.engine.abort_request, request_id))

    async def stats(self) -> dict[str, Any]:
        s = await self._call(self.engine.stats)
        return {
            "pinned_kv_handoffs": len(getattr(self, "_pinned", ())),
            "role": self.role,
            "replica": self.replica,
            "in_flight": len(self._queues),
            "steps": self._steps,
            "step_seconds": self._step_seconds,
            "mean_running_per_step": self._step_batch / max(1, self._steps),
            **asdict(s),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Read by raymoe.serve.routing.EngineLoadRouter (Serve polls it periodically)."""
        s = self._stats
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

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.shutdown(wait=False, cancel_futures=True)


class PrefillServer(EngineServer):
    role = "prefill"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        super().__init__(config)
        self.transport = make_transport(self.config.kv_transport)
        self._pinned: dict[str, tuple[KVTicket, float]] = {}  # request id -> (ticket, expiry)

    def _pin(self, ticket: KVTicket) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, exp) in self._pinned.items() if exp < now]:
            del self._pinned[rid]  # decode never picked it up (or the release was lost)
        self._pinned[ticket.request_id] = (ticket, now + self.config.kv_ticket_ttl_s)

    async def release(self, request_id: str, replica: str = "") -> bool:
        """Drop a handed-off request's KV (decode has it, or the request is gone); routed by `replica`."""
        return self._pinned.pop(request_id, None) is not None

    def pinned(self) -> int:
        return len(self._pinned)

    def _add_prefill_only(self, request_id: str, prompt: list[int], params: SamplingParams) -> int:
        return self.engine.add_request(request_id, prompt, params, prefill_only=True)

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams) -> PrefillResult:
        q = self._admit(request_id)
        await self._add(self._add_prefill_only, request_id, prompt, params)
        try:
            out = await self._next(q)
        except BaseException:
            self._abort_soon(request_id)
            raise
        self._queues.pop(request_id, None)
        handoff = self._handoffs.pop(request_id, None)
        token = out.new_token_ids[0]
        if out.finish_reason == "prefill":
            assert handoff is not None
            ticket = self.transport.send(handoff, self.replica)
            self._pin(ticket)
            return PrefillResult(token, False, None, None, out.prompt_len, ticket)
        return PrefillResult(token, True, out.finish_reason, out.text, out.prompt_len, None)


class DecodeServer(EngineServer):
    role = "decode"

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        super().__init__(config)
        self.transport = make_transport(self.config.kv_transport)

    async def decode(self, request_id: str, ticket: KVTicket, params: SamplingParams) -> AsyncIterator[TokenChunk]:
        """First an empty chunk (admitted: the caller may answer 200), then the request's tokens."""
        q = self._admit(request_id)
        try:
            yield TokenChunk([], False, None)
            handoff = await self.transport.receive(ticket)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self.metrics().handoff(ticket.nbytes, time.time() - ticket.sent_at)
        await self._add(self.engine.add_request_with_kv, request_id, handoff, params)
        async for chunk in self._stream(request_id, q):
            yield chunk


class LLMServer(EngineServer):
    """Prefill and decode in one unit: the non-disaggregated mode."""

    role = "llm"

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        q = self._admit(request_id)
        await self._add(self.engine.add_request, request_id, prompt, params)
        async for chunk in self._stream(request_id, q):
            yield chunk
