"""The policy model: one decoder for Llama 3.x / Qwen2 / Qwen3, HF safetensors I/O."""

from jaxrl.models.config import ModelConfig
from jaxrl.models.hf_io import from_pretrained, load_tokenizer, save_pretrained
from jaxrl.models.transformer import Transformer, forward, model_params, with_params

__all__ = [
    "ModelConfig", "Transformer", "forward", "from_pretrained", "load_tokenizer",
    "model_params", "save_pretrained", "with_params",
]
