"""Which expert copies a unit moves to go from its running placement to a new one, from where, in which
order (`plan_migration`), and the worker thread that fetches them (`Stager`).

Every worker computes the same plan from the two placements they all know, so both sides of each
peer transfer agree on its round, order and tag without one more message.
A GPU gains the routed experts its new slots hold that its old slots did not (`Placement.moves_from`
less the slots that change to an expert the GPU already holds: those move no weights). Each
gain is fetched from a worker that hosts the expert in the running placement (one on the same
node first: NVLink before the network; the one that has sent the least so far; the lowest
rank), or read from the checkpoint when none does. Peer transfers run in rounds: in each round
every rank sends plus receives at most `bytes_in_flight` (at least one copy), so the side
buffers being filled at any time are bounded. The shared expert (decode layout: id
`num_routed`) lives on every worker, so its copies move no weights either.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raymoe.model.weights import CheckpointReader, checkpoint_name, read_tensor
from raymoe.parallel.topology import Topology

ExpertWeights = tuple[torch.Tensor, torch.Tensor]  # (w13 [D, 2I], w2 [I, D]): one row of a MoE's expert stack


@dataclass(frozen=True, slots=True)
class Transfer:
    """One expert copy a rank gains: from a peer's expert stack, or from the checkpoint (src None)."""

    layer: int  # MoE layer index (row of phy2log)
    expert: int
    dst: int
    src: int | None
    tag: int  # unique in the plan: the peer messages of this copy use tags 2 * tag and 2 * tag + 1


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    rounds: list[list[Transfer]]  # peer transfers, round after round
    disk: list[Transfer]  # copies no worker hosts now: read from the checkpoint

    @property
    def copies(self) -> int:
        return self.from_peers + self.from_disk

    @property
    def from_peers(self) -> int:
        return sum(len(r) for r in self.rounds)

    @property
    def from_disk(self) -> int:
        return len(self.disk)


def hosted_sets(phy2log: np.ndarray, topo: Topology) -> list[list[set[int]]]:
    """[moe layer][rank] the routed experts that GPU's slots hold (the shared expert left out)."""
    k = topo.slots_per_gpu
    return [
        [{e for e in row[r * k : (r + 1) * k].tolist() if e < topo.num_experts} for r in range(topo.world_size)]
        for row in phy2log
    ]


def plan_migration(
    old: np.ndarray, new: np.ndarray, topo: Topology, expert_bytes: int, bytes_in_flight: int
) -> MigrationPlan:
    """The transfers from placement `old` to `new` (phy2log [moe layers, slots] each), deterministic in its inputs."""
    if old.shape != new.shape:
        raise ValueError(f"phy2log shapes differ: {tuple(old.shape)} vs {tuple(new.shape)}")
    before, after = hosted_sets(old, topo), hosted_sets(new, topo)
    sent = [0] * topo.world_size
    peers: list[Transfer] = []
    disk: list[Transfer] = []
    tag = 0
    for j in range(old.shape[0]):
        holders: dict[int, list[int]] = {}
        for r, experts in enumerate(before[j]):
            for e in experts:
                holders.setdefault(e, []).append(r)
        for dst in range(topo.world_size):
            for e in sorted(after[j][dst] - before[j][dst]):
                cands = holders.get(e, [])
                if not cands:
                    disk.append(Transfer(j, e, dst, None, tag))
                else:
                    node = topo.node_of(dst)
                    src = min(cands, key=lambda r: (topo.node_of(r) != node, sent[r], r))
                    sent[src] += 1
                    peers.append(Transfer(j, e, dst, src, tag))
                tag += 1
    return MigrationPlan(_rounds(peers, expert_bytes, bytes_in_flight), disk)


def _rounds(transfers: list[Transfer], expert_bytes: int, bound: int) -> list[list[Transfer]]:
    """Greedy in plan order: a transfer joins the round being filled unless one of its two ranks would then move
    more than `bound` bytes in it (a rank's first transfer of a round always fits); the rest wait for the next."""
    rounds: list[list[Transfer]] = []
    pending = transfers
    while pending:
        load: dict[int, int] = {}
        this, rest = [], []
        for t in pending:
            assert t.src is not None
            if all(load.get(r, 0) == 0 or load[r] + expert_bytes <= bound for r in (t.src, t.dst)):
                this.append(t)
                for r in (t.src, t.dst):
                    load[r] = load.get(r, 0) + expert_bytes
            else:
                rest.append(t)
        rounds.append(this)
        pending = rest
    return rounds


@dataclass(frozen=True, slots=True)
class StagingReport:
    """Where one worker's staging of one migration stands (rides on its step results and status replies)."""

    version: int  # the placement version being staged
    done: bool  # the staging thread has ended (staged, or failed: see error)
    error: str | None = None
    copies: int = 0  # expert copies this worker gained
    from_peers: int = 0
    from_disk: int = 0
    bytes: int = 0  # bytes written into its side buffers
    seconds: float = 0.0  # begin_migration -> done, on this worker


