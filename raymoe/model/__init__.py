"""DeepSeek-V3 in plain PyTorch, Hugging Face checkpoint loading, and the tiny checkpoint writer."""

from raymoe.model.attention import AttentionMetadata
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MoE, Transformer
from raymoe.model.tiny import default_checkpoint, make_tiny
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.weights import load_checkpoint

__all__ = [
    "AttentionMetadata",
    "ModelConfig",
    "MoE",
    "Tokenizer",
    "Transformer",
    "default_checkpoint",
    "load_checkpoint",
    "make_tiny",
]
