"""The step API: requests in, incremental token outputs out, over one deployment unit.

The engine core: it admits requests (tokenize, validate, pick the DP rank), owns one
(Scheduler, BlockManager) pair per data-parallel attention rank, moves handed-off KV in and out,
and drives one step: schedule every rank, build each rank's input (`input_builder`), run them on
its `Executor` (chosen one level up, `raymoe.executors`), and turn the samples into request
outputs (`output_processor`). Everything per token on the host is list work proportional to the
number of sequences; the tensors of a step are built in one go.

Request isolation: what belongs to one request fails that request alone. Its parameters are
checked again at admission (a ValueError, nothing unrepresentable reaches a tensor); a row the
sampler could not sample (`SamplerOutput.errors`) and a failure in its own output processing end
it with finish_reason "error" and `RequestOutput.error`, its blocks freed, while the batch carries
on. Only what `Executor.execute` raises (the device, a collective, a dead worker) fails the step.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.config import EngineConfig, resolve_max_model_len
from raymoe.engine.executor import Executor, ModelInput, PromptLogprobs, SamplerOutput, TopLogprobs
from raymoe.engine.input_builder import build_model_input
from raymoe.engine.model_runner import build_runner
from raymoe.engine.output_processor import OutputProcessor
from raymoe.engine.outputs import EngineStats, KVHandoff, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.scheduler import ScheduledBatch, Scheduler
from raymoe.engine.sequence import Sequence, SequenceStatus
from raymoe.engine.structured import StructuredOutputManager
from raymoe.model.config import ModelConfig
from raymoe.model.tokenizer import Tokenizer


class LLMEngine:
    """One deployment unit's engine. Not thread-safe: drive add/step/abort from one thread (or event loop).

    executor: what runs the model (`raymoe.executors.build_executor`: the local runner or an
    expert-parallel unit); None builds the single-process runner from the config.
    """

    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        path = Path(config.model)
        self.model_config = ModelConfig.from_checkpoint(path)
        self.tokenizer = Tokenizer.from_checkpoint(path)
        mc = self.model_config
        self.max_model_len = resolve_max_model_len(config, mc)
        if executor is None:
            executor = build_runner(config, mc)
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
        self.output = OutputProcessor(self.tokenizer, frozenset(eos))
        self.structured = StructuredOutputManager(self.tokenizer, mc.vocab_size, sorted(eos))
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._finished_now: list[Sequence] = []  # handed-off requests already complete at arrival
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.last_step_ran = False  # whether the latest step() ran a batch (progress check)

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
        vocab = self.model_config.vocab_size
        if seq.params.logit_bias and max(seq.params.logit_bias) >= vocab:
            raise ValueError(f"request {request_id!r}: logit_bias token ids must be in [0, {vocab})")
        if seq.params.allowed_token_ids and max(seq.params.allowed_token_ids) >= vocab:
            raise ValueError(f"request {request_id!r}: allowed_token_ids must be in [0, {vocab})")
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

    def _bad_word_ids(self, request_id: str, params: SamplingParams) -> list[list[int]] | None:
        """vLLM's tokenization of bad_words: each word as is, and with a leading space when that is a
        different word token of the same length (so it is banned mid-text as well as at the start)."""
        if not params.bad_words:
            return None
        if self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: bad_words need a tokenizer, {self.config.model} has no tokenizer.json")
        out: list[list[int]] = []
        for word in params.bad_words:
            bare = self.tokenizer.encode(word.lstrip(), add_bos=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_bos=False)
            out.append(bare)
            if spaced[0] != bare[0] and len(spaced) == len(bare):
                out.append(spaced)
        return out

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
        params.validate()  # unpickled params (a Ray call) were never constructed here
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
        seq.bad_word_ids = self._bad_word_ids(request_id, params)
        if params.structured_outputs is not None:  # compiled here (cached per spec): a bad grammar is a ValueError
            self.structured.add(request_id, params.structured_outputs)
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
        params.validate()
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
        seq.bad_word_ids = self._bad_word_ids(request_id, params)
        seq.num_emitted = 1  # the prefill unit reported the first token
        seq.prompt_logprobs = None  # and the prompt's logprobs: a recompute here (preemption) needs none
        spec = params.structured_outputs
        # the grammar continues here: a fresh matcher replays the token the prefill unit sampled
        complete = spec is not None and self.structured.add(request_id, spec, [handoff.first_token_id])
        self.requests[request_id] = seq
        seq.dp_rank = self._choose_rank()
        if self.output.append_token(seq, handoff.first_token_id, handoff.first_logprob, handoff.first_top_logprobs) or complete:
            seq.finish_reason = seq.finish_reason or "stop"
            self.structured.release(request_id)
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
        self.structured.release(request_id)
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
        first_top = seq.top_logprobs[0] if seq.top_logprobs else None
        return KVHandoff(request_id, seq.token_ids[:n], seq.token_ids[n], first_lp, kv, first_top)

    # --- one step ------------------------------------------------------------------------------
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

    def step(self) -> list[RequestOutput]:
        """Schedule every rank, run the unit once, and report each request's new tokens."""
        outputs: list[RequestOutput] = []
        if self._finished_now:
            for seq in self._finished_now:
                self.requests.pop(seq.request_id, None)
                try:
                    outputs.append(self.output.finish(seq))
                except Exception as exc:  # its own text could not be made: it alone fails
                    outputs.append(self._failed(seq, f"output processing failed: {exc}"))
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
            inputs.append(
                build_model_input(
                    batch, self.block_size, self.model_config.vocab_size, self.output.eos_token_ids,
                    self.structured if self.structured.active else None,
                )
            )
        results = self.executor.execute(inputs)
        for rank, (batch, result) in enumerate(zip(batches, results, strict=True)):
            if batch is not None:
                if result is not None and result.prompt_logprobs is not None:
                    self._collect_prompt_logprobs(batch, inputs[rank], result.prompt_logprobs)
                outputs.extend(self._postprocess(rank, batch, result))
        return outputs

    def _collect_prompt_logprobs(
        self, batch: ScheduledBatch, inp: ModelInput | None, got: list[PromptLogprobs]
    ) -> None:
        """This step's prompt positions into their sequences (a long prompt's chunks add up over steps)."""
        assert inp is not None and inp.prompt_logprobs is not None
        for row, part in zip(inp.prompt_logprobs.batch_rows, got, strict=True):
            acc = batch.seqs[row].prompt_logprobs
            assert acc is not None
            acc.extend(part)

    def _postprocess(
        self, rank: int, batch: ScheduledBatch, result: SamplerOutput | None
    ) -> list[RequestOutput]:
        bm = self.block_managers[rank]
        outputs: list[RequestOutput] = []
        k = 0
        tokens = result.token_ids if result is not None else []
        lps = result.logprobs if result is not None else None
        tops = result.top if result is not None else None
        errors = result.errors if result is not None and result.errors else {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            bm.mark_computed(seq)
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk that did not reach the end
            if k >= len(tokens):
                raise RuntimeError(f"executor returned {len(tokens)} tokens for rank {rank}, expected more")
            row, k = k, k + 1
            if row in errors:
                outputs.append(self._fail(rank, seq, errors[row]))
                continue
            try:
                lp = lps[row] if lps is not None else None
                outputs.append(self._append(rank, seq, tokens[row], lp, tops[row] if tops is not None else None))
            except Exception as exc:  # its stop check or its text: this request's own failure
                outputs.append(self._fail(rank, seq, f"output processing failed: {exc}"))
        return outputs

    def _append(
        self, rank: int, seq: Sequence, token: int, logprob: float | None, top: TopLogprobs | None
    ) -> RequestOutput:
        """One sampled token into its request: the request's news, finished when the token ends it."""
        proc = self.output
        structured = self.structured
        complete = structured.active and structured.has(seq.request_id) and structured.accept(seq.request_id, token)
        done = proc.append_token(seq, token, logprob, top)
        self.generation_tokens += 1
        if complete and not done:  # the grammar reached its end state
            seq.finish_reason = "stop"
            done = True
        if structured.active and (done or seq.prefill_only):  # a prefill's grammar continues on decode
            structured.release(seq.request_id)
        if not done and not seq.prefill_only:
            return proc.new_tokens(seq)
        if not done:
            seq.finish_reason = "prefill"
        self.schedulers[rank].remove(seq)
        seq.status = SequenceStatus.FINISHED
        if not seq.prefill_only:
            self.block_managers[rank].free_sequence(seq)
            del self.requests[seq.request_id]
        return proc.finish(seq)

    def _fail(self, rank: int, seq: Sequence, error: str) -> RequestOutput:
        """End one request with an error (its blocks freed, even a prefill_only one's); the batch goes on."""
        self.structured.release(seq.request_id)
        self.schedulers[rank].remove(seq)
        self.block_managers[rank].free_sequence(seq)
        self.requests.pop(seq.request_id, None)
        return self._failed(seq, error)

    def _failed(self, seq: Sequence, error: str) -> RequestOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        return RequestOutput(seq.request_id, [], None, True, "error", seq.num_prompt_tokens, None, error)

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
