"""Moving a prefilled request's latent KV from a prefill unit to a decode unit.

One small interface: the prefill side `send`s a `KVHandoff` and gets a picklable `KVTicket`,
which travels (through the ingress) to the decode side, which `receive`s the handoff. The ticket
never carries the KV itself: with the object-store transport it holds an ObjectRef owned by the
prefill replica, so the bytes go from the prefill node's object store straight to the decode
node's. A GPU transport (NCCL, or NIXL through Ray's direct tensor transport) implements the
same two calls.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import ray
import torch

from raymoe.engine.outputs import KVHandoff


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


class KVTransport(Protocol):
    name: str

    def send(self, handoff: KVHandoff, source_replica: str = "") -> KVTicket: ...

    async def receive(self, ticket: KVTicket) -> KVHandoff: ...


class ObjectStoreTransport:
    """The portable path: `ray.put` on the prefill replica, `await ref` on the decode replica.

    The prefill replica owns the object and must keep its ObjectRef alive until decode has it: a
    ref nested in a Serve response is not reliably borrowed (Ray frees it when the owner drops it),
    so the sender pins it (`PrefillServer` releases it when the ingress says decode has started,
    or after a TTL).
    """

    name = "object_store"

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


def make_transport(name: str) -> KVTransport:
    if name == "object_store":
        return ObjectStoreTransport()
    raise ValueError(f"kv_transport: unknown transport {name!r} (available: object_store)")
