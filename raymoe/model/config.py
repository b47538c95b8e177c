"""DeepSeek-V3 model configuration, read from a Hugging Face `config.json`.

Only the fields the model uses. Structural keys are required (a checkpoint without them cannot
be built); the rest default to DeepSeek-V3's published values, as `transformers` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Keys a config.json must carry: without them the module shapes are unknown.
REQUIRED_KEYS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
)


class RopeScaling(BaseModel):
    """YaRN parameters (`rope_scaling` in the published config, `rope_parameters` in transformers v5)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = "yarn"
    factor: float | None = None
    original_max_position_embeddings: int | None = None  # None: max_position_embeddings, as transformers does
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class ModelConfig(BaseModel):
    """The DeepseekV3Config fields raymoe's model reads."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int = 1
    n_routed_experts: int
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    quantization_config: dict[str, Any] | None = None
    num_nextn_predict_layers: int = 0
    attention_bias: bool = False
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"

    @model_validator(mode="before")
    @classmethod
    def _normalise_rope(cls, data: Any) -> Any:
        """Accept both the published `rope_scaling` and transformers v5's `rope_parameters`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        params = data.pop("rope_parameters", None)
        if params and not data.get("rope_scaling"):
            params = dict(params)
            if "rope_theta" in params and "rope_theta" not in data:
                data["rope_theta"] = params["rope_theta"]
            kind = params.get("rope_type", params.get("type", "default"))
            data["rope_scaling"] = None if kind in (None, "default") else {**params, "type": kind}
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            kind = scaling.get("type", scaling.get("rope_type", "yarn"))
            if kind == "default":
                data["rope_scaling"] = None
            elif kind != "yarn":
                raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (only 'yarn')")
            else:
                data["rope_scaling"] = {**scaling, "type": "yarn"}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.attention_bias:
            raise ValueError("config.json: attention_bias=true is not supported (DeepSeek-V3 has no attention biases)")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"config.json: scoring_func {self.scoring_func!r} is not supported (only 'sigmoid')")
        if self.topk_method != "noaux_tc":
            raise ValueError(f"config.json: topk_method {self.topk_method!r} is not supported (only 'noaux_tc')")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"config.json: n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"config.json: topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        return self

    # derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per-token per-layer latent cache width: normalised c_kv then roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 as in DeepSeek's inference code."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(self._yarn_factor(), rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def _yarn_factor(self) -> float:
        rs = self.rope_scaling
        assert rs is not None
        if rs.factor is None:
            return self.max_position_embeddings / self.original_max_position_embeddings
        return rs.factor

    @property
    def original_max_position_embeddings(self) -> int:
        rs = self.rope_scaling
        if rs is None or rs.original_max_position_embeddings is None:
            return self.max_position_embeddings
        return rs.original_max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
        return cls.model_validate(data)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{path}: no config.json")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))
