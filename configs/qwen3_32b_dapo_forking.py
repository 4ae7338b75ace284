"""DAPO + forking tokens on Qwen3-32B: the 8B recipe with tensor parallelism (4) × FSDP.

Sized for a TPU v5p-128 slice (64 chips: fsdp 16 × tensor 4; `jaxrl plan --hardware v5p-128`).

    jaxrl train --config configs/qwen3_32b_dapo_forking.py
"""

from configs.qwen3_8b_dapo_forking import dapo_forking
from jaxrl.config import base_config

HARDWARE = "v5p-128"  # what get_config() is sized for (tests/test_configs_fit.py plans it)


def get_config():
    cfg = dapo_forking(base_config(), "models/Qwen3-32B", "qwen3_32b_dapo_forking")
    cfg.rl.micro_batch_rows = 16
    cfg.mesh.fsdp = -1
    cfg.mesh.tensor = 4
    # KV cache for 20k-token responses: decode at most this many rows at once (`jaxrl plan`).
    cfg.sampling.max_rows_per_call = 512
    return cfg
