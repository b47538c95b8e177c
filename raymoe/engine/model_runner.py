"""The single-process executors: one model, one paged latent KV cache per DP rank, the sampler."""

from __future__ import annotations

import functools

import numpy as np
import torch

from raymoe.engine.config import EngineConfig, kv_cache_tokens
from raymoe.engine.executor import ModelInput, SamplerOutput
from raymoe.engine.prompt_logprobs import compute_prompt_logprobs
from raymoe.engine.sampler import Sampler
from raymoe.eplb.migration import MigrationResult, MigrationStatus
from raymoe.eplb.placement import Placement
from raymoe.eplb.recorder import ExpertLoadRecorder
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MoE, Transformer

LOAD_WINDOW_STEPS = 1024  # steps of expert-load counts a single-process unit keeps (the workers' default too)


class HostsEveryExpert:
    """`raymoe.eplb.migration.ExpertHost` of a unit that runs every expert in one process: no placement and
    nothing to migrate, but the routed ids of every MoE layer are counted (one index_add per layer and
    step, through `MoE.route_observer`) over the last `LOAD_WINDOW_STEPS` steps, so a load tracker
    on a CPU app sees the imbalance an expert-parallel unit would fix."""

    recorder: ExpertLoadRecorder | None

    def _record_load(self, model: Transformer) -> None:
        moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
        device = next(model.parameters()).device  # counted where the ids are: no copy, no sync per layer
        self.recorder = (
            ExpertLoadRecorder(len(moes), model.config.n_routed_experts, LOAD_WINDOW_STEPS, device) if moes else None
        )
        for j, moe in enumerate(moes):
            assert self.recorder is not None
            moe.route_observer = functools.partial(self.recorder.record, j)

    @property
    def placement(self) -> Placement | None:
        return None

    @property
    def placement_version(self) -> int:
        return 0

    def expert_load(self) -> np.ndarray:
        """[moe_layers, experts] routed (token, expert) assignments over the window."""
        return self.recorder.load() if self.recorder is not None else np.zeros((0, 0))

    def begin_migration(self, placement: Placement) -> None:
        raise RuntimeError(
            f"{type(self).__name__} hosts every expert in one process: there is nothing to migrate "
            "(an expert-parallel unit, `parallel=`, moves experts)"
        )

    def migration_status(self) -> MigrationStatus:
        return MigrationStatus(placement_version=0, staging=False, pending_commit=False, last=None, error=None)

    def commit_idle(self) -> MigrationResult | None:
        return None


