"""Tiny transformers DeepseekV3ForCausalLM references, shared by the model and engine parity tests.

Two configs: "grouped" has DeepSeek-V3's structure (group-limited routing, q LoRA, YaRN,
interleaved rope); "flat" has one group, no q LoRA, plain half-split rope and unnormalised top-k
weights. Weights are drawn large enough that routing and every attention path matter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "grouped": dict(
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        q_lora_rank=48,
        rope_interleave=True,
        rope_parameters=YARN,
        max_position_embeddings=2560,
        norm_topk_prob=True,
    ),
    "flat": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=512,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    ),
}
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
)


def save_random_reference(config: dict[str, Any], path: Path) -> Any:
    """A seeded random float32 DeepseekV3ForCausalLM with `config`, written by its save_pretrained."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    hf.save_pretrained(path)
    return hf
