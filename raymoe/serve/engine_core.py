"""A replica's engine core: the `LLMEngine` step loop, in its own process or on a thread.

vLLM's split. The engine steps in an engine-core process (a Ray actor on the replica's node, so an
expert-parallel unit's executor can still create and call its worker actors), and the Serve
replica is a thin client: it admits requests, sends them to the core, and fans the core's
per-step output batches out to the ingress streams. The two talk over ZMQ IPC (one PUSH/PULL pair
each way), with msgspec-encoded typed messages: per step, one `StepBatch` (every request's new
tokens, the handed-off KV of finished prefills as raw frames, the engine's stats) crosses the
boundary. The replica's asyncio loop, Ray's streaming and the HTTP side then never hold the GIL
the step loop needs, and on a CPU box the step's torch threads run beside them, not between them.

`ThreadEngineClient` runs the same `EngineCore` on one thread of the replica (the mode for a
server driven in-process without Ray, and for tests that patch the engine in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np
import torch

from raymoe.engine.executor import TopLogprobs
from raymoe.engine.llm_engine import LLMEngine
from raymoe.engine.outputs import EngineStats, KVHandoff, RequestOutput
from raymoe.eplb.migration import ExpertHost, MigrationResult, MigrationStatus
from raymoe.eplb.placement import Placement

logger = logging.getLogger("ray.serve")


# --- what crosses the boundary ----------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True):
    """A new request (`prefill_only`: a prefill unit's, its KV exported when it finishes)."""

    call_id: int
    request_id: str
    prompt: list[int]
    params: bytes  # pickled SamplingParams: once per request, and whatever fields it grows
    prefill_only: bool = False


class KVMeta(msgspec.Struct):
    """A KV handoff without its tensor, which follows as one raw frame."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    first_logprob: float | None
    first_top_logprobs: TopLogprobs | None
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * getattr(torch, self.dtype).itemsize


class AddWithKV(msgspec.Struct, tag=True):
    """A decode unit's request: its prompt's KV (the next frame) and first token from a prefill unit."""

    call_id: int
    handoff: KVMeta
    params: bytes


class Abort(msgspec.Struct, tag=True):
    request_id: str


class Call(msgspec.Struct, tag=True):
    """A control-plane call of an `EngineCore` method by name (stats, expert placement, migration)."""

    call_id: int
    method: str
    args: bytes  # pickled tuple


class DropKV(msgspec.Struct, tag=True):
    """A held handoff decode will not fetch (its request ended first): free it now, not at its TTL."""

    request_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


ToCore = AddRequest | AddWithKV | Abort | DropKV | Call | Shutdown


class FetchKV(msgspec.Struct, tag=True):
    """A decode replica's pull of a held handoff from a prefill core's KV socket (`kv_transport: direct`)."""

    fetch_id: int
    request_id: str


class KVFetched(msgspec.Struct, tag=True):
    """The answer to a FetchKV: the handoff's metadata (its tensor the next frame), or why there is none.
    A fetched handoff is no longer held: the fetch is its release."""

    fetch_id: int
    meta: KVMeta | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class KVAddress:
    """Where a prefill core serves its held handoffs: IPC for a replica on its node, TCP from other nodes."""

    node_id: str
    ipc: str
    tcp: str


class StepBatch(msgspec.Struct, tag=True):
    """One engine step's news: outputs, the KV of the prefills it finished (one frame each, in
    order; with a KV socket only their metadata, in `held`: the core keeps the tensors for decode to
    fetch), the engine's stats after it and the core's step counters."""

    outputs: list[RequestOutput]
    handoffs: list[KVMeta]
    stats: EngineStats
    ran: bool
    steps: int
    step_seconds: float
    step_batch: int
    held: list[KVMeta] = []


class KVServing(msgspec.Struct, tag=True):
    """The core's first message when it serves its handoffs itself: where decode fetches them."""

    node_id: str
    ipc: str
    tcp: str


class Reply(msgspec.Struct, tag=True):
    """The answer to an AddRequest / AddWithKV / Call: a pickled result, or an error (`value`: the
    request's own fault, a ValueError; anything else: the core's)."""

    call_id: int
    result: bytes = b""
    error: str | None = None
    error_type: str | None = None  # the exception's class name


