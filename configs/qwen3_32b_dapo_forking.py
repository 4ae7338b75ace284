"""DAPO + forking tokens on Qwen3-32B: the 8B recipe, FSDP over every chip.

Sized for a TPU v5p-128 slice (64 chips: fsdp 64 × tensor 1; `jaxrl plan --hardware v5p-128`).

    jaxrl train --config configs/qwen3_32b_dapo_forking.py
"""

from configs.qwen3_8b_dapo_forking import dapo_forking
from jaxrl.config import base_config

HARDWARE = "v5p-128"  # what get_config() is sized for (tests/test_configs_fit.py plans it)


def get_config():
    cfg = dapo_forking(base_config(), "models/Qwen3-32B", "qwen3_32b_dapo_forking")
    # With the Pallas TPU flash kernel (model.attention_impl=auto) there is no S^2 term, so
    # tensor parallelism is not needed: 128-row micro-batches (2 per chip) train in ~53 GiB.
    cfg.rl.micro_batch_rows = 128
    cfg.mesh.fsdp = -1
    cfg.mesh.tensor = 1
    # KV cache for 20k-token responses: the planner allows 960 rows at once; 768 = 12 per chip
    # (48 groups of 16) keeps ~15 GiB of headroom.
    cfg.sampling.max_rows_per_call = 768
    return cfg
