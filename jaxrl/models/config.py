"""ModelConfig: the static description of one decoder-only transformer.

Covers HF ``model_type`` llama (Llama 3.x, incl. ``rope_scaling`` type llama3), qwen2 (q/k/v
bias) and qwen3 (q/k RMSNorm, explicit head_dim). ``from_hf`` reads a config.json dict in
either the classic layout (``rope_theta`` + ``rope_scaling``) or the transformers>=5 layout
(``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "tpu_flash")  # kernels/flash_attention.py


def _id_tuple(value: Any, where: str) -> tuple[int, ...]:
    """An HF token-id field (None, an int or a list of ints) as a tuple of ints."""
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where} must be a non-negative int or a list of them, got {value!r}")
    return tuple(values)


def merge_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    """The ids of all groups in order of first appearance, each once."""
    return tuple(dict.fromkeys(i for group in groups for i in group))


def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
    """``eos_token_id`` of ``model_dir/generation_config.json`` as a tuple (() when absent)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    with open(path) as handle:
        try:
            generation = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error.msg})") from None
    return _id_tuple(generation.get("eos_token_id"), f"{path} eos_token_id")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder; hashable, so it can be a static jit argument.

    param_dtype: storage dtype of the weights; dtype: compute dtype of activations and
    matmuls. Norms, softmax and logits are always computed in float32.
    rope_scaling: None or a tuple of sorted (key, value) pairs (hashable form of the HF dict).
    remat: "none" | "full" (recompute each layer) | "dots" (save matmul outputs).
    attention_impl: training/prefill attention, one of ``ATTENTION_IMPLS`` (see
    ``jaxrl.kernels.flash_attention``): "xla" is the dense path, "auto" picks per backend.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary embedding)")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r} must be one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
            if kind not in ("default", "llama3", None):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported (supported: default, llama3)"
                )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos ids as a tuple (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += d
        if self.mlp_bias:
            per_layer += 2 * f + d
        if self.qk_norm:
            per_layer += 2 * hd
        total = self.num_layers * per_layer + self.vocab_size * d + d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        return total

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Build from an HF config.json (a dict, the file, or its directory).

        Read from a file, the stop ids are config.json's ``eos_token_id`` followed by those of
        a ``generation_config.json`` beside it (instruct models list end-of-turn ids there).
        """
        generation_eos: tuple[int, ...] = ()
        if not isinstance(hf, Mapping):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"HF config not found: {path}")
            with open(path) as f:
                hf = json.load(f)
            generation_eos = generation_eos_ids(os.path.dirname(path))
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise KeyError(f"config.json is missing the key {key!r}")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        scaling = hf.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else tuple(
                sorted((k, v) for k, v in scaling.items() if k != "rope_theta")
            )
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported")
        eos = merge_ids(_id_tuple(hf.get("eos_token_id"), "config.json eos_token_id"), generation_eos)
        eos = None if not eos else eos[0] if len(eos) == 1 and not isinstance(hf.get("eos_token_id"), list) else eos
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """config.json dict that transformers loads (``base``: original keys to keep)."""
        hf = dict(base or {})
        for stale in ("rope_parameters", "rope_scaling", "rope_theta"):
            hf.pop(stale, None)
        hf.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling_dict,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            torch_dtype=self.param_dtype,
        )
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            hf[key] = list(value) if isinstance(value, tuple) else value
        return hf
