"""Flax NNX Qwen2/Qwen3 decoder, ModelConfig presets, KV cache, Hugging Face import/export."""

from ctu.models.cache import KVCache
from ctu.models.config import PRESETS, ModelConfig
from ctu.models.hf_io import from_hf, to_hf
from ctu.models.qwen import Qwen

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Qwen", "from_hf", "to_hf"]