class Failed(msgspec.Struct, tag=True):
    """A step raised: the unit's state is unknown, the core stops stepping."""

    error: str


FromCore = StepBatch | Reply | Failed | KVServing


@dataclass(slots=True)
class CoreInfo:
    """What a replica needs to know about its engine up front."""

    dp_size: int
    n_group: int
    hosts_experts: bool  # the executor is an ExpertHost (reports load, may migrate)
    executor: str  # its class name


@dataclass(slots=True)
class ExpertSnapshot:
    placement: Placement | None
    load: np.ndarray
    status: MigrationStatus


def kv_to_frame(h: KVHandoff) -> tuple[KVMeta, memoryview]:
    kv = h.kv.detach().cpu().contiguous()
    raw = (kv.view(torch.int16) if kv.dtype == torch.bfloat16 else kv).numpy()
    meta = KVMeta(h.request_id, list(h.prompt_token_ids), h.first_token_id, h.first_logprob, h.first_top_logprobs,
                  str(kv.dtype).removeprefix("torch."), list(kv.shape))
    return meta, memoryview(np.ascontiguousarray(raw)).cast("B")


def kv_from_frame(meta: KVMeta, frame: Any) -> KVHandoff:
    dtype = getattr(torch, meta.dtype)
    carrier = torch.int16 if dtype == torch.bfloat16 else dtype
    kv = torch.frombuffer(bytearray(frame), dtype=carrier).view(*meta.shape)
    if dtype == torch.bfloat16:
        kv = kv.view(torch.bfloat16)
    return KVHandoff(meta.request_id, meta.prompt_token_ids, meta.first_token_id, meta.first_logprob, kv,
                     meta.first_top_logprobs)


class HeldKV:
    """Handoffs a prefill core keeps until decode fetches them, drops them, or their TTL passes.

    Insertion order is expiry order (one TTL for all), so expiring looks at the oldest only."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._held: dict[str, tuple[KVMeta, memoryview, float]] = {}
        self._lock = threading.Lock()  # the step loop holds, the KV server thread takes

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, meta: KVMeta, raw: memoryview, now: float) -> None:
        with self._lock:
            self._held.pop(meta.request_id, None)
            self._held[meta.request_id] = (meta, raw, now + self.ttl_s)

    def take(self, request_id: str) -> tuple[KVMeta, memoryview] | None:
        with self._lock:
            got = self._held.pop(request_id, None)
        return None if got is None else (got[0], got[1])

    def drop(self, request_id: str) -> bool:
        with self._lock:
            return self._held.pop(request_id, None) is not None

    def expire(self, now: float) -> int:
        n = 0
        with self._lock:
            while self._held:
                rid, (_, _, expires) = next(iter(self._held.items()))
                if expires > now:
                    break
                del self._held[rid]  # decode never came for it (its request went away, or the ticket was lost)
                n += 1
        return n


# --- the core -----------------------------------------------------------------------------------
class EngineCore:
    """The engine and its step: run once, export what finished prefills leave, count steps."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.held: HeldKV | None = None  # a KV-serving prefill core's handoffs (EngineCoreProcess.run)
        self.steps = 0
        self.step_seconds = 0.0
        self.step_batch = 0  # sum over steps of the running requests

    @classmethod
    def build(cls, engine_config: Any, parallel: Any, torch_threads: int | None) -> EngineCore:
        from raymoe.executors import build_executor

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        return cls(LLMEngine(engine_config, build_executor(engine_config, parallel)))

    def info(self) -> CoreInfo:
        engine = self.engine
        return CoreInfo(engine.dp_size, engine.model_config.n_group, self._host() is not None,
                        type(engine.executor).__name__)

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> tuple[StepBatch, list[KVHandoff]]:
        engine = self.engine
        t0 = time.perf_counter()
        outs = engine.step()
        if engine.last_step_ran:
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0
            self.step_batch += sum(len(s.running) for s in engine.schedulers)
        handoffs: list[KVHandoff] = []
        for out in outs:
            if out.finished and engine.requests.get(out.request_id) is not None:
                # a finished prefill_only request keeps its blocks: export them now, or free them
                if out.finish_reason == "prefill":
                    handoffs.append(engine.export_kv(out.request_id))
                else:
                    engine.abort_request(out.request_id)
        batch = StepBatch(outs, [], engine.stats(), engine.last_step_ran, self.steps, self.step_seconds,
                          self.step_batch)
        return batch, handoffs

    # requests
    def add_request(self, request_id: str, prompt: list[int], params: Any, prefill_only: bool) -> int:
        return self.engine.add_request(request_id, prompt, params, prefill_only=prefill_only)

    def add_request_with_kv(self, request_id: str, handoff: KVHandoff, params: Any) -> None:
        self.engine.add_request_with_kv(request_id, handoff, params)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def held_kv(self) -> int:
        """Handoffs this core holds for decode to fetch (`kv_transport: direct`)."""
        return len(self.held) if self.held is not None else 0

    # expert placement (raymoe.eplb)
    def _host(self) -> ExpertHost | None:
        ex = self.engine.executor
        return ex if isinstance(ex, ExpertHost) else None

    def can_migrate(self) -> bool:
        host = self._host()
        return host is not None and host.placement is not None

    def expert_snapshot(self) -> ExpertSnapshot:
        host = self._host()
        assert host is not None
        return ExpertSnapshot(host.placement, host.expert_load(), host.migration_status())

    def migration_status(self) -> MigrationStatus:
        host = self._host()
        assert host is not None
        return host.migration_status()

    def begin_migration(self, placement: Placement) -> None:
        host = self._host()
        assert host is not None
        host.begin_migration(placement)

    def commit_idle(self) -> MigrationResult | None:
        host = self._host()
        assert host is not None
        return host.commit_idle()

    def shutdown(self) -> None:
        self.engine.shutdown()


