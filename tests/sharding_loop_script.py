"""Subprocess body for test_sharding_loop: 2 RL steps of the loop, metrics printed as JSON.

Usage: python -m tests.sharding_loop_script MODEL_DIR ROOT NAME MAX_ROWS_PER_CALL
(XLA_FLAGS decides the device count before jax is imported.)
"""

import json
import sys

import jax

from jaxrl.train import loop
from tests.test_train_loop import comparable, tiny_config


def main(model_dir: str, root: str, name: str, max_rows_per_call: int) -> None:
    cfg = tiny_config(model_dir, root, "dapo_forking", name=name, train__num_steps=2)
    cfg.rl.mini_batch_prompts = 2  # 8 rows: divisible over 8 devices
    cfg.sampling.max_rows_per_call = max_rows_per_call
    result = loop.train(cfg)
    print("RESULT " + json.dumps({"devices": jax.device_count(),
                                  "metrics": [comparable(m) for m in result.metrics]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
