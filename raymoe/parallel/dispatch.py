"""Dispatch and combine of one MoE layer across the expert hosts of a unit.

Every step is a generator that yields the asynchronous collectives it has issued (a list of
`torch.distributed` work handles) and returns its result, so that a caller can interleave two
micro-batches (one computes while the other's exchange is in flight) or simply wait at each
yield. Each call yields the same number of times whatever its data (an empty batch included),
so every rank issues the unit's collectives in one order.

Flat exchange: one row per (token, destination GPU), sent straight there. Hierarchical
(node-limited) exchange: one row per (token, destination node), sent to the GPU of the same
local index on that node, which forwards it inside the node to the GPUs hosting its experts;
combine runs the same way back, partial sums reduced at each hop.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from raymoe.eplb.recorder import ExpertLoadRecorder
from raymoe.eplb.replica import choose_replicas
from raymoe.model.deepseek_v3 import MoE
from raymoe.parallel.topology import Topology

Works = list[Any]
Step = Generator[Works, None, Any]


def rotate_replicas(log2phy: torch.Tensor, replica_count: torch.Tensor, rank: int) -> torch.Tensor:
    """This source rank's view of log2phy: each expert's replica list rotated by `rank`.

    The policy's per-step choice deals an expert's pairs over its replicas starting at the first;
    rotating per rank makes the ranks start at different replicas, so a replica is not favoured when
    each rank has only a token or two per expert (decode).
    """
    count = replica_count.clamp(min=1).unsqueeze(1)
    cols = torch.arange(log2phy.shape[1]).unsqueeze(0)
    rotated = log2phy.gather(1, torch.where(cols < count, (cols + rank) % count, cols))
    return rotated


@dataclass
class Pairs:
    """Rows to send: one per (source row, destination), with the slots/weights that destination serves."""

    src_row: torch.Tensor  # [P] source row of each pair (pairs sorted by destination)
    slots: torch.Tensor  # [P, k] global physical slot, -1 where that assignment goes elsewhere
    weights: torch.Tensor  # [P, k] float32 combine weights, 0 where slot is -1
    counts: list[int]  # pairs per destination


def make_pairs(dest: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, num_dests: int) -> Pairs:
    """Deduplicate (row, assignment) into (row, destination) pairs; dest/slots/weights are [t, k] (slot -1: skip)."""
    t, k = slots.shape
    valid = slots >= 0
    key = dest * max(t, 1) + torch.arange(t, device=slots.device).unsqueeze(1)  # destination-major
    key = torch.where(valid, key, torch.full_like(key, num_dests * max(t, 1)))
    uniq, inv = torch.unique(key.reshape(-1), sorted=True, return_inverse=True)
    n_pairs = int((uniq < num_dests * max(t, 1)).sum())
    out_slots = torch.full((n_pairs + 1, k), -1, dtype=torch.long, device=slots.device)
    out_w = torch.zeros((n_pairs + 1, k), dtype=torch.float32, device=slots.device)
    col = torch.arange(k, device=slots.device).expand(t, k).reshape(-1)
    inv = inv.clamp(max=n_pairs)  # invalid assignments land in a scratch row
    out_slots.view(-1).index_put_((inv * k + col,), slots.reshape(-1))
    out_w.view(-1).index_put_((inv * k + col,), weights.reshape(-1).float())
    pair_keys = uniq[:n_pairs]
    counts = torch.bincount(pair_keys // max(t, 1), minlength=num_dests)
    return Pairs(pair_keys % max(t, 1), out_slots[:n_pairs], out_w[:n_pairs], counts.tolist())


@dataclass(slots=True)
class LayerStats:
    """What one rank sent for one layer (hidden-state bytes, dispatch and combine) and computed."""

    bytes_inter_node: int = 0
    bytes_intra_node: int = 0
    expert_tokens: int = 0  # (token, expert) assignments this GPU computed


@dataclass
class EPContext:
    """What a rank needs to run dispatch/combine: its place, its groups, the placement of each MoE layer."""

    topo: Topology
    rank: int
    node_group: Any  # this rank's node process group (hierarchical forward)
    hierarchical: bool
    replica_choice: Literal["static", "balanced"]
    log2phy: dict[int, torch.Tensor]  # model layer -> [experts, max_replicas], rotated for this rank
    replica_count: dict[int, torch.Tensor]  # model layer -> [experts]
    phy2log_local: dict[int, torch.Tensor]  # model layer -> [slots_per_gpu] logical expert of each local slot
    shared_id: int | None = None  # decode layout: logical id of the shared expert, routed to every token
    recorder: ExpertLoadRecorder | None = None  # routed ids of every MoE layer, every step (the load tracker's input)
    moe_index: dict[int, int] = field(default_factory=dict)  # model layer -> MoE layer index
    stats: dict[int, LayerStats] = field(default_factory=dict)

    def record_send(self, layer: int, counts: list[int], group_ranks: list[int] | None, row_bytes: int) -> None:
        """Count bytes of one exchange (its rows per destination) as crossing nodes or staying inside one."""
        st = self.stats.setdefault(layer, LayerStats())
        my_node = self.topo.node_of(self.rank)
        for i, n in enumerate(counts):
            dst = group_ranks[i] if group_ranks is not None else i
            if n == 0 or dst == self.rank:
                continue
            if self.topo.node_of(dst) == my_node:
                st.bytes_intra_node += n * row_bytes
            else:
                st.bytes_inter_node += n * row_bytes


def _exchange_counts(counts: list[int], group: Any, device: torch.device) -> list[int]:
    send = torch.tensor(counts, dtype=torch.long, device=device)  # NCCL exchanges device tensors only
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def _a2a(tensors: list[torch.Tensor], send: list[int], recv: list[int], group: Any) -> Step:
    """Async all_to_all of row-aligned tensors with the given split sizes; yields once."""
    outs, works = [], []
    for x in tensors:
        out = x.new_empty((sum(recv), *x.shape[1:]))
        works.append(dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True))
        outs.append(out)
    yield works
    return outs


@dataclass(slots=True)
class Received:
    """What one dispatch hop delivered: rows with the slots/weights they are for, and rows per source."""

    rows: torch.Tensor  # [R, D] hidden states
    slots: torch.Tensor  # [R, k] global physical slot, -1 where that assignment is served elsewhere
    weights: torch.Tensor  # [R, k] float32 combine weights
    counts: list[int]  # rows from each source of the group (the split sizes of the way back)


def _hop(ctx: EPContext, inside_node: bool) -> tuple[Any, list[int] | None]:
    """Process group and its global ranks of one hop: this rank's node group, or the whole unit (None, None)."""
    if inside_node:
        return ctx.node_group, ctx.topo.node_ranks(ctx.topo.node_of(ctx.rank))
    return None, None


