"""The planner's tables: accelerator slices (``parse_hardware``) and known model shapes."""

from __future__ import annotations

import dataclasses
import os
import re

from jaxrl.models.config import ModelConfig

GIB = 2**30


# --------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Hardware:
    """An accelerator slice: ``num_devices`` JAX devices with ``hbm_bytes`` each.

    usable_fraction: share of HBM the run may plan for (XLA's own reservations, fragmentation;
    on GPU launch with XLA_PYTHON_CLIENT_MEM_FRACTION at least this high).
    """

    name: str
    kind: str
    num_devices: int
    hbm_bytes: int
    usable_fraction: float = 0.9

    @property
    def usable_bytes(self) -> int:
        return int(self.hbm_bytes * self.usable_fraction)


# kind -> (HBM GiB per JAX device, whether the slice name counts TensorCores (2 per device))
HARDWARE_KINDS: dict[str, tuple[float, bool]] = {
    "v4": (32, True),
    "v5p": (95, True),
    "v5e": (16, False),
    "v6e": (32, False),
    "h100": (80, False),
    "h200": (141, False),
    "a100": (80, False),
    "a100-40g": (40, False),
    "b200": (180, False),
    "cpu": (16, False),
}


def parse_hardware(spec: str) -> Hardware:
    """Hardware from a name: TPU "v5p-128" / "v5e-256" / "v4-64" / "v6e-8", GPU "h100x8" / "8xh200",
    or a bare kind for one device ("h100", "cpu": one 16 GiB host device).

    TPU v4 / v5p slice names count TensorCores (2 per chip; one JAX device per chip), so
    v5p-128 is 64 devices; v5e / v6e names count chips.
    """
    text = spec.strip().lower()
    if text in HARDWARE_KINDS and not text.startswith("v"):  # a bare GPU / cpu name: one device
        return Hardware(spec, text, 1, int(HARDWARE_KINDS[text][0] * GIB))
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text)
    if match:
        kind, count = match.group(1), int(match.group(2))
        gib, counts_cores = HARDWARE_KINDS[kind]
        devices = count // 2 if counts_cores else count
        return Hardware(spec, kind, max(devices, 1), int(gib * GIB), usable_fraction=0.95)
    match = re.fullmatch(r"([a-z0-9-]+?)(?:x|-)(\d+)", text) or re.fullmatch(r"(\d+)x([a-z0-9-]+)", text)
    if match:
        a, b = match.groups()
        kind, count = (b, int(a)) if a.isdigit() else (a, int(b))
        if kind in HARDWARE_KINDS:
            return Hardware(spec, kind, count, int(HARDWARE_KINDS[kind][0] * GIB))
    known = ", ".join(sorted(HARDWARE_KINDS))
    raise ValueError(f"unknown hardware {spec!r}: use e.g. v5p-128, v5e-256, h100x8 (kinds: {known})")


# --------------------------------------------------------------------------- models
KNOWN_MODELS: dict[str, ModelConfig] = {
    "qwen3-8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960),
    "qwen3-32b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
        num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960),
    "qwen2.5-math-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True,
        tie_word_embeddings=True, rope_theta=1e4, max_position_embeddings=4096),
}


def resolve_model(name_or_path: str) -> ModelConfig:
    """ModelConfig from a known name (case-insensitive, "Qwen3-8B"), an HF dir or config.json.

    A path that does not exist but whose last component is a known name (e.g. the recipe's
    "models/Qwen3-32B") falls back to the built-in shapes.
    """
    if os.path.exists(name_or_path):
        return ModelConfig.from_hf(name_or_path)
    key = os.path.basename(os.path.normpath(name_or_path)).lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise ValueError(
        f"model {name_or_path!r} is neither a file/directory nor a known model "
        f"({', '.join(sorted(KNOWN_MODELS))})"
    )
