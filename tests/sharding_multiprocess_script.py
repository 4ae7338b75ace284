"""Two RL updates with jaxrl.train.step on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 devices.

Usage: sharding_multiprocess_script.py OUT.npz [PORT PROCESS_ID]
Without PORT it runs as one process (XLA_FLAGS must give it 8 CPU devices); with PORT it is
one of two processes with 4 CPU devices each, joined by ``jax.distributed`` through
``jaxrl.sharding.mesh.maybe_initialize_distributed`` on localhost. Process 0 (or the single
process) writes the final parameters, flattened, to OUT.npz.
"""

from __future__ import annotations

import os
import sys

import jax

if len(sys.argv) > 2:
    # Cross-process collectives on CPU go through gloo (already the default in jax 0.10; the
    # flag may be gone in later versions, where gloo stays the default).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    # only the two-process run needs it; it must start jax.distributed before any device is used
    from jaxrl.sharding.mesh import maybe_initialize_distributed

    assert maybe_initialize_distributed({"coordinator_address": f"localhost:{sys.argv[2]}",
                                         "num_processes": 2, "process_id": int(sys.argv[3])})

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharding_common as common  # noqa: E402

from jaxrl.config import base_config  # noqa: E402
from jaxrl.models.transformer import init_params  # noqa: E402
from jaxrl.rl.token_masks import forking_token_mask  # noqa: E402
from jaxrl.sharding.mesh import make_mesh, replicated  # noqa: E402
from jaxrl.sharding.rules import named_sharding, param_shardings, shardings_like_params  # noqa: E402
from jaxrl.train.step import TrainState, init_train_state, make_optimizer, make_update_fn  # noqa: E402
from jaxrl.types import TrainBatch  # noqa: E402


def host_train_batch(seed: int) -> TrainBatch:
    """The same host batch in every process (numpy)."""
    raw = common.make_batch(seed)
    rows, total = raw["tokens"].shape
    rng = np.random.default_rng(seed + 100)
    return TrainBatch(
        input_tokens=raw["tokens"], attention_mask=np.ones((rows, total), bool),
        positions=np.broadcast_to(np.arange(total, dtype=np.int32), (rows, total)).copy(),
        targets=raw["targets"], loss_mask=raw["mask"], advantages=raw["advantages"],
        old_logp=raw["old_logp"],
        rollout_entropy=np.round(rng.exponential(0.5, raw["mask"].shape), 2).astype(np.float32),
        group_ids=np.arange(rows, dtype=np.int32) // 2,
    )


def to_global(host_tree, shardings):
    """Global arrays from identical host copies: each process fills only its own shards."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host_tree, shardings)


def main():
    out_path = sys.argv[1]
    assert jax.device_count() == 8, jax.device_count()
    mesh = make_mesh(2, 2, 2)
    cfg = base_config()
    cfg.rl.lr = 1e-2
    cfg.optim.weight_decay = 0.1
    cfg.optim.eps = 1e-6
    tx = make_optimizer(cfg)

    p_sh = param_shardings(common.TINY, mesh)
    rep = replicated(mesh)

    def init_state():
        return init_train_state(init_params(common.TINY, jax.random.key(0), std=0.1), tx, seed=0)

    abstract = jax.eval_shape(init_state)
    state_sh = TrainState(step=rep, params=p_sh, opt_state=shardings_like_params(abstract.opt_state, p_sh, mesh),
                          rng=rep, skipped_updates=rep)
    state = jax.jit(init_state, out_shardings=state_sh)()

    batch_sh = TrainBatch(**{
        name: named_sharding("rows" if name in ("advantages", "group_ids") else "tokens", mesh,
                             getattr(host_train_batch(0), name).shape)
        for name in ("input_tokens", "attention_mask", "positions", "targets", "loss_mask",
                     "advantages", "old_logp", "rollout_entropy", "group_ids")})
    token_sh = batch_sh.loss_mask
    update = make_update_fn(common.TINY, common.LOSS_CFG, tx, micro_batch_rows=4, temperature=1.0,
                            chunk_size=4, in_shardings=(state_sh, batch_sh, token_sh),
                            out_shardings=(state_sh, rep))
    select_fn = jax.jit(lambda entropy, valid: forking_token_mask(entropy, valid, rho=0.2)[0],
                        in_shardings=(token_sh, token_sh), out_shardings=token_sh)

    losses, grad_norms = [], []
    with jax.set_mesh(mesh):  # the model's activation constraints read the mesh from context
        for step in range(2):
            batch = to_global(host_train_batch(step), batch_sh)
            select = select_fn(batch.rollout_entropy, batch.loss_mask)
            state, metrics = update(state, batch, select)
            losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
            grad_norms.append(float(np.asarray(metrics["grad_norm"].addressable_data(0))))

    gathered = jax.jit(lambda p: p, out_shardings=rep)(state.params)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    q_shard = state.params["blocks"]["q_proj"].addressable_shards[0].data.shape
    print(f"process {jax.process_index()}/{jax.process_count()} local_devices={jax.local_device_count()} "
          f"losses={losses} q_proj_shard={q_shard}", flush=True)
    if jax.process_index() == 0:
        np.savez(out_path, losses=np.asarray(losses), grad_norms=np.asarray(grad_norms),
                 q_proj_shard=np.asarray(q_shard), **flat)


if __name__ == "__main__":
    main()
