"""Offline generation in vLLM's style: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from raymoe.engine.config import EngineConfig
from raymoe.engine.executor import PromptLogprobs, TopLogprobs
from raymoe.engine.llm_engine import LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.executors import build_executor

if TYPE_CHECKING:
    from raymoe.parallel.config import ParallelConfig


@dataclass
class GenerationOutput:
    """One prompt's completion. text is None when the checkpoint has no tokenizer."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[float] | None
    top_logprobs: list[TopLogprobs | None] | None = None  # per token, with params.top_logprobs
    prompt_logprobs: PromptLogprobs | None = None  # per prompt position after the first, with params.prompt_logprobs


class LLM:
    """Runs a batch of prompts to completion with continuous batching on one engine.

    parallel: run on an expert-parallel unit of Ray GPU actors laid out by this `ParallelConfig`
    (or its dict). The LLM owns what its executor holds (a unit's actors and placement groups):
    `shutdown()`, leaving a `with LLM(...) as llm:` block or dropping the last reference to it and
    its engine releases it, so another unit can be built in the same process.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        data_parallel_size: int = 1,
        device: str = "auto",
        parallel: ParallelConfig | dict[str, Any] | None = None,
    ) -> None:
        if model is None:
            from raymoe.model.tiny import default_checkpoint

            model = default_checkpoint()
        config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            kv_cache_tokens=kv_cache_tokens,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            data_parallel_size=data_parallel_size,
        )
        executor = build_executor(config, parallel)
        try:
            self.engine = LLMEngine(config, executor)
        except BaseException:
            executor.shutdown()
            raise
        # released once the engine is collected (it may outlive this facade: `LLM(...).engine`), not
        # at interpreter exit: Ray reclaims a driver's actors and placement groups when it goes
        self._release = weakref.finalize(self.engine, executor.shutdown)
        self._release.atexit = False
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerationOutput]:
        """Completions in prompt order. A prompt is text or a list of token ids; params one for all or one each."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = f"gen-{self._counter}"
                self._counter += 1
                engine.add_request(rid, prompt, p)  # type: ignore[arg-type]
                ids.append(rid)
            tokens: dict[str, list[int]] = {r: [] for r in ids}
            logprobs: dict[str, list[float]] = {r: [] for r in ids}
            tops: dict[str, list[TopLogprobs | None]] = {r: [] for r in ids}
            prompt_lps: dict[str, PromptLogprobs | None] = dict.fromkeys(ids)
            done: dict[str, tuple[str | None, str | None]] = {}
            prompt_ids = {r: list(engine.requests[r].token_ids) for r in ids}
            with tqdm(
                total=len(ids), desc="generating", unit="req", disable=not use_tqdm, leave=False
            ) as bar:
                while len(done) < len(ids):
                    outs = engine.step()
                    if not outs and not engine.last_step_ran:
                        raise RuntimeError(
                            "the engine cannot make progress: KV blocks are held by prefill_only requests"
                        )
                    for out in outs:
                        if out.request_id not in tokens:
                            continue
                        tokens[out.request_id].extend(out.new_token_ids)
                        if out.new_logprobs:
                            logprobs[out.request_id].extend(out.new_logprobs)
                        if out.new_top_logprobs:
                            tops[out.request_id].extend(out.new_top_logprobs)
                        if out.prompt_logprobs is not None:
                            prompt_lps[out.request_id] = out.prompt_logprobs
                        if out.finished:
                            done[out.request_id] = (out.text, out.finish_reason)
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        return [
            GenerationOutput(
                request_id=rid,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=prompt_ids[rid],
                token_ids=tokens[rid],
                text=done[rid][0],
                finish_reason=done[rid][1],
                logprobs=logprobs[rid] if p.logprobs else None,
                top_logprobs=tops[rid] if p.top_logprobs else None,
                prompt_logprobs=prompt_lps[rid],
            )
            for rid, prompt, p in zip(ids, prompts, params, strict=True)
        ]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerationOutput]:
        """Generate replies to one conversation or a list of them, rendered with the checkpoint's chat template."""
        if self.tokenizer is None:
            raise ValueError(f"{self.engine.config.model} has no tokenizer.json: chat needs one")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        """Abort what is running and release the executor's devices (and a unit's actors); idempotent."""
        if self._release.detach() is not None:
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