# --- the replica's side -------------------------------------------------------------------------
class CoreSink(Protocol):
    """What a client hands the core's news to (the replica, on its event loop)."""

    def _deliver(self, batch: StepBatch, handoffs: list[KVHandoff]) -> None: ...

    def _idle(self) -> None: ...

    def _fail_all(self, exc: BaseException) -> None: ...


class EngineClient(Protocol):
    info: CoreInfo

    def start(self, sink: CoreSink) -> asyncio.Task[None]:
        """Begin stepping / reading on the running loop; the task ends only when the core failed."""
        ...

    async def add(self, request_id: str, prompt: list[int], params: Any, prefill_only: bool = False) -> int: ...

    async def add_with_kv(self, request_id: str, handoff: KVHandoff, params: Any) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def drop_kv(self, request_id: str) -> None:
        """Free a handoff the core holds for decode (`kv_transport: direct`) before its TTL."""
        ...

    async def kv_address(self) -> KVAddress:
        """Where this (prefill) core serves its held handoffs; RuntimeError when it serves none."""
        ...

    async def call(self, method: str, *args: Any) -> Any: ...

    def shutdown(self) -> None: ...


class ThreadEngineClient:
    """The core on one thread of the replica (add, abort, step and calls all run there, in order)."""

    def __init__(self, core: EngineCore, metrics_interval_s: float) -> None:
        self.core = core
        self.info = core.info()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raymoe-engine")
        self._wake: asyncio.Event | None = None
        self._interval = metrics_interval_s

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def start(self, sink: CoreSink) -> asyncio.Task[None]:
        self._wake = asyncio.Event()
        return asyncio.get_running_loop().create_task(self._run(sink))

    async def _run(self, sink: CoreSink) -> None:
        assert self._wake is not None
        while True:
            if not self.core.has_work():
                sink._idle()
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
                continue
            try:
                batch, handoffs = await self._on_thread(self.core.step)
            except Exception as exc:
                sink._fail_all(exc)
                raise
            sink._deliver(batch, handoffs)
            if not batch.outputs and not batch.ran:
                await asyncio.sleep(0.002)  # nothing could be scheduled (cache full): let aborts land

    def _woken(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def add(self, request_id: str, prompt: list[int], params: Any, prefill_only: bool = False) -> int:
        n = await self._on_thread(self.core.add_request, request_id, prompt, params, prefill_only)
        self._woken()
        return n

    async def add_with_kv(self, request_id: str, handoff: KVHandoff, params: Any) -> None:
        await self._on_thread(self.core.add_request_with_kv, request_id, handoff, params)
        self._woken()

    def abort(self, request_id: str) -> None:
        self._thread.submit(self.core.abort, request_id)

    def drop_kv(self, request_id: str) -> None:
        pass  # a core on a thread serves no KV socket: its handoffs go out with the StepBatch

    async def kv_address(self) -> KVAddress:
        raise RuntimeError("an engine core on the replica's thread serves no KV socket (kv_transport: direct "
                           "needs engine_process: true)")

    async def call(self, method: str, *args: Any) -> Any:
        return await self._on_thread(getattr(self.core, method), *args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


_TO_CORE = msgspec.msgpack.Encoder()
_FROM_CORE = msgspec.msgpack.Decoder(FromCore)


class EngineCoreProcess:
    """The engine-core process (a Ray actor beside its replica): builds the engine, then `run` is
    its step loop, reading requests between steps and sending one StepBatch per step."""

    def __init__(self, engine_config: Any, parallel: Any, torch_threads: int | None) -> None:
        self.core = EngineCore.build(engine_config, parallel, torch_threads)

    def info(self) -> CoreInfo:
        return self.core.info()

    def run(self, to_core: str, from_core: str, kv_ipc: str | None = None, kv_ttl_s: float = 60.0) -> None:
        """Serve until Shutdown (or the owner replica dies, which ends this actor with it).

        `kv_ipc`: a prefill core serves its handoffs itself (`kv_transport: direct`) on a ROUTER
        socket bound there and on a TCP port of its node, announced first (`KVServing`); finished
        prefills then leave only their metadata in the StepBatch."""
        import ray
        import zmq

        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.connect(to_core)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(from_core)
        decoder = msgspec.msgpack.Decoder(ToCore)
        encoder = msgspec.msgpack.Encoder()
        core = self.core
        server: threading.Thread | None = None
        stop = threading.Event()
        if kv_ipc is not None:
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.SNDHWM, 0)
            router.bind(kv_ipc)
            ip = ray.util.get_node_ip_address()
            port = router.bind_to_random_port(f"tcp://{ip}")
            core.held = HeldKV(kv_ttl_s)
            # fetches answered on a thread of their own: a decode replica's pull never waits for a
            # long prefill step to end (torch drops the GIL inside each op)
            server = threading.Thread(target=self._serve_kv, args=(router, core.held, stop), daemon=True,
                                      name="raymoe-kv-server")
            server.start()
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
            push.send(encoder.encode(KVServing(node, kv_ipc, f"tcp://{ip}:{port}")))
        held = core.held
        failed = False
        try:
            while True:
                busy = core.has_work() and not failed
                if pull.poll(0 if busy else 1000):
                    while True:
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        msg = decoder.decode(frames[0].buffer)
                        if isinstance(msg, Shutdown):
                            return
                        reply = self._handle(msg, frames)
                        if reply is not None:
                            push.send(encoder.encode(reply))
                if failed or not core.has_work():
                    continue
                try:
                    batch, handoffs = core.step()
                except Exception as exc:
                    logger.exception("engine core: step failed")
                    push.send(encoder.encode(Failed(repr(exc))))
                    failed = True
                    continue
                if not batch.outputs and not batch.ran:
                    time.sleep(0.002)  # nothing could be scheduled (cache full): let aborts land
                    continue
                frames_out: list[Any] = [b""]
                now = time.monotonic()
                for h in handoffs:
                    meta, raw = kv_to_frame(h)
                    if held is not None:
                        held.hold(meta, raw, now)
                        batch.held.append(meta)
                    else:
                        batch.handoffs.append(meta)
                        frames_out.append(raw)
                frames_out[0] = encoder.encode(batch)
                push.send_multipart(frames_out, copy=False)
        finally:
            stop.set()
            if server is not None:
                server.join(timeout=5)
            core.shutdown()
            pull.close(0)
            push.close(0)
            ctx.term()

    @staticmethod
    def _serve_kv(router: Any, held: HeldKV, stop: threading.Event) -> None:
        """The KV server thread: answer each FetchKV with the handoff (released by being fetched) or
        why it is gone, and expire what nobody fetched."""
        import zmq

        decoder = msgspec.msgpack.Decoder(FetchKV)
        encoder = msgspec.msgpack.Encoder()
        try:
            while not stop.is_set():
                held.expire(time.monotonic())
                if not router.poll(200):
                    continue
                while True:
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) != 2:  # not [identity, payload]: not one of our fetchers
                        continue
                    ident, payload = frames
                    try:
                        msg = decoder.decode(payload)
                    except msgspec.DecodeError:
                        continue
                    got = held.take(msg.request_id)
                    if got is None:
                        err = f"the prefill core holds no KV for request {msg.request_id!r} (fetched, dropped or expired)"
                        router.send_multipart([ident, encoder.encode(KVFetched(msg.fetch_id, error=err))])
                    else:
                        meta, raw = got
                        router.send_multipart([ident, encoder.encode(KVFetched(msg.fetch_id, meta)), raw], copy=False)
        finally:
            router.close(0)

    def _handle(self, msg: Any, frames: list[Any]) -> Reply | None:
        core = self.core
        if isinstance(msg, Abort):
            core.abort(msg.request_id)
            return None
        if isinstance(msg, DropKV):
            if core.held is not None:
                core.held.drop(msg.request_id)
            return None
        try:
            if isinstance(msg, AddRequest):
                result: Any = core.add_request(msg.request_id, msg.prompt, pickle.loads(msg.params), msg.prefill_only)
            elif isinstance(msg, AddWithKV):
                handoff = kv_from_frame(msg.handoff, frames[1].buffer)
                result = core.add_request_with_kv(handoff.request_id, handoff, pickle.loads(msg.params))
            else:
                result = getattr(core, msg.method)(*pickle.loads(msg.args))
        except Exception as exc:
            return Reply(msg.call_id, error=str(exc), error_type=type(exc).__name__)
        return Reply(msg.call_id, pickle.dumps(result))


