"""What an engine serves and how big its batches and caches are, and the two sizes derived from it.

`resolve_max_model_len` and `kv_cache_tokens` are the only places these defaults are computed:
the engine, the expert-parallel workers (after they load their weights) and the serving ingress
all call them, so a unit and the requests admitted to it agree.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from raymoe.model.config import ModelConfig

DEFAULT_CPU_KV_TOKENS = 32768
DEFAULT_MAX_MODEL_LEN = 8192


class EngineConfig(BaseModel):
    """The engine's settings (validated at construction); the executor it runs on is chosen one level up."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

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
        description="attention DP ranks in this process (one model, a cache each): the reference for a unit",
    )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """Prompt + generated tokens a request may reach: configured, else min(the model's positions, 8192)."""
    return config.max_model_len or min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


def kv_cache_tokens(
    config: EngineConfig, model_config: ModelConfig, device: torch.device, caches: int = 1
) -> int:
    """Latent-KV tokens of one cache on `device`: configured, else a share of free GPU memory, else a CPU default.

    On CUDA call it after the weights are loaded: the `caches` caches on the device (in-process DP
    ranks) share what `gpu_memory_utilization` leaves free, so they are sized by what is really
    left, on every GPU of a unit alike.
    """
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    if device.type == "cuda":
        itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
        per_token = model_config.num_hidden_layers * model_config.kv_cache_dim * itemsize
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
        return max(config.block_size, int(budget // (per_token * caches)))
    return max(DEFAULT_CPU_KV_TOKENS, resolve_max_model_len(config, model_config))
