"""Token-budget update and log-prob pass on an 8-device CPU mesh (data=2, fsdp=4) vs one device.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is
imported (tests/test_token_budget.py). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_token_budget import (LENGTHS, PROMPT, RESPONSE, full_batch_reference, grad_capture,  # noqa: E402
                               ragged_batch, tiny_model_config)

from jaxrl.data.token_budget import bucket_shapes  # noqa: E402
from jaxrl.models.sharding import param_shardings  # noqa: E402
from jaxrl.models.transformer import init_params  # noqa: E402
from jaxrl.rl.losses import LossConfig  # noqa: E402
from jaxrl.sharding.mesh import make_mesh  # noqa: E402
from jaxrl.sharding.rules import shardings_like_params  # noqa: E402
from jaxrl.train import step as train_step  # noqa: E402
from jaxrl.train.optimise import row_shards  # noqa: E402
from jaxrl.types import TrainBatch  # noqa: E402


def main() -> None:
    assert jax.device_count() == 8
    model_cfg = tiny_model_config()
    loss_cfg = LossConfig(aggregation="seq-mean-token-mean")
    mesh = make_mesh(data=2, fsdp=4)
    rows_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rep = NamedSharding(mesh, PartitionSpec())
    multiple = row_shards(rows_sh)
    budget = multiple * (PROMPT + RESPONSE)
    batch = ragged_batch(lengths=LENGTHS + LENGTHS[::-1], dead_rows=(5, 6, 9))
    select = batch.loss_mask > 0
    params = init = init_params(model_cfg, jax.random.PRNGKey(0))
    ref_grads, ref_metrics = full_batch_reference(loss_cfg, params, batch, select)
    args = (batch.input_tokens, batch.attention_mask, batch.positions, batch.targets)
    ref_logp, _ = jax.jit(lambda p: train_step.response_logprobs(p, model_cfg, *args, temperature=1.0,
                                                                  chunk_size=RESPONSE))(params)

    p_sh = param_shardings(model_cfg, mesh)
    tx = grad_capture()
    abstract = jax.eval_shape(lambda: train_step.init_train_state(init, tx, seed=0))
    state_sh = train_step.TrainState(step=rep, params=p_sh, rng=rep, skipped_updates=rep,
                                     opt_state=shardings_like_params(abstract.opt_state, p_sh, mesh))
    batch_sh = TrainBatch(**{name: rows_sh for name in ("input_tokens", "attention_mask", "positions", "targets",
                                                        "loss_mask", "advantages", "old_logp", "rollout_entropy",
                                                        "group_ids")})
    update = train_step.make_update_fn(model_cfg, loss_cfg, tx, micro_batch_rows=2, temperature=1.0, chunk_size=4,
                                       micro_batch_tokens=budget, row_multiple=multiple,
                                       in_shardings=(state_sh, batch_sh, rows_sh), out_shardings=(state_sh, rep))
    logprob_fn = train_step.make_logprob_fn(model_cfg, micro_batch_rows=2, temperature=1.0, chunk_size=4,
                                            micro_batch_tokens=budget, row_multiple=multiple,
                                            in_shardings=(p_sh, rows_sh, rows_sh, rows_sh, rows_sh),
                                            out_shardings=(rows_sh, rows_sh))
    with jax.set_mesh(mesh):  # the model's activation constraints read the mesh from context
        state = jax.jit(lambda: train_step.init_train_state(init, tx, seed=0), out_shardings=state_sh)()
        state, metrics = update(state, jax.device_put(batch, batch_sh), jax.device_put(select, rows_sh))
        logp, _ = logprob_fn(jax.device_put(params, p_sh), *jax.device_put(args, rows_sh))
        grads = jax.device_get(state.opt_state)
        metrics = jax.device_get(metrics)
        too_small = ""
        try:
            train_step.make_update_fn(model_cfg, loss_cfg, tx, micro_batch_rows=2, temperature=1.0, chunk_size=4,
                                      micro_batch_tokens=budget - 1, row_multiple=multiple)(
                state, jax.device_put(batch, batch_sh), jax.device_put(select, rows_sh))
        except ValueError as error:
            too_small = str(error)

    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    grad_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)))
    response = np.asarray(batch.attention_mask[:, PROMPT:])
    print(json.dumps({
        "row_multiple": multiple,
        "shapes": bucket_shapes(budget, PROMPT, RESPONSE, row_multiple=multiple, max_rows=len(LENGTHS) * 2),
        "loss_rel_diff": abs(float(metrics["loss"]) - ref_metrics["loss"]) / abs(ref_metrics["loss"]),
        "grad_rel_diff": grad_diff / scale,
        "logp_max_diff": float(np.abs(np.asarray(logp)[response] - np.asarray(ref_logp)[response]).max()),
        "too_small": too_small,
    }))


if __name__ == "__main__":
    main()
