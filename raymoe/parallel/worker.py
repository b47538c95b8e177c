"""One GPU of a deployment unit: a member of an attention group and an expert host.

The worker holds its attention shard (MLA heads split over the TP group; dense MLPs whole, TP1),
the routed experts of its physical slots, the shared expert, and the paged latent KV cache of
its DP rank (replicated over the TP group, since MLA's latent is shared by all heads). Ray calls
reach it once per step; inside the step every layer talks to the other workers through
torch.distributed collectives only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raymoe.engine.config import EngineConfig, kv_cache_tokens
from raymoe.engine.executor import ModelInput, SamplerOutput
from raymoe.engine.prompt_logprobs import compute_prompt_logprobs
from raymoe.engine.sampler import Sampler
from raymoe.eplb.placement import Placement
from raymoe.eplb.recorder import ExpertLoadRecorder
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MLA, MoE, Transformer
from raymoe.model.weights import _block_size, load_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.dispatch import EPContext, LayerStats, Step, Works, moe_dispatch_combine, rotate_replicas
from raymoe.parallel.migration import ExpertSource, Stager, StagingReport, plan_migration
from raymoe.parallel.topology import Topology


def shard_attention(attn: MLA, config: ModelConfig, tp_rank: int, tp: int) -> MLA:
    """This TP rank's heads of one MLA layer: q_b/kv_b rows and o_proj columns of its heads; the rest replicated."""
    h = config.num_attention_heads // tp
    shard = MLA(config.model_copy(update={"num_attention_heads": h}))
    shard = shard.to(device=attn.kv_a_proj_with_mqa.weight.device, dtype=attn.kv_a_proj_with_mqa.weight.dtype)
    heads = slice(tp_rank * h, (tp_rank + 1) * h)
    dqk, dn, dv = config.qk_head_dim, config.qk_nope_head_dim, config.v_head_dim
    src = attn.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, w in src.items():
        if name.startswith(("q_b_proj.", "q_proj.")):
            out[name] = w.view(config.num_attention_heads, dqk, -1)[heads].reshape(h * dqk, -1)
        elif name.startswith("kv_b_proj."):
            out[name] = w.view(config.num_attention_heads, dn + dv, -1)[heads].reshape(h * (dn + dv), -1)
        elif name.startswith("o_proj."):
            out[name] = w.view(w.shape[0], config.num_attention_heads, dv)[:, heads].reshape(w.shape[0], h * dv)
        else:
            out[name] = w
    shard.load_state_dict({k: v.clone() for k, v in out.items()})
    return shard.eval().requires_grad_(False)


def split_micro_batches(inp: ModelInput) -> list[ModelInput | None]:
    """Two micro-batches of whole sequences with token counts as even as possible (second may be None)."""
    qlens = inp.query_lens
    if len(qlens) < 2:
        return [inp, None]
    total = sum(qlens)
    best, acc, cut = None, 0, 1
    for s in range(1, len(qlens)):
        acc += qlens[s - 1]
        d = abs(total - 2 * acc)
        if best is None or d < best:
            best, cut = d, s
    tok = sum(qlens[:cut])
    empty = torch.empty(0, dtype=torch.long)

    def part(seqs: slice, toks: slice) -> ModelInput:
        return ModelInput(
            input_ids=inp.input_ids[toks],
            positions=inp.positions[toks],
            query_lens=qlens[seqs],
            context_lens=inp.context_lens[seqs],
            block_tables=inp.block_tables[seqs],
            slot_mapping=inp.slot_mapping[toks],
            sample_indices=empty,
            sampling=None,
        )

    return [part(slice(0, cut), slice(0, tok)), part(slice(cut, None), slice(tok, None))]


def run_interleaved(steps: list[Step]) -> list[Any]:
    """Drive step generators in strict alternation: each runs until it has issued a collective, then the next.

    While one waits on its in-flight exchange the other computes; every rank alternates in the same
    order, so the collectives are issued in one global order. One generator = no overlap.
    """
    pending: list[Works | None] = [None] * len(steps)
    done = [False] * len(steps)
    results: list[Any] = [None] * len(steps)
    while not all(done):
        for i, step in enumerate(steps):
            if done[i]:
                continue
            for work in pending[i] or ():
                work.wait()
            try:
                pending[i] = next(step)
            except StopIteration as stop:
                done[i], results[i] = True, stop.value
    return results


