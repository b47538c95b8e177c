"""The step API: requests in, incremental token outputs out, over one deployment unit.

The engine owns one (Scheduler, BlockManager) pair per data-parallel attention rank and an
`Executor` that runs every rank's batch in one step. Everything per token on the host is list
work proportional to the number of sequences; the tensors of a step are built in one go.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.executor import Executor, ModelInput, SamplerOutput, SamplingMetadata
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.scheduler import ScheduledBatch, Scheduler
from raymoe.engine.sequence import Sequence, SequenceStatus
from raymoe.model.config import ModelConfig
from raymoe.model.tokenizer import Tokenizer

DEFAULT_CPU_KV_TOKENS = 32768
DEFAULT_MAX_MODEL_LEN = 8192


class EngineConfig(BaseModel):
    """What an engine serves and how big its batches and caches are (validated at construction)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(description="checkpoint directory (Hugging Face DeepSeek-V3 layout)")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    max_model_len: int | None = Field(
        None, ge=2, description="prompt + generated tokens; default min(config, 8192)"
    )
    kv_cache_tokens: int | None = Field(None, ge=1, description="tokens of latent KV per DP rank")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="on CUDA without kv_cache_tokens")
    block_size: int = Field(16, ge=1, le=1024)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1, description="per-step token budget (chunked prefill)")
    enable_prefix_caching: bool = True
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="attention DP ranks in this process (one model, a cache each); reference for `parallel`",
    )
    parallel: Any = Field(None, description="raymoe.parallel ParallelConfig: run on an expert-parallel unit")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class RequestOutput:
    """What one step produced for one request (only requests with news are reported)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    prompt_len: int
    text: str | None = None  # the whole output text, once finished (None without a tokenizer)


@dataclass
class KVHandoff:
    """A prefilled request, ready for a decode unit: latent KV of its prompt and its first token."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    first_logprob: float | None
    kv: torch.Tensor  # [num_layers, prompt_len, kv_lora_rank + qk_rope_head_dim], CPU

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class EngineStats:
    dp_size: int
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    prompt_tokens: int  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    running_per_rank: list[int]
    kv_blocks_used_per_rank: list[int]