class ModelRunner(HostsEveryExpert):
    """Runs the model over one rank's flat batch and samples on the device the logits are on.

    `record_load`: count expert load (off for the ranks of a `DataParallelRunner`, which counts for them)."""

    def __init__(self, model: Transformer, num_kv_blocks: int, block_size: int, *, record_load: bool = True) -> None:
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        self.model = model.eval()
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self._num_kv_blocks = num_kv_blocks
        self._block_size = block_size
        self.kv_cache = torch.zeros(
            model.kv_cache_shape(num_kv_blocks, block_size), dtype=self.dtype, device=self.device
        )
        self.sampler = Sampler()
        self.recorder = None
        if record_load:
            self._record_load(model)

    @property
    def dp_size(self) -> int:
        return 1

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Latent cache bytes one token takes over all layers (kv_lora_rank + rope dims per layer)."""
        layers, _, _, dim = self.kv_cache.shape
        return layers * dim * self.kv_cache.element_size()

    @torch.inference_mode()
    def execute(self, inputs: list[ModelInput | None]) -> list[SamplerOutput | None]:
        if len(inputs) != 1:
            raise ValueError(f"ModelRunner has one DP rank, got {len(inputs)} inputs")
        out = self.run(inputs[0])
        if self.recorder is not None:
            self.recorder.step()
        return [out]

    def run(self, inp: ModelInput | None) -> SamplerOutput | None:
        """This rank's batch through the model (no load-window step closed: `execute` does that)."""
        if inp is None:
            return None
        dev = self.device
        hidden = self.model(
            inp.input_ids.to(dev, non_blocking=True),
            inp.positions.to(dev, non_blocking=True),
            inp.attention_metadata(dev),
            self.kv_cache,
        )
        prompt_lps = None
        if inp.prompt_logprobs is not None:  # before `hidden[idx]`: positions inside the prompt are wanted
            model = self.model
            prompt_lps = compute_prompt_logprobs(model.compute_logits, hidden, inp.prompt_logprobs, model.config.vocab_size)
        if inp.sampling is None or inp.sample_indices.numel() == 0:
            return SamplerOutput([], None, prompt_logprobs=prompt_lps)
        idx = inp.sample_indices.to(dev, non_blocking=True)
        rows = hidden if idx.numel() == hidden.shape[0] else hidden[idx]
        logits = self.model.compute_logits(rows)
        out = self.sampler(logits, inp.sampling)
        out.prompt_logprobs = prompt_lps
        return out

    def _check(self, dp_rank: int, block_ids: list[int]) -> None:
        if dp_rank != 0:
            raise ValueError(f"dp_rank {dp_rank} out of range (dp_size=1)")
        if block_ids and not (0 <= min(block_ids) and max(block_ids) < self._num_kv_blocks):
            raise ValueError(f"block_ids out of range [0, {self._num_kv_blocks})")

    def read_kv(self, dp_rank: int, block_ids: list[int]) -> torch.Tensor:
        self._check(dp_rank, block_ids)
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(1, idx).cpu()

    def write_kv(self, dp_rank: int, block_ids: list[int], kv: torch.Tensor) -> None:
        self._check(dp_rank, block_ids)
        want = (self.kv_cache.shape[0], len(block_ids), *self.kv_cache.shape[2:])
        if tuple(kv.shape) != want:
            raise ValueError(f"kv shape {tuple(kv.shape)} does not match {want}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(1, idx, kv.to(device=self.device, dtype=self.dtype))

    def shutdown(self) -> None:
        self.kv_cache = torch.empty(0)


class DataParallelRunner(HostsEveryExpert):
    """`dp_size` attention ranks in one process over one shared model, each with its own paged cache.

    The reference for the expert-parallel runtime's executor: the same per-rank scheduling and KV
    handoff, run rank after rank on one device, so a distributed result can be compared with it.
    """

    def __init__(self, model: Transformer, dp_size: int, num_kv_blocks: int, block_size: int) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.ranks = [ModelRunner(model, num_kv_blocks, block_size, record_load=False) for _ in range(dp_size)]
        self._record_load(model)

    @property
    def dp_size(self) -> int:
        return len(self.ranks)

    @property
    def num_kv_blocks(self) -> int:
        return self.ranks[0].num_kv_blocks

    @property
    def block_size(self) -> int:
        return self.ranks[0].block_size

    @property
    def kv_bytes_per_token(self) -> int:
        return self.ranks[0].kv_bytes_per_token

    def execute(self, inputs: list[ModelInput | None]) -> list[SamplerOutput | None]:
        if len(inputs) != self.dp_size:
            raise ValueError(f"{self.dp_size} DP ranks, got {len(inputs)} inputs")
        with torch.inference_mode():
            out = [rank.run(inp) for rank, inp in zip(self.ranks, inputs, strict=True)]
        if self.recorder is not None:
            self.recorder.step()
        return out

    def _rank(self, dp_rank: int) -> ModelRunner:
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range (dp_size={self.dp_size})")
        return self.ranks[dp_rank]

    def read_kv(self, dp_rank: int, block_ids: list[int]) -> torch.Tensor:
        return self._rank(dp_rank).read_kv(0, block_ids)

    def write_kv(self, dp_rank: int, block_ids: list[int], kv: torch.Tensor) -> None:
        self._rank(dp_rank).write_kv(0, block_ids, kv)

    def shutdown(self) -> None:
        for rank in self.ranks:
            rank.shutdown()


def build_runner(config: EngineConfig, model_config: ModelConfig) -> ModelRunner | DataParallelRunner:
    """The single-process executor: the weights on the configured device, then caches sized from what is left."""
    from raymoe.model.weights import load_checkpoint

    device = config.resolved_device()
    model = load_checkpoint(config.model, model_config, dtype=config.dtype, device=device)
    tokens = kv_cache_tokens(config, model_config, device, caches=config.data_parallel_size)
    num_blocks = -(-tokens // config.block_size)
    if config.data_parallel_size > 1:
        return DataParallelRunner(model, config.data_parallel_size, num_blocks, config.block_size)
    return ModelRunner(model, num_blocks, config.block_size)
