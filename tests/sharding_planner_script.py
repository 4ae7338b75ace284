"""Compile jaxrl.train.step's update on an 8-device CPU mesh and print XLA's memory analysis.

Usage: sharding_planner_script.py CASES_JSON  (XLA_FLAGS must give 8 CPU devices). Each case:
{"model": ModelConfig kwargs, "mesh": [data, fsdp, tensor], "rows": mini-batch rows,
 "micro": micro-batch rows, "prompt": P, "response": T, "chunk": log-prob chunk}. Prints one
JSON line per case with the per-device argument / output / alias / temp bytes.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from jaxrl.config import base_config
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.rl.losses import LossConfig
from jaxrl.sharding.mesh import make_mesh, replicated
from jaxrl.sharding.rules import named_sharding, param_shardings, shardings_like_params
from jaxrl.train.step import TrainState, init_train_state, make_optimizer, make_update_fn
from jaxrl.types import TrainBatch


def compile_update(case: dict):
    """The compiled update of ``case`` on the 8-device mesh (nothing is run)."""
    model = ModelConfig(**case["model"])
    mesh = make_mesh(*case["mesh"])
    tx = make_optimizer(base_config())
    p_sh, rep = param_shardings(model, mesh), replicated(mesh)

    def init_state():
        return init_train_state(init_params(model, jax.random.key(0)), tx, seed=0)

    abstract = jax.eval_shape(init_state)
    state_sh = TrainState(step=rep, params=p_sh, rng=rep, skipped_updates=rep,
                          opt_state=shardings_like_params(abstract.opt_state, p_sh, mesh))
    rows, prompt, response = case["rows"], case["prompt"], case["response"]
    fields = {
        "input_tokens": ((rows, prompt + response), jnp.int32),
        "attention_mask": ((rows, prompt + response), jnp.bool_),
        "positions": ((rows, prompt + response), jnp.int32),
        "targets": ((rows, response), jnp.int32), "loss_mask": ((rows, response), jnp.float32),
        "advantages": ((rows,), jnp.float32), "old_logp": ((rows, response), jnp.float32),
        "rollout_entropy": ((rows, response), jnp.float32), "group_ids": ((rows,), jnp.int32),
    }
    batch_sh = TrainBatch(**{k: named_sharding("rows" if len(shape) == 1 else "tokens", mesh, shape)
                             for k, (shape, _) in fields.items()})
    batch = TrainBatch(**{k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in fields.items()})
    update = make_update_fn(model, LossConfig(), tx, micro_batch_rows=case["micro"], temperature=1.0,
                            chunk_size=case["chunk"],
                            in_shardings=(state_sh, batch_sh, batch_sh.loss_mask),
                            out_shardings=(state_sh, rep))
    with jax.set_mesh(mesh):  # the model's activation constraints read the mesh from context
        lowered = update.lower(abstract, batch, jax.ShapeDtypeStruct((rows, response), jnp.bool_))
    return lowered.compile()


def memory_of_update(case: dict) -> dict:
    """Per-device bytes XLA assigns to one compiled update (nothing is run)."""
    analysis = compile_update(case).memory_analysis()
    return {name: int(getattr(analysis, name)) for name in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}


def main():
    assert jax.device_count() == 8, jax.device_count()
    for case in json.loads(sys.argv[1]):
        print(json.dumps({"case": case, "memory": memory_of_update(case)}), flush=True)


if __name__ == "__main__":
    main()