class LLMEngine:
    """One deployment unit's engine. Not thread-safe: drive add/step/abort from one thread (or event loop).

    executor: run on this one instead of building it from the config (tests, custom runtimes).
    """

    def __init__(self, config: EngineConfig, *, executor: Executor | None = None) -> None:
        self.config = config
        path = Path(config.model)
        self.model_config = ModelConfig.from_checkpoint(path)
        self.tokenizer = Tokenizer.from_checkpoint(path)
        mc = self.model_config
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if executor is None:
            executor = self._build_executor()
        self.executor = executor
        self.block_size = executor.block_size
        self.dp_size = executor.dp_size
        self.block_managers = [
            BlockManager(executor.num_kv_blocks, executor.block_size, config.enable_prefix_caching)
            for _ in range(self.dp_size)
        ]
        self.schedulers = [
            Scheduler(bm, config.max_num_seqs, config.max_num_batched_tokens) for bm in self.block_managers
        ]
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            eos.update(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._finished_now: list[Sequence] = []  # handed-off requests already complete at arrival
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.last_step_ran = False  # whether the latest step() ran a batch (progress check)

    # --- construction --------------------------------------------------------------------------
    def kv_cache_tokens(self) -> int:
        """Latent-KV tokens per rank: configured, else a share of free GPU memory, else a CPU default."""
        cfg = self.config
        if cfg.kv_cache_tokens is not None:
            return cfg.kv_cache_tokens
        device = cfg.resolved_device()
        if device.type == "cuda":
            mc = self.model_config
            itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
            per_token = mc.num_hidden_layers * mc.kv_cache_dim * itemsize
            free, total = torch.cuda.mem_get_info(device)
            budget = free - (1 - cfg.gpu_memory_utilization) * total
            return max(cfg.block_size, int(budget // per_token))
        return max(DEFAULT_CPU_KV_TOKENS, self.max_model_len)

    def _build_executor(self) -> Executor:
        cfg = self.config
        if cfg.parallel is not None:
            from raymoe.parallel.executor import build_executor  # the expert-parallel runtime's own

            return build_executor(cfg)
        from raymoe.engine.model_runner import DataParallelRunner, ModelRunner
        from raymoe.model.weights import load_checkpoint

        model = load_checkpoint(cfg.model, self.model_config, dtype=cfg.dtype, device=cfg.resolved_device())
        num_blocks = -(-self.kv_cache_tokens() // cfg.block_size)
        if cfg.data_parallel_size > 1:
            return DataParallelRunner(model, cfg.data_parallel_size, num_blocks, cfg.block_size)
        return ModelRunner(model, num_blocks, cfg.block_size)

    # --- requests ------------------------------------------------------------------------------
    def _tokenize(self, request_id: str, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"request {request_id!r}: prompt is text but {self.config.model} has no tokenizer.json; pass token ids"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"request {request_id!r}: prompt token ids must be integers")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"request {request_id!r}: prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        return ids

    def _check_fits(self, request_id: str, seq: Sequence) -> None:
        if seq.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt has {seq.num_prompt_tokens} tokens, max_model_len is "
                f"{self.max_model_len} (at least one token must be left to generate)"
            )
        bm = self.block_managers[0]
        need = bm.blocks_for(seq.max_total)
        if need > bm.num_blocks:
            raise ValueError(
                f"request {request_id!r}: prompt ({seq.num_prompt_tokens}) + max_tokens needs {seq.max_total} tokens "
                f"of KV cache, but the cache holds {bm.num_blocks * bm.block_size} (kv_cache_tokens)"
            )

    def _check_stop_strings(self, request_id: str, params: SamplingParams) -> None:
        if params.stop_strings and self.tokenizer is None:
            raise ValueError(
                f"request {request_id!r}: stop strings need a tokenizer, {self.config.model} has no tokenizer.json "
                "(use stop_token_ids)"
            )

    def _choose_rank(self) -> int:
        """DeepSeek's decode balancer: most free KV (net of waiting requests' needs), then fewest requests."""
        if self.dp_size == 1:
            return 0
        return max(
            range(self.dp_size),
            key=lambda r: (
                self.block_managers[r].num_free_blocks - self.schedulers[r].pending_blocks(),
                -self.schedulers[r].num_requests,
                -r,
            ),
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
    ) -> int:
        """Queue a request; returns its prompt length. ValueError on a bad request (duplicate id, empty, too long)."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} already exists")
        params = params or SamplingParams()
        ids = self._tokenize(request_id, prompt)
        seq = Sequence(
            request_id,
            ids,
            params,
            arrival=next(self._arrivals),
            max_model_len=self.max_model_len,
            prefill_only=prefill_only,
        )
        self._check_fits(request_id, seq)
        self._check_stop_strings(request_id, params)
        seq.dp_rank = self._choose_rank()
        self.schedulers[seq.dp_rank].add(seq)
        self.requests[request_id] = seq
        return seq.num_prompt_tokens

    def add_request_with_kv(
        self, request_id: str, handoff: KVHandoff, params: SamplingParams | None = None
    ) -> None:
        """Decode side of disaggregation: the prompt's KV is written into fresh blocks, the first token decodes next."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} already exists")
        params = params or SamplingParams()
        ids = self._tokenize(request_id, handoff.prompt_token_ids)
        mc = self.model_config
        if not 0 <= handoff.first_token_id < mc.vocab_size:
            raise ValueError(
                f"request {request_id!r}: handoff first_token_id must be in [0, {mc.vocab_size})"
            )
        want = (mc.num_hidden_layers, len(ids), mc.kv_cache_dim)
        if tuple(handoff.kv.shape) != want:
            raise ValueError(
                f"request {request_id!r}: handoff kv has shape {tuple(handoff.kv.shape)}, expected {want}"
            )
        seq = Sequence(
            request_id, ids, params, arrival=next(self._arrivals), max_model_len=self.max_model_len
        )
        self._check_fits(request_id, seq)
        self._check_stop_strings(request_id, params)
        seq.num_emitted = 1  # the prefill unit reported the first token
        self.requests[request_id] = seq
        seq.dp_rank = self._choose_rank()
        if self._append_token(seq, handoff.first_token_id, handoff.first_logprob):
            seq.status = SequenceStatus.FINISHED
            self._finished_now.append(seq)
            return
        seq.pending_kv = handoff.kv
        self.schedulers[seq.dp_rank].add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its KV blocks; False if unknown (e.g. already finished)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.schedulers[seq.dp_rank].remove(seq)
        self.block_managers[seq.dp_rank].free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        seq.pending_kv = None
        if seq in self._finished_now:
            self._finished_now.remove(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._finished_now) or any(s.has_work() for s in self.schedulers)

    def export_kv(self, request_id: str) -> KVHandoff:
        """The latent KV of a finished prefill_only request (block-size independent); frees its blocks."""
        seq = self.requests.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id!r} is unknown (never added, aborted or already exported)")
        if not seq.prefill_only or not seq.is_finished:
            raise ValueError(f"request {request_id!r} is not a finished prefill_only request")
        n = seq.num_prompt_tokens
        blocks = seq.block_table[: -(-n // self.block_size)]
        kv = self.executor.read_kv(seq.dp_rank, blocks)  # [layers, nb, block_size, d]
        kv = kv.reshape(kv.shape[0], -1, kv.shape[-1])[:, :n].contiguous()
        self.block_managers[seq.dp_rank].free_sequence(seq)
        del self.requests[request_id]
        first_lp = seq.logprobs[0] if seq.logprobs else None
        return KVHandoff(request_id, seq.token_ids[:n], seq.token_ids[n], first_lp, kv)

    # --- one step ------------------------------------------------------------------------------
    def _build_input(self, batch: ScheduledBatch) -> ModelInput:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        clens: list[int] = []
        sample_idx: list[int] = []
        sampled: list[Sequence] = []
        width = max(len(s.block_table) for s in batch.seqs)
        tables = np.zeros((len(batch.seqs), width), dtype=np.int64)
        t = 0
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            c = seq.num_computed_tokens
            table = seq.block_table
            tables[row, : len(table)] = table
            if n == 1:
                ids.append(seq.token_ids[c])
                positions.append(c)
                slots.append(table[c // bs] * bs + c % bs)
            else:
                ids.extend(seq.token_ids[c : c + n])
                pos = np.arange(c, c + n)
                positions.extend(pos.tolist())
                slots.extend((tables[row, pos // bs] * bs + pos % bs).tolist())
            qlens.append(n)
            clens.append(c + n)
            t += n
            if c + n == len(seq.token_ids):
                sample_idx.append(t - 1)
                sampled.append(seq)
        sampling = None
        if sampled:
            params = [s.params for s in sampled]
            temps = [p.temperature for p in params]
            all_greedy = not any(temps)
            sampling = SamplingMetadata(
                temperatures=torch.tensor(temps, dtype=torch.float32),
                top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32),
                top_ks=torch.tensor([p.top_k for p in params], dtype=torch.long),
                seeds=[p.seed for p in params],
                output_indices=[s.num_output_tokens for s in sampled],
                all_greedy=all_greedy,
                needs_logprobs=any(p.logprobs for p in params),
                any_top_p=not all_greedy and any(p.top_p < 1.0 for p in params),
                any_top_k=not all_greedy and any(p.top_k > 0 for p in params),
            )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            query_lens=qlens,
            context_lens=clens,
            block_tables=torch.from_numpy(tables),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            sample_indices=torch.tensor(sample_idx, dtype=torch.long),
            sampling=sampling,
        )

    def _write_handoff_kv(self, rank: int, seq: Sequence) -> None:
        kv = seq.pending_kv
        assert kv is not None
        seq.pending_kv = None
        n = kv.shape[1]
        nb = -(-n // self.block_size)
        if nb * self.block_size != n:
            kv = torch.cat((kv, kv.new_zeros(kv.shape[0], nb * self.block_size - n, kv.shape[2])), dim=1)
        self.executor.write_kv(
            rank, seq.block_table[:nb], kv.view(kv.shape[0], nb, self.block_size, kv.shape[2])
        )

    def _append_token(self, seq: Sequence, token: int, logprob: float | None) -> bool:
        """Add a generated token; True when it ends the request (finish_reason set)."""
        seq.token_ids.append(token)
        p = seq.params
        if p.logprobs and logprob is not None:
            seq.logprobs.append(logprob)
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:  # type: ignore[operator]
            seq.finish_reason = "stop"
        elif p.stop_strings and self.tokenizer is not None and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= seq.max_total:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Whether the newest token completed a stop string; then output_text is the text before it.

        Only a window of the latest tokens is decoded per step (a match ending at the newest token
        spans at most that many), so the check costs O(stop length), not O(output length).
        """
        assert self.tokenizer is not None
        stops = seq.params.stop_strings
        longest = max(len(x) for x in stops)
        window = self.tokenizer.decode(
            seq.token_ids[max(seq.num_prompt_tokens, len(seq.token_ids) - longest - 8) :]
        )
        if not any(x in window for x in stops):
            return False
        text = self.tokenizer.decode(seq.output_token_ids)
        cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
        seq.output_text = text[:cut]
        seq.stop_string_hit = True
        return True

    def _finish(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            # a stop string's match (and what follows it) is cut off; otherwise the whole output
            text = seq.output_text if seq.stop_string_hit else self.tokenizer.decode(seq.output_token_ids)
        new = seq.output_token_ids[seq.num_emitted :]
        lps = seq.logprobs[len(seq.logprobs) - len(new) :] if seq.params.logprobs and seq.logprobs else None
        seq.num_emitted = seq.num_output_tokens
        return RequestOutput(seq.request_id, new, lps, True, seq.finish_reason, seq.num_prompt_tokens, text)

    def step(self) -> list[RequestOutput]:
        """Schedule every rank, run the unit once, and report each request's new tokens."""
        outputs: list[RequestOutput] = []
        if self._finished_now:
            for seq in self._finished_now:
                self.requests.pop(seq.request_id, None)
                outputs.append(self._finish(seq))
            self._finished_now.clear()
        batches = [s.schedule() for s in self.schedulers]
        self.last_step_ran = any(b is not None for b in batches)
        if not self.last_step_ran:
            return outputs
        inputs: list[ModelInput | None] = []
        for rank, batch in enumerate(batches):
            if batch is None:
                inputs.append(None)
                continue
            for seq in batch.kv_writes:
                self._write_handoff_kv(rank, seq)
            inputs.append(self._build_input(batch))
        results = self.executor.execute(inputs)
        for rank, (batch, result) in enumerate(zip(batches, results, strict=True)):
            if batch is not None:
                outputs.extend(self._postprocess(rank, batch, result))
        return outputs

    def _postprocess(
        self, rank: int, batch: ScheduledBatch, result: SamplerOutput | None
    ) -> list[RequestOutput]:
        bm = self.block_managers[rank]
        sched = self.schedulers[rank]
        outputs: list[RequestOutput] = []
        k = 0
        tokens = result.token_ids if result is not None else []
        lps = result.logprobs if result is not None else None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            bm.mark_computed(seq)
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk that did not reach the end
            if k >= len(tokens):
                raise RuntimeError(f"executor returned {len(tokens)} tokens for rank {rank}, expected more")
            done = self._append_token(seq, tokens[k], lps[k] if lps is not None else None)
            k += 1
            self.generation_tokens += 1
            if done or seq.prefill_only:
                if not done:
                    seq.finish_reason = "prefill"
                sched.remove(seq)
                seq.status = SequenceStatus.FINISHED
                if not seq.prefill_only:
                    bm.free_sequence(seq)
                    del self.requests[seq.request_id]
                outputs.append(self._finish(seq))
            else:
                new = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted :]
                seq.num_emitted += len(new)
                outputs.append(
                    RequestOutput(
                        seq.request_id,
                        new,
                        seq.logprobs[-len(new) :] if seq.params.logprobs and seq.logprobs else None,
                        False,
                        None,
                        seq.num_prompt_tokens,
                    )
                )
        return outputs

    # --- introspection ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bms, scheds = self.block_managers, self.schedulers
        return EngineStats(
            dp_size=self.dp_size,
            running=sum(len(s.running) for s in scheds),
            waiting=sum(len(s.waiting) for s in scheds),
            kv_blocks_total=sum(b.num_blocks for b in bms),
            kv_blocks_used=sum(b.num_used_blocks for b in bms),
            kv_blocks_free=sum(b.num_free_blocks for b in bms),
            block_size=self.block_size,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_hit_tokens=sum(b.prefix_hit_tokens for b in bms),
            num_preemptions=sum(s.num_preemptions for s in scheds),
            running_per_rank=[len(s.running) for s in scheds],
            kv_blocks_used_per_rank=[b.num_used_blocks for b in bms],
        )

    def shutdown(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)
        self.executor.shutdown()