@dataclass(slots=True)
class WorkerMigrationStatus:
    """A worker's placement as it serves, and the migration it stages (on every step result; `migration_status`)."""

    steps: int  # steps this worker has run (its own counter)
    placement_version: int
    committed_at_step: int | None  # the step (of `steps`) at whose start the latest migration was committed
    staging: StagingReport | None  # the migration being staged or staged, None when there is none


@dataclass(slots=True)
class WorkerStepResult:
    output: SamplerOutput | torch.Tensor | None  # TP rank 0 of a group with work: sampled tokens or logits
    stats: dict[int, LayerStats]
    seconds: float
    migration: WorkerMigrationStatus
    commit_s: float  # time this step spent committing a migration before its forward (0.0: none)


@dataclass(slots=True)
class PlacementMaps:
    """The three views of an expert placement that a worker dispatches with, every MoE layer (numpy, int64)."""

    phy2log: np.ndarray  # [layers, num_slots] logical expert of each physical slot
    log2phy: np.ndarray  # [layers, experts, max_replicas] slots of each logical expert, padded with -1
    replica_count: np.ndarray  # [layers, experts]

    @classmethod
    def of(cls, placement: Placement) -> PlacementMaps:
        return cls(placement.phy2log, placement.log2phy, placement.replica_count)


@dataclass(slots=True)
class WorkerSpec:
    """What one worker actor is built from (sent once, when the driver creates it)."""

    rank: int  # global rank in the unit (node-major)
    topo: Topology
    engine: EngineConfig  # checkpoint, dtype, block size and the KV-cache sizing settings
    parallel: ParallelConfig  # device, exchange options and timeouts of the unit
    maps: PlacementMaps  # the initial placement
    store_host: str  # the driver's rendezvous TCP store
    store_port: int
    unit_id: str  # key prefix of this unit in the store


@dataclass(slots=True)
class MigrationOrder:
    """Stage the move to placement `version` (the driver's `begin_migration`, one call per worker)."""

    version: int
    maps: PlacementMaps


