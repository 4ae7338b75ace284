"""DAPO + forking tokens on Qwen3-32B: the 8B recipe with tensor parallelism (4) × FSDP.

Sized for a TPU v5p-256 / 16×8 H100 class slice.

    jaxrl train --config configs/qwen3_32b_dapo_forking.py
"""

import importlib.util
import os

from jaxrl.config import base_config

_spec = importlib.util.spec_from_file_location(
    "_qwen3_8b_dapo_forking", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_8b_dapo_forking.py")
)
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)


def get_config():
    cfg = _recipe.dapo_forking(base_config(), "models/Qwen3-32B", "qwen3_32b_dapo_forking")
    cfg.rl.micro_batch_rows = 16
    cfg.mesh.fsdp = -1
    cfg.mesh.tensor = 4
    # KV cache for 20k-token responses: decode at most this many rows at once (`jaxrl plan`).
    cfg.sampling.max_rows_per_call = 512
    return cfg