@dataclass
class ExpertSource:
    """A MoE layer's expert stack as it serves now: what a peer transfer sends from (rows are read, never written,
    while a migration stages: a commit only happens once every worker has staged)."""

    w13: torch.Tensor  # [rows, D, 2I]
    w2: torch.Tensor  # [rows, I, D]
    row: list[int]  # expert -> row (-1: not hosted)


@dataclass
class Stager:
    """One worker's staging of one migration: peer rounds over the unit's migration process group, then the
    checkpoint reads, into side buffers, on a background thread while the worker's steps go on.

    The step thread and this one share the GIL; this one spends it only in short Python between
    collectives and tensor copies that release it (gloo/NCCL waits, memcpy, safetensors' reads).
    On CUDA it runs on a stream of its own, synchronised before it reports done.
    """

    rank: int
    version: int
    plan: MigrationPlan
    sources: dict[int, ExpertSource]  # MoE layer index -> this worker's expert stack
    group: Any  # the migration process group
    checkpoint: str
    moe_layers: list[int]  # MoE layer index -> model layer
    shapes: tuple[tuple[int, int], tuple[int, int]]  # (w13, w2) of one expert
    dtype: torch.dtype
    device: torch.device
    block: tuple[int, int]  # the checkpoint's FP8 block size
    buffers: dict[tuple[int, int], ExpertWeights] = field(default_factory=dict)  # (MoE layer, expert) -> weights
    report: StagingReport = field(init=False)

    def __post_init__(self) -> None:
        self.report = StagingReport(self.version, done=False)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=f"raymoe-staging-{self.version}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        stream = None
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # per thread
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.default_stream(self.device))
            with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                peers, moved = self._peer_rounds()
                disk, read = self._read_checkpoint()
                if stream is not None:
                    stream.synchronize()
            self.report = replace(
                self.report, done=True, copies=peers + disk, from_peers=peers, from_disk=disk, bytes=moved + read,
                seconds=time.perf_counter() - self._t0,
            )
        except Exception as e:  # reported, and the old placement stays in force
            self.buffers.clear()
            self.report = replace(
                self.report, done=True, error=f"rank {self.rank}: {type(e).__name__}: {e}",
                seconds=time.perf_counter() - self._t0,
            )

    def _peer_rounds(self) -> tuple[int, int]:
        """Receive this rank's peer copies and send the ones it serves, one round at a time; (copies, bytes) in."""
        got = moved = 0
        (d, i2), (i, d2) = self.shapes
        for round_ in self.plan.rounds:
            ops = []
            for t in round_:
                if t.dst == self.rank:
                    bufs = (
                        torch.empty((d, i2), dtype=self.dtype, device=self.device),
                        torch.empty((i, d2), dtype=self.dtype, device=self.device),
                    )
                    self.buffers[(t.layer, t.expert)] = bufs
                    ops += [dist.P2POp(dist.irecv, b, t.src, self.group, 2 * t.tag + n) for n, b in enumerate(bufs)]
                    got += 1
                    moved += sum(b.numel() * b.element_size() for b in bufs)
                elif t.src == self.rank:
                    src = self.sources[t.layer]
                    r = src.row[t.expert]
                    ops += [
                        dist.P2POp(dist.isend, w[r], t.dst, self.group, 2 * t.tag + n)
                        for n, w in enumerate((src.w13, src.w2))
                    ]
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
                if self.device.type == "cuda":  # wait() only orders the streams: bound what is in flight here
                    torch.cuda.current_stream(self.device).synchronize()
        return got, moved

    def _read_checkpoint(self) -> tuple[int, int]:
        """This rank's copies no worker hosts now, read as `load_checkpoint` reads them; (copies, bytes)."""
        mine = [t for t in self.plan.disk if t.dst == self.rank]
        if not mine:
            return 0, 0
        reader = CheckpointReader(self.checkpoint)
        (d, _), (i, _) = self.shapes
        read = 0
        try:
            for t in mine:
                prefix = f"layers.{self.moe_layers[t.layer]}.mlp.experts.{t.expert}."

                def get(name: str, shape: tuple[int, int], prefix: str = prefix) -> torch.Tensor:
                    return read_tensor(reader, checkpoint_name(prefix + name), shape, self.block, device=self.device)

                gate, up = get("gate_proj.weight", (i, d)), get("up_proj.weight", (i, d))
                w13 = torch.cat((gate, up)).t().to(self.dtype).contiguous()
                w2 = get("down_proj.weight", (d, i)).t().to(self.dtype).contiguous()
                self.buffers[(t.layer, t.expert)] = (w13, w2)
                read += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        finally:
            reader.close()
        return len(mine), read