def _send_rows(ctx: EPContext, layer: int, x: torch.Tensor, pairs: Pairs, inside_node: bool) -> Step:
    """Dispatch rows x[pairs.src_row] with their slots/weights (over the unit, or inside this rank's node).

    Hidden state and metadata travel as one byte row per pair (one all-to-all, whatever the dtype).
    """
    group, group_ranks = _hop(ctx, inside_node)
    recv = _exchange_counts(pairs.counts, group, x.device)
    meta = torch.cat((pairs.weights, pairs.slots.to(torch.float32)), dim=1)  # slot ids < 2**24: exact in float32
    payload = x.index_select(0, pairs.src_row.to(x.device))
    n, dim = payload.shape
    k = pairs.slots.shape[1]
    packed = torch.cat(
        (payload.view(torch.uint8).view(n, dim * x.element_size()), meta.to(x.device).view(torch.uint8).view(n, 8 * k)),
        dim=1,
    )
    ctx.record_send(layer, pairs.counts, group_ranks, dim * x.element_size())
    (got,) = yield from _a2a([packed], pairs.counts, recv, group)
    hidden_bytes = dim * x.element_size()
    rows = got[:, :hidden_bytes].contiguous().view(x.dtype)
    meta_in = got[:, hidden_bytes:].contiguous().view(torch.float32)
    return Received(rows, meta_in[:, k:].round().long(), meta_in[:, :k], recv)


def _send_back(
    ctx: EPContext, layer: int, y: torch.Tensor, pairs: Pairs, got: Received, out_rows: int, inside_node: bool
) -> Step:
    """Combine: return the partial sums along the reverse path of `_send_rows` and reduce them per source row."""
    group, group_ranks = _hop(ctx, inside_node)
    ctx.record_send(layer, got.counts, group_ranks, y.shape[1] * y.element_size())
    (back,) = yield from _a2a([y], got.counts, pairs.counts, group)
    out = y.new_zeros((out_rows, y.shape[1]))
    return out.index_add_(0, pairs.src_row.to(y.device), back)