_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "RuntimeError": RuntimeError}


class ProcessEngineClient:
    """The replica's end of an engine-core process: sockets, the actor, pending replies."""

    def __init__(
        self, engine_config: Any, parallel: Any, torch_threads: int | None, num_gpus: int, metrics_interval_s: float,
        serve_kv_ttl_s: float | None = None, env: dict[str, str] | None = None,
    ) -> None:
        """`serve_kv_ttl_s`: the core keeps its handoffs and serves them on a KV socket of its own
        (`kv_transport: direct`), each for at most this long. `env`: the core process's environment
        variables over the replica's (`ServeConfig.engine_env`)."""
        import ray
        import zmq
        import zmq.asyncio
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        base = os.path.join(tempfile.gettempdir(), f"raymoe-core-{uuid.uuid4().hex[:12]}")
        self._paths = [f"{base}.in", f"{base}.out"] + ([f"{base}.kv"] if serve_kv_ttl_s is not None else [])
        to_core, from_core = (f"ipc://{p}" for p in self._paths[:2])
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.bind(to_core)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.bind(from_core)
        node = ray.get_runtime_context().get_node_id()
        actor_cls = ray.remote(EngineCoreProcess)
        # owned by this replica: it dies with it; on its node (IPC), holding the unit's one GPU if any
        self.actor = actor_cls.options(
            num_cpus=0, num_gpus=num_gpus, max_concurrency=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            **({"runtime_env": {"env_vars": dict(env)}} if env else {}),
        ).remote(engine_config, parallel, torch_threads)
        self.info: CoreInfo = ray.get(self.actor.info.remote())
        kv_ipc = f"ipc://{self._paths[2]}" if serve_kv_ttl_s is not None else None
        self._done = self.actor.run.remote(to_core, from_core, kv_ipc, serve_kv_ttl_s or 0.0)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._serves_kv = kv_ipc is not None
        self._kv_address: asyncio.Future[KVAddress] | None = None
        self._interval_ms = max(1, int(metrics_interval_s * 1000))

    def start(self, sink: CoreSink) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        watch = loop.create_task(self._watch(sink))
        return loop.create_task(self._read(sink, watch))

    async def _watch(self, sink: CoreSink) -> None:
        """The actor's `run` returns only on shutdown: its end (or its death) fails the unit."""
        try:
            await self._done
            exc: BaseException = RuntimeError("engine core stopped")
        except Exception as e:  # the actor died: ActorDiedError and its kin
            exc = e
        sink._fail_all(exc)
        self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        if self._kv_address is not None and not self._kv_address.done():
            self._kv_address.set_exception(RuntimeError(f"engine core failed: {exc!r}"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"engine core failed: {exc!r}"))
        self._pending.clear()

    async def _read(self, sink: CoreSink, watch: asyncio.Task[None]) -> None:
        import zmq

        try:
            while True:
                if not await self._pull.poll(self._interval_ms):
                    sink._idle()
                    continue
                frames = await self._pull.recv_multipart(copy=False)
                msg = _FROM_CORE.decode(frames[0].buffer)
                if isinstance(msg, StepBatch):
                    handoffs = [kv_from_frame(m, f.buffer) for m, f in zip(msg.handoffs, frames[1:], strict=True)]
                    sink._deliver(msg, handoffs)
                elif isinstance(msg, KVServing):
                    fut = self._address_future()
                    if not fut.done():
                        fut.set_result(KVAddress(msg.node_id, msg.ipc, msg.tcp))
                elif isinstance(msg, Reply):
                    fut = self._pending.pop(msg.call_id, None)
                    if fut is not None and not fut.done():
                        if msg.error is None:
                            fut.set_result(pickle.loads(msg.result))
                        else:
                            fut.set_exception(_ERRORS.get(msg.error_type or "", RuntimeError)(msg.error))
                else:
                    raise RuntimeError(f"engine core step failed: {msg.error}")
        except zmq.ZMQError:
            if watch.done():  # the core is gone and the sockets closed: already failed by `_watch`
                return
            raise
        except Exception as exc:  # a message this side cannot take: the unit's state is unknown
            sink._fail_all(exc)
            self._fail_pending(exc)
            raise

    def _send(self, msg: Any, *extra: Any) -> None:
        if extra:
            self._push.send_multipart([_TO_CORE.encode(msg), *extra], copy=False)
        else:
            self._push.send(_TO_CORE.encode(msg))

    def _expect(self) -> tuple[int, asyncio.Future[Any]]:
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        return call_id, fut

    async def add(self, request_id: str, prompt: list[int], params: Any, prefill_only: bool = False) -> int:
        call_id, fut = self._expect()
        self._send(AddRequest(call_id, request_id, list(prompt), pickle.dumps(params), prefill_only))
        return await fut

    async def add_with_kv(self, request_id: str, handoff: KVHandoff, params: Any) -> None:
        call_id, fut = self._expect()
        meta, raw = kv_to_frame(handoff)
        meta.request_id = request_id
        self._send(AddWithKV(call_id, meta, pickle.dumps(params)), raw)
        await fut

    def abort(self, request_id: str) -> None:
        self._send(Abort(request_id))

    def drop_kv(self, request_id: str) -> None:
        if self._serves_kv:
            self._send(DropKV(request_id))

    def _address_future(self) -> asyncio.Future[KVAddress]:
        if self._kv_address is None:
            self._kv_address = asyncio.get_running_loop().create_future()
        return self._kv_address

    async def kv_address(self) -> KVAddress:
        if not self._serves_kv:
            raise RuntimeError("this engine core serves no KV socket (kv_transport is not direct)")
        return await asyncio.shield(self._address_future())

    async def call(self, method: str, *args: Any) -> Any:
        call_id, fut = self._expect()
        self._send(Call(call_id, method, pickle.dumps(args)))
        return await fut

    def shutdown(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            self._send(Shutdown())
        with contextlib.suppress(Exception):
            ray.kill(self.actor)
        for sock in (self._push, self._pull):
            sock.close(0)
        for p in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
