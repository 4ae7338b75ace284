"""Subprocess body for test_sharding_loop: 2 RL steps of the loop, metrics printed as JSON.

Usage: python -m tests.sharding_loop_script MODEL_DIR ROOT NAME MAX_ROWS_PER_CALL [PORT PROCESS_ID]
(XLA_FLAGS decides the device count before jax is imported; ROLLOUT_STALENESS sets
``rl.rollout_staleness``, default 0.) With PORT, the process is one
of two joined by ``jax.distributed`` on localhost (gloo CPU collectives). Process 0 (or the
single process) writes the final parameters to ROOT/NAME.npz; every process appends the
prompts its rewarder scored to ROOT/NAME.scored.<process index>, then evaluates the final
parameters on the held-out set and prints the report with the metrics.
"""

import json
import os
import sys
import zlib

import jax

if __name__ == "__main__" and len(sys.argv) > 5:
    try:  # gloo is jax 0.10's default for CPU collectives; the flag may be gone later
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    from jaxrl.sharding.mesh import maybe_initialize_distributed

    assert maybe_initialize_distributed({"coordinator_address": f"localhost:{sys.argv[5]}", "num_processes": 2,
                                         "process_id": int(sys.argv[6])})

import numpy as np  # noqa: E402

from jaxrl import wiring  # noqa: E402
from jaxrl.eval.evaluate import evaluate_sets  # noqa: E402
from jaxrl.sharding.transfer import host_array  # noqa: E402
from jaxrl.train import loop  # noqa: E402
from tests.test_train_loop import comparable, tiny_config  # noqa: E402


def record_prompt(prompt, completion, example):
    """Appends the prompt it was asked about to this process's log; scores 0 for about half of
    the prompts (by a hash of the prompt: their groups have no spread and dynamic sampling drops
    them) and the completion's length mod 3 for the others."""
    with open(f"{os.environ['SCORED_LOG']}.{jax.process_index()}", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(prompt) + "\n")
    return 0.0 if zlib.crc32(prompt.encode()) % 2 else float(len(completion) % 3)


def main(model_dir: str, root: str, name: str, max_rows_per_call: int) -> None:
    os.environ["SCORED_LOG"] = os.path.join(root, f"{name}.scored")
    cfg = tiny_config(model_dir, root, "dapo_forking", name=name, train__num_steps=2)
    cfg.rl.prompts_per_step = 4  # two prompts per process when there are two
    cfg.rl.mini_batch_prompts = 2  # 8 rows: divisible over 8 devices
    cfg.sampling.max_rows_per_call = max_rows_per_call
    # Adam's update g / (sqrt(v) + eps) moves at most lr·|Δg|/eps when the gradient changes by
    # Δg; with eps = 1e-4 a float32 reduction-order difference (|Δg| ~ 1e-8) moves a parameter
    # by ~1e-7, not by the ~lr of a sign flip under the default eps = 1e-8.
    cfg.optim.eps = 1e-4
    # The total reward is record_prompt's: groups of about half the prompts have no spread, so
    # dynamic sampling drops them and draws a second round (a global keep/refill decision).
    cfg.rewards.custom = ("tests.sharding_loop_script:record_prompt=1.0",)
    cfg.rewards.overlong_penalty = False
    cfg.rl.rollout_staleness = int(os.environ.get("ROLLOUT_STALENESS", "0"))
    result = loop.train(cfg)
    os.environ["SCORED_LOG"] += ".eval"  # the held-out eval's rewarder calls go to another log
    with jax.set_mesh(mesh := wiring.mesh_of(cfg)):  # held-out eval of the final params, on every process
        policy = wiring.load_policy(cfg, mesh)
        reports = evaluate_sets(result.state.params, policy.model_cfg, policy.tokenizer, cfg,
                                key=jax.random.PRNGKey(cfg.run.seed), mesh=mesh)
    params = {jax.tree_util.keystr(path): host_array(leaf)
              for path, leaf in jax.tree_util.tree_flatten_with_path(result.state.params)[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(root, f"{name}.npz"), **params)
    print("RESULT " + json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                                  "metrics": [comparable(m) for m in result.metrics], "eval": reports}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