class GPUWorker:
    """A Ray actor (created with num_gpus=1 by the executor); methods are the unit's control plane.

    Built in three calls: the constructor (no work), `setup` (process groups, weights, KV budget),
    `allocate_kv_cache` (with the block count the driver chose from every worker's budget).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self.rank = spec.rank
        self.topo = spec.topo
        self.engine = spec.engine
        p = spec.parallel
        device = p.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # many workers share a host's cores
        self.maps = spec.maps
        self.store_host, self.store_port, self.unit_id = spec.store_host, spec.store_port, spec.unit_id
        self.hierarchical = p.node_limited and self.topo.nodes > 1
        self.replica_choice, self.overlap = p.replica_choice, p.overlap
        self.timeout = timedelta(seconds=p.collective_timeout_s)
        self.load_window_steps = p.load_window_steps
        self.bytes_in_flight = p.migration_bytes_in_flight
        self.sampler = Sampler()
        self.steps = 0
        self.placement_version = 0
        self.committed_at_step: int | None = None
        self._stager: Stager | None = None  # the migration being staged or staged
        self._order: MigrationOrder | None = None

    def pid(self) -> int:
        return os.getpid()

    def setup(self) -> int:
        """Join the unit's process groups (rendezvous at the driver's TCP store), load this GPU's weights, and
        return how many latent-KV tokens fit beside them (`kv_cache_tokens` on this worker's device)."""
        topo, rank = self.topo, self.rank
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Ray leaves this worker's GPU visible as device 0
        store = dist.TCPStore(self.store_host, self.store_port, is_master=False, timeout=self.timeout)
        dist.init_process_group(
            backend, store=dist.PrefixStore(self.unit_id, store), rank=rank, world_size=topo.world_size, timeout=self.timeout
        )
        self.tp_group = None
        for d in range(topo.dp_size):  # every rank creates every group, in one order
            g = dist.new_group(topo.attention_group(d), backend=backend) if topo.attention_tp > 1 else None
            if d == topo.dp_rank_of(rank):
                self.tp_group = g
        self.node_group = None
        for n in range(topo.nodes):
            g = dist.new_group(topo.node_ranks(n), backend=backend)
            if n == topo.node_of(rank):
                self.node_group = g
        # expert migration's own group: its transfers (on a background thread) never interleave with a step's
        # collectives on one group, and it times out like them
        self.migration_group = dist.new_group(list(range(topo.world_size)), backend=backend, timeout=self.timeout)
        # connected now, with every rank (NCCL's first operation on a group must involve all of its ranks)
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.migration_group)
        self.config = ModelConfig.from_checkpoint(self.engine.model)
        moe_layers = self.config.moe_layers
        model = load_checkpoint(
            self.engine.model, self.config, experts=self._hosted_plan(self.maps.phy2log), dtype=self.engine.dtype,
            device=self.device, progress=False,
        )
        self.tp_rank = topo.tp_rank_of(rank)
        if topo.attention_tp > 1:
            for layer in model.layers:
                layer.self_attn = shard_attention(layer.self_attn, self.config, self.tp_rank, topo.attention_tp)
        self.model: Transformer = model
        self.dtype = next(model.parameters()).dtype
        for layer in moe_layers:  # a slot per stack row: a migration copies experts into rows, never restacks
            moe = model.layers[layer].mlp
            moe.stack_rows = topo.slots_per_gpu
            moe.expert_stack()
        self.ep = EPContext(
            topo=topo,
            rank=rank,
            node_group=self.node_group,
            hierarchical=self.hierarchical,
            replica_choice=self.replica_choice,  # type: ignore[arg-type]
            log2phy={},  # the maps of every MoE layer: _install_maps below
            replica_count={},
            phy2log_local={},
            shared_id=topo.shared_expert_id,
            recorder=ExpertLoadRecorder(  # the decode layout counts the shared expert as one more column
                len(moe_layers), self.config.n_routed_experts + (topo.shared_expert_id is not None),
                self.load_window_steps,
            ),
            moe_index={layer: j for j, layer in enumerate(moe_layers)},
        )
        self._install_maps(self.maps)
        return kv_cache_tokens(self.engine, self.config, self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """This DP rank's paged latent cache, once the driver has taken the smallest budget over the unit."""
        self.kv_cache = torch.zeros(
            self.model.kv_cache_shape(num_blocks, self.engine.block_size), dtype=self.dtype, device=self.device
        )

    # --- the data plane of one micro-batch ---------------------------------------------------------
    def _forward(self, inp: ModelInput | None) -> Step:
        """Final-normed hidden states of one micro-batch; yields at the same points whatever the batch."""
        model, tp = self.model, self.topo.attention_tp
        dim = self.config.hidden_size
        empty = inp is None or inp.num_tokens == 0
        dt = self.dtype
        if empty:
            h = torch.zeros((0, dim), dtype=dt, device=self.device)
            ctx = None
        else:
            assert inp is not None
            ctx = model.make_context(inp.positions.to(self.device), inp.attention_metadata(self.device), self.kv_cache)
            h = model.embed_tokens(inp.input_ids.to(self.device))
        for i, layer in enumerate(model.layers):
            if empty:
                yield []
            else:
                a = layer.self_attn(layer.input_layernorm(h), ctx, self.kv_cache[i])
                if tp > 1:
                    yield [dist.all_reduce(a, group=self.tp_group, async_op=True)]
                else:
                    yield []
                h = h + a
            x = layer.post_attention_layernorm(h)
            if not isinstance(layer.mlp, MoE):
                h = h + layer.mlp(x)
                continue
            # sequence parallel inside the attention group: each TP rank dispatches its share of the tokens
            t = x.shape[0]
            per = -(-t // tp)
            xs = x[self.tp_rank * per : (self.tp_rank + 1) * per]
            ys = yield from moe_dispatch_combine(self.ep, i, layer.mlp, xs)
            if self.ep.shared_id is None:  # else the shared expert was routed like the others
                ys = ys + layer.mlp.shared_experts(xs)
            if tp > 1 and per > 0:  # per is the same on every rank of the group
                padded = ys.new_zeros((per, dim))
                padded[: ys.shape[0]] = ys
                parts = [torch.empty_like(padded) for _ in range(tp)]
                yield [dist.all_gather(parts, padded, group=self.tp_group, async_op=True)]
                ys = torch.cat(parts)[:t]
            else:
                yield []
            h = h + ys
        return model.norm(h)

    @torch.inference_mode()
    def step(self, inp: ModelInput | None, want_logits: bool = False, commit: int | None = None) -> WorkerStepResult:
        """One engine step for this worker's DP rank (None: an empty batch that still joins every collective).

        `commit`: the placement version every rank switches to at the start of this same step (staged before)."""
        t0 = time.perf_counter()
        self.steps += 1
        commit_s = self._commit(commit) if commit is not None else 0.0
        self.ep.stats = {}
        if self.overlap:
            mbs = split_micro_batches(inp) if inp is not None else [None, None]
            parts = run_interleaved([self._forward(mb) for mb in mbs])
            hidden = torch.cat(parts)
        else:
            (hidden,) = run_interleaved([self._forward(inp)])
        assert self.ep.recorder is not None
        self.ep.recorder.step()
        out: SamplerOutput | torch.Tensor | None = None
        if inp is not None and self.tp_rank == 0:
            if inp.sampling is None or inp.sample_indices.numel() == 0:
                out = torch.empty(0, self.config.vocab_size) if want_logits else SamplerOutput([], None)
            else:
                idx = inp.sample_indices.to(self.device)
                logits = self.model.compute_logits(hidden[idx])
                out = logits.cpu() if want_logits else self.sampler(logits, inp.sampling)
            if inp.prompt_logprobs is not None and isinstance(out, SamplerOutput):
                out.prompt_logprobs = compute_prompt_logprobs(
                    self.model.compute_logits, hidden, inp.prompt_logprobs, self.config.vocab_size
                )
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # this step's stream: a migration stages beside it
        return WorkerStepResult(out, self.ep.stats, time.perf_counter() - t0, self.migration_status(), commit_s)

    # --- control plane -----------------------------------------------------------------------------
    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(1, idx).cpu()

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(1, idx, kv.to(device=self.device, dtype=self.kv_cache.dtype))

    def expert_load(self) -> np.ndarray:
        """[moe_layers, experts] routed assignments this rank dispatched over its recorder's window of steps."""
        assert self.ep.recorder is not None
        return self.ep.recorder.load()

    def _my_slots(self) -> slice:
        spg = self.topo.slots_per_gpu
        return slice(self.rank * spg, (self.rank + 1) * spg)

    def _hosted_plan(self, phy2log: np.ndarray) -> dict[int, list[int]]:
        """Routed experts this GPU's slots hold, per MoE layer (id n_routed_experts is a shared-expert copy)."""
        mine = self._my_slots()
        n_exp = self.config.n_routed_experts
        return {
            layer: sorted({e for e in phy2log[j, mine].tolist() if e < n_exp})
            for j, layer in enumerate(self.config.moe_layers)
        }

    # --- migration: stage in the background, commit at the start of a step ----------------------------
    def begin_migration(self, order: MigrationOrder) -> None:
        """Start staging the experts this GPU gains under `order` on a background thread; returns at once."""
        if self._stager is not None and self._stager.running:
            raise RuntimeError(f"rank {self.rank}: a migration to version {self._stager.version} is still staging")
        cfg = self.config
        d, i = cfg.hidden_size, cfg.moe_intermediate_size
        expert_bytes = 3 * d * i * self.dtype.itemsize
        plan = plan_migration(self.maps.phy2log, order.maps.phy2log, self.topo, expert_bytes, self.bytes_in_flight)
        sources = {}
        for j, layer in enumerate(cfg.moe_layers):
            st = self.model.layers[layer].mlp.expert_stack()
            if st is not None:
                sources[j] = ExpertSource(st.w13, st.w2, st.row.tolist())
        self._order = order
        self._stager = Stager(
            rank=self.rank, version=order.version, plan=plan, sources=sources, group=self.migration_group,
            checkpoint=self.engine.model, moe_layers=list(cfg.moe_layers), shapes=((d, 2 * i), (i, d)),
            dtype=self.dtype, device=self.device, block=_block_size(cfg),
        )
        self._stager.start()

    def migration_status(self) -> WorkerMigrationStatus:
        return WorkerMigrationStatus(
            self.steps, self.placement_version, self.committed_at_step,
            self._stager.report if self._stager is not None else None,
        )

    def discard_migration(self) -> None:
        """Drop a finished staging (failed here or on a peer): its side buffers are freed, the placement stays."""
        if self._stager is not None:
            self._stager.join()
        self._stager, self._order = None, None

    def _commit(self, version: int) -> float:
        """Switch to the staged placement: gained experts copied into the rows of the dropped ones (in place),
        dispatch maps replaced. Returns the seconds it took."""
        t0 = time.perf_counter()
        stager, order = self._stager, self._order
        if stager is None or order is None or stager.version != version or not stager.report.done:
            raise RuntimeError(f"rank {self.rank}: commit of version {version} without a finished staging of it")
        if stager.report.error is not None:
            raise RuntimeError(f"rank {self.rank}: commit of version {version} whose staging failed")
        before, after = self._hosted_plan(self.maps.phy2log), self._hosted_plan(order.maps.phy2log)
        for j, layer in enumerate(self.config.moe_layers):
            old, new = set(before[layer]), set(after[layer])
            add = {e: stager.buffers[(j, e)] for e in new - old}
            if add or old - new:
                self.model.layers[layer].mlp.replace_experts(add, old - new)
        if self.device.type == "cuda":  # staged on the staging stream, read on this one: free them only after
            for w13, w2 in stager.buffers.values():
                w13.record_stream(torch.cuda.current_stream(self.device))
                w2.record_stream(torch.cuda.current_stream(self.device))
        self._install_maps(order.maps)
        self.placement_version, self.committed_at_step = version, self.steps
        self._stager, self._order = None, None
        return time.perf_counter() - t0

    def _install_maps(self, maps: PlacementMaps) -> None:
        """Dispatch with `maps` from the next MoE layer on: this rank's rotated replica lists, its slots' experts."""
        mine = self._my_slots()
        self.maps = maps
        for j, layer in enumerate(self.config.moe_layers):
            self.ep.log2phy[layer] = rotate_replicas(
                torch.tensor(maps.log2phy[j]), torch.tensor(maps.replica_count[j]), self.rank
            )
            self.ep.replica_count[layer] = torch.tensor(maps.replica_count[j])
            self.ep.phy2log_local[layer] = torch.tensor(maps.phy2log[j, mine])

    def set_options(self, *, overlap: bool, replica_choice: str, node_limited: bool) -> None:
        self.overlap = overlap
        self.ep.replica_choice = replica_choice  # type: ignore[assignment]
        self.ep.hierarchical = node_limited and self.topo.nodes > 1

    def hosted_experts(self) -> dict[int, list[int]]:
        return {i: layer.mlp.hosted_experts for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)}

    def expert_weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """A hosted expert's weights as its module names them (`gate_proj.weight`, ...: views of its stack row)."""
        m = self.model.layers[layer].mlp.experts[expert]
        if m is None:
            raise ValueError(f"rank {self.rank} does not host expert {expert} of layer {layer}")
        return {name: p.detach().cpu().clone() for name, p in m.named_parameters()}

    def expert_storage(self) -> dict[int, tuple[int, int]]:
        """Per MoE layer, where its expert stack's w13 and w2 live (a migration copies into them, never moves them)."""
        out = {}
        for layer in self.config.moe_layers:
            st = self.model.layers[layer].mlp.expert_stack()
            if st is not None:
                out[layer] = (st.w13.data_ptr(), st.w2.data_ptr())
        return out

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


