"""raymoe: serve DeepSeek-V3-style mixture-of-experts models on Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.llm import LLM


def __getattr__(name: str) -> Any:
    # Lazy so that `import raymoe.eplb` does not pull in torch models or Ray.
    if name == "LLM":
        from raymoe.llm import LLM

        return LLM
    if name == "SamplingParams":
        from raymoe.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
