"""Moving a prefilled request's latent KV from a prefill unit to a decode unit.

A transport gives the prefill side a picklable `KVTicket`, which travels (through the ingress) to
the decode side, which `receive`s the handoff. The ticket never carries the KV itself:

- `object_store`: the prefill replica `ray.put`s the KV and the ticket holds its ObjectRef, so the
  bytes go from the prefill node's object store straight to the decode node's. The replica pins the
  ref until the ingress says decode has it.
- `direct`: the prefill engine core keeps the KV and serves it on a ZMQ socket of its own (IPC on
  its node, TCP from other nodes); the ticket holds that address and decode pulls the bytes from
  the core, which drops them once sent (a fetch is its release). No object store, no reference
  counting across three processes, no release call per request: the pull model of vLLM's P2P and
  Mooncake connectors and of NIXL, over sockets.

A GPU transport (NCCL, or NIXL through Ray's direct tensor transport) takes a third name.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec
import numpy as np
import ray
import torch

from raymoe.engine.outputs import KVHandoff
from raymoe.serve.engine_core import FetchKV, KVAddress, KVFetched, kv_from_frame


@dataclass
class KVTicket:
    """What decode needs to fetch one handoff: where it is, how big, when it was sent."""

    transport: str
    request_id: str
    nbytes: int
    prompt_len: int
    sent_at: float  # wall clock on the prefill side
    ref: Any  # transport-specific locator (an ObjectRef for the object store)
    source_replica: str = ""  # the prefill replica that holds the KV until released

    @property
    def released_by_fetch(self) -> bool:
        """Decode's fetch frees the prefill side's copy: no release call once decode has the KV."""
        return self.transport == DirectTransport.name


class KVTransport(Protocol):
    name: str

    async def receive(self, ticket: KVTicket) -> KVHandoff: ...

    def close(self) -> None: ...


class ObjectStoreTransport:
    """The portable path: `ray.put` on the prefill replica, `await ref` on the decode replica.

    The prefill replica owns the object and must keep its ObjectRef alive until decode has it: a
    ref nested in a Serve response is not reliably borrowed (Ray frees it when the owner drops it),
    so the sender pins it (`PrefillServer` releases it when the ingress says decode has started,
    or after a TTL).
    """

    name = "object_store"

    def close(self) -> None:
        pass

    def send(self, handoff: KVHandoff, source_replica: str = "") -> KVTicket:
        kv = handoff.kv.detach().cpu().contiguous()
        nbytes = kv.element_size() * kv.nelement()
        # the KV as a numpy array: Ray stores it out of band and maps it zero-copy on the receiver
        # (a torch tensor is pickled through torch.save). numpy has no bfloat16: it travels as int16.
        raw = (kv.view(torch.int16) if kv.dtype == torch.bfloat16 else kv).numpy()
        ref = ray.put((replace(handoff, kv=None), str(kv.dtype).removeprefix("torch."), raw))
        return KVTicket(self.name, handoff.request_id, nbytes, handoff.prompt_len, time.time(), ref, source_replica)

    async def receive(self, ticket: KVTicket) -> KVHandoff:
        if ticket.transport != self.name:
            raise ValueError(f"ticket for transport {ticket.transport!r} given to {self.name!r}")
        got = await ticket.ref
        if not (isinstance(got, tuple) and len(got) == 3 and isinstance(got[0], KVHandoff)):
            raise TypeError(f"KV ticket for {ticket.request_id!r} resolved to {type(got).__name__}")
        handoff, dtype, raw = got
        with warnings.catch_warnings():  # a read-only view of the object store: the engine copies it in
            warnings.simplefilter("ignore", UserWarning)
            kv = torch.from_numpy(np.asarray(raw))
        return replace(handoff, kv=kv.view(torch.bfloat16) if dtype == "bfloat16" else kv)


class _CoreLink:
    """One decode replica's DEALER socket to one prefill core's KV socket: fetches in flight by id."""

    def __init__(self, url: str) -> None:
        import zmq
        import zmq.asyncio

        self.url = url
        self._ctx = zmq.asyncio.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[tuple[Any, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        decoder = msgspec.msgpack.Decoder(KVFetched)
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            msg = decoder.decode(frames[0].buffer)
            fut = self._pending.pop(msg.fetch_id, None)
            if fut is None or fut.done():
                continue  # its fetch timed out
            if msg.error is not None or msg.meta is None:
                fut.set_exception(RuntimeError(msg.error or "empty KV reply"))
            else:
                fut.set_result((msg.meta, frames[1].buffer if len(frames) > 1 else b""))

    async def fetch(self, request_id: str, timeout_s: float) -> tuple[Any, Any]:
        fetch_id = next(self._ids)
        fut: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
        self._pending[fetch_id] = fut
        try:
            await self.sock.send(_ENCODER.encode(FetchKV(fetch_id, request_id)))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"KV of request {request_id!r}: no answer from the prefill core at {self.url} in {timeout_s:g} s"
            ) from None
        finally:
            self._pending.pop(fetch_id, None)

    def close(self) -> None:
        self._reader.cancel()
        self.sock.close(0)


class DirectTransport:
    """Decode pulls the KV from the prefill engine core's own socket (see the module docstring)."""

    name = "direct"

    def __init__(self, fetch_timeout_s: float = 10.0) -> None:
        self.fetch_timeout_s = fetch_timeout_s
        self._links: dict[str, _CoreLink] = {}
        self._node: str | None = None

    @staticmethod
    def ticket(request_id: str, nbytes: int, prompt_len: int, address: Any, source_replica: str = "") -> KVTicket:
        return KVTicket("direct", request_id, nbytes, prompt_len, time.time(), address, source_replica)

    def _url(self, address: Any) -> str:
        if self._node is None:
            self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return address.ipc if address.node_id == self._node else address.tcp

    async def receive(self, ticket: KVTicket) -> KVHandoff:
        if ticket.transport != self.name:
            raise ValueError(f"ticket for transport {ticket.transport!r} given to {self.name!r}")
        if not isinstance(ticket.ref, KVAddress):
            raise TypeError(f"KV ticket for {ticket.request_id!r} carries {type(ticket.ref).__name__}, not a KVAddress")
        url = self._url(ticket.ref)
        link = self._links.get(url)
        if link is None:
            link = self._links[url] = _CoreLink(url)
        meta, frame = await link.fetch(ticket.request_id, self.fetch_timeout_s)
        return kv_from_frame(meta, frame)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


_ENCODER = msgspec.msgpack.Encoder()


def make_transport(name: str, fetch_timeout_s: float = 10.0) -> KVTransport:
    if name == "object_store":
        return ObjectStoreTransport()
    if name == "direct":
        return DirectTransport(fetch_timeout_s)
    raise ValueError(f"kv_transport: unknown transport {name!r} (available: object_store, direct)")