def _compute(ctx: EPContext, layer: int, moe: MoE, got: Received) -> torch.Tensor:
    """This host's experts over the received rows: weighted sum per row of its (slot, weight) entries."""
    rows, slots, w = got.rows, got.slots, got.weights
    valid = slots >= 0
    row_idx, col = valid.nonzero(as_tuple=True)
    local = slots[row_idx, col] - ctx.rank * ctx.topo.slots_per_gpu
    if local.numel() and (int(local.min()) < 0 or int(local.max()) >= ctx.topo.slots_per_gpu):
        raise RuntimeError(f"rank {ctx.rank} received a slot it does not host (layer {layer})")
    logical = ctx.phy2log_local[layer].to(rows.device)[local]
    st = ctx.stats.setdefault(layer, LayerStats())
    st.expert_tokens += int(row_idx.numel())
    weight = w[row_idx, col].unsqueeze(1)
    out = rows.new_zeros(rows.shape)
    if ctx.shared_id is not None:
        is_shared = logical == ctx.shared_id
        if bool(is_shared.any()):
            rs = row_idx[is_shared].to(rows.device)
            out.index_add_(0, rs, moe.shared_experts(rows.index_select(0, rs)) * weight[is_shared].to(rows.dtype))
            keep = ~is_shared
            row_idx, logical, weight = row_idx[keep], logical[keep], weight[keep]
    y = moe.expert_forward(rows.index_select(0, row_idx.to(rows.device)), logical.unsqueeze(1), weight)
    return out.index_add_(0, row_idx.to(rows.device), y)


def moe_dispatch_combine(ctx: EPContext, layer: int, moe: MoE, x: torch.Tensor) -> Step:
    """Routed-expert output for this rank's tokens x [t, D]: gate here, experts wherever their replicas are."""
    topo = ctx.topo
    t = x.shape[0]
    if t:
        ids, weights = moe.route(x)
        ids_cpu = ids.cpu()
        shared_ids = torch.full((t, 1), ctx.shared_id) if ctx.shared_id is not None else None
        if ctx.recorder is not None:  # the decode layout's load has the shared expert as its last column
            ctx.recorder.record(ctx.moe_index[layer], ids_cpu if shared_ids is None else torch.cat((ids_cpu, shared_ids), 1))
        slots = choose_replicas(
            ctx.log2phy[layer], ctx.replica_count[layer], topo.slots_per_gpu, ids_cpu, ctx.replica_choice,
            num_gpus=topo.world_size,
        )
        weights = weights.float().cpu()
        if shared_ids is not None:  # the shared expert as one more routed expert, weight 1
            shared = choose_replicas(
                ctx.log2phy[layer], ctx.replica_count[layer], topo.slots_per_gpu, shared_ids,
                ctx.replica_choice, num_gpus=topo.world_size,
            )
            slots = torch.cat((slots, shared), dim=1)
            weights = torch.cat((weights, torch.ones(t, 1)), dim=1)
    else:
        k = moe.gate.top_k + (ctx.shared_id is not None)
        slots = torch.empty((0, k), dtype=torch.long)
        weights = torch.empty((0, k), dtype=torch.float32)
    gpu = slots // topo.slots_per_gpu
    if not ctx.hierarchical:
        pairs = make_pairs(gpu, slots, weights, topo.world_size)
        got = yield from _send_rows(ctx, layer, x, pairs, inside_node=False)
        y = _compute(ctx, layer, moe, got)
        return (yield from _send_back(ctx, layer, y, pairs, got, t, inside_node=False))
    # hierarchical: to the same-index GPU of each destination node, then forwarded inside that node
    g = topo.gpus_per_node
    local = topo.local_of(ctx.rank)
    node_pairs = make_pairs((gpu // g) * g + local, slots, weights, topo.world_size)
    got1 = yield from _send_rows(ctx, layer, x, node_pairs, inside_node=False)
    fwd_pairs = make_pairs((got1.slots // topo.slots_per_gpu) % g, got1.slots, got1.weights, g)
    got2 = yield from _send_rows(ctx, layer, got1.rows, fwd_pairs, inside_node=True)
    y2 = _compute(ctx, layer, moe, got2)
    y1 = yield from _send_back(ctx, layer, y2, fwd_pairs, got2, got1.rows.shape[0], inside_node=True)
    return (yield from _send_back(ctx, layer, y1, node_pairs, got1, t, inside_node=False))
