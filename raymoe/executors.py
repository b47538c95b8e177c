"""Chooses what an engine runs on, one level above both: the engine knows only the `Executor` protocol.

vLLM v1's split: the engine core schedules, an executor owns the devices. Without a
`ParallelConfig` that is the single-process runner of `raymoe.engine.model_runner` (several
attention DP ranks over one model when `data_parallel_size > 1`); with one it is an
expert-parallel unit of Ray GPU actors (`raymoe.parallel.executor`, imported only then, since it
pulls in Ray and torch.distributed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raymoe.engine.config import EngineConfig
from raymoe.engine.executor import Executor
from raymoe.model.config import ModelConfig

if TYPE_CHECKING:
    from raymoe.parallel.config import ParallelConfig


def build_executor(config: EngineConfig, parallel: ParallelConfig | Mapping[str, Any] | None = None) -> Executor:
    """The executor for `LLMEngine(config, executor)`: the local runner, or a unit laid out by `parallel`.

    A unit sizes its KV caches on its workers (`raymoe.engine.config.kv_cache_tokens`, after the
    weights are loaded); release it with `shutdown()` (the `LLM` facade does that for its own).
    """
    if parallel is None:
        from raymoe.engine.model_runner import build_runner

        return build_runner(config, ModelConfig.from_checkpoint(config.model))
    from raymoe.parallel.config import ParallelConfig
    from raymoe.parallel.executor import ExpertParallelExecutor

    if not isinstance(parallel, ParallelConfig):
        parallel = ParallelConfig.model_validate(parallel)
    return ExpertParallelExecutor(config, parallel)
