"""DeepSeek-V3 in plain PyTorch, Hugging Face checkpoint loading, and the tiny checkpoint writer."""

from raymoe.model.attention import AttentionMetadata
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MoE, Transformer

__all__ = ["AttentionMetadata", "ModelConfig", "MoE", "Transformer"]
