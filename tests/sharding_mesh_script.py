"""Run forward / loss / grads / greedy sampling / forking mask under several meshes (8 CPU devices).

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is
imported. Prints one JSON line: per mesh the max abs difference to the single-device results,
the per-device shard shapes of some parameters, and the forking-mask thresholds.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharding_common as common  # noqa: E402

from jaxrl.models.hf_io import from_pretrained, save_pretrained  # noqa: E402
from jaxrl.models.transformer import Transformer, init_params, model_params  # noqa: E402
from jaxrl.rl.token_masks import forking_token_mask  # noqa: E402
from jaxrl.sampling.continuous import ContinuousBackend  # noqa: E402
from jaxrl.sampling.engine import SamplingConfig, generate_from_params  # noqa: E402
from jaxrl.sharding.mesh import make_mesh, replicated, reshard  # noqa: E402
from jaxrl.sharding.rules import (kv_cache_shardings, named_sharding, param_shardings,  # noqa: E402
                                  rules_without_fsdp)

STEPS = 6
SHARD_SHAPES_OF = {"embed": ("embed",), "q_proj": ("blocks", "q_proj"),
                   "k_proj": ("blocks", "k_proj"), "down_proj": ("blocks", "down_proj")}


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _max_diff(a, b):
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b))
    return max(leaves)


def run_on(mesh, params_host, batch_host, entropy_host, valid_host):
    """All computations with params and data placed by the sharding rules on ``mesh``."""
    with jax.set_mesh(mesh):  # the model's activation constraints read the mesh from context
        return _run_on(mesh, params_host, batch_host, entropy_host, valid_host)


def _run_on(mesh, params_host, batch_host, entropy_host, valid_host):
    p_sh = param_shardings(common.TINY, mesh)
    params = jax.device_put(params_host, p_sh)
    b_sh = {k: named_sharding(v, mesh, batch_host[k].shape) for k, v in common.BATCH_AXES.items()}
    batch = jax.device_put(batch_host, b_sh)
    tok_sh = b_sh["tokens"]
    logits_shape = batch_host["tokens"].shape + (common.TINY.vocab_size,)

    def logits_loss_grads(params, batch):
        logits = common.forward_logits(params, batch["tokens"])
        return logits, jax.value_and_grad(common.loss_fn, has_aux=True)(params, batch)

    rep = replicated(mesh)
    logits, ((loss, metrics), grads) = jax.jit(
        logits_loss_grads, in_shardings=(p_sh, b_sh),
        out_shardings=(named_sharding("logits", mesh, logits_shape), ((rep, rep), p_sh)),
    )(params, batch)

    prompts_host = batch_host["tokens"][:, :common.PROMPT_LEN]
    prompt_sh = named_sharding("tokens", mesh, prompts_host.shape)
    kv_sh = kv_cache_shardings(common.TINY, mesh, prompts_host.shape[0], common.PROMPT_LEN + STEPS)

    def sample(params, prompts):
        # The cache is created inside the jitted sampler, laid out by the same rules.
        cache = jax.lax.with_sharding_constraint(common.new_cache(prompts.shape[0], STEPS), kv_sh)
        return common.greedy_decode(params, prompts, cache, steps=STEPS), cache.k

    greedy, cache_k = jax.jit(sample, in_shardings=(p_sh, prompt_sh),
                              out_shardings=(prompt_sh, kv_sh.k))(params, jax.device_put(prompts_host, prompt_sh))

    # The sampling engine itself, greedy (T = 0), on the sharded params: its jits follow the
    # params' and prompts' shardings.
    prompts = jax.device_put(prompts_host, prompt_sh)
    lengths = jax.device_put(np.full(prompts_host.shape[0], common.PROMPT_LEN, np.int32),
                             named_sharding("rows", mesh, (prompts_host.shape[0],)))
    engine_cfg = SamplingConfig(max_prompt_tokens=common.PROMPT_LEN, max_new_tokens=STEPS,
                                temperature=0.0, stop_token_ids=(), min_prompt_bucket=8,
                                min_new_tokens_bucket=8, impl="reference")
    engine_tokens = generate_from_params(params, common.TINY, prompts, lengths, 1, engine_cfg,
                                         jax.random.key(0)).tokens
    # The continuous backend (paged KV) on the same sharded params: it runs replicated over
    # the batch axes (no data-parallel slots yet) and must give the same greedy tokens.
    continuous = ContinuousBackend(common.TINY, engine_cfg, mesh, slots=4, page_size=8)
    continuous_tokens = continuous.wait(continuous.generate(
        params, prompts_host, np.full(prompts_host.shape[0], common.PROMPT_LEN, np.int32), 1, jax.random.key(0))).tokens

    ent_sh = named_sharding("tokens", mesh, entropy_host.shape)
    mask_fn = jax.jit(functools.partial(forking_token_mask, rho=0.2, mode="top"),
                      in_shardings=(ent_sh, ent_sh), out_shardings=(ent_sh, replicated(mesh)))
    select, threshold = mask_fn(jax.device_put(entropy_host, ent_sh), jax.device_put(valid_host, ent_sh))

    return {
        "logits": np.asarray(logits), "loss": float(loss),
        "loss_threshold": float(metrics["entropy_threshold"]),
        "grads": jax.device_get(grads), "greedy": np.asarray(greedy),
        "engine_greedy": np.asarray(engine_tokens),
        "continuous_greedy": np.asarray(continuous_tokens),
        "mask_threshold_bits": int(np.float32(threshold).view(np.uint32)),
        "mask": np.asarray(select),
        "shard_shapes": {name: list(_leaf(params, path).addressable_shards[0].data.shape)
                         for name, path in SHARD_SHAPES_OF.items()},
        "cache_shard_shape": list(cache_k.addressable_shards[0].data.shape),
        "num_shards": len(_leaf(params, ("blocks", "q_proj")).addressable_shards),
    }


def check_load_and_reshard(params_host, out):
    """Load an HF checkpoint straight into shards; reshard train -> sampling mesh."""
    train_mesh = make_mesh(1, 8, 1)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(Transformer(common.TINY, params=jax.device_put(params_host)), tmp)
        model, _ = from_pretrained(tmp, mesh=train_mesh)
    loaded_params = model_params(model)
    q = loaded_params["blocks"]["q_proj"]
    out["load"] = dict(
        max_diff=_max_diff(jax.device_get(loaded_params), params_host),
        q_proj_shard_shape=list(q.addressable_shards[0].data.shape),
        q_proj_spec=str(q.sharding.spec),
    )

    same = reshard(loaded_params, param_shardings(common.TINY, train_mesh))
    same_q = same["blocks"]["q_proj"]
    out["reshard_same_mesh_no_copy"] = all(
        a.data.unsafe_buffer_pointer() == b.data.unsafe_buffer_pointer()
        for a, b in zip(q.addressable_shards, same_q.addressable_shards))

    sample_mesh = make_mesh(2, 1, 4)
    sample_sh = param_shardings(common.TINY, sample_mesh, rules_without_fsdp())
    moved = reshard(loaded_params, sample_sh)
    out["reshard_other_mesh"] = {
        "max_diff": _max_diff(jax.device_get(moved), params_host),
        "q_proj_shard_shape": list(moved["blocks"]["q_proj"].addressable_shards[0].data.shape),
        "q_proj_spec": str(moved["blocks"]["q_proj"].sharding.spec),
    }


def main():
    assert jax.device_count() == 8, jax.device_count()
    params_host = jax.device_get(init_params(common.TINY, jax.random.key(0), std=0.1))
    batch_host = common.make_batch(0)
    rng = np.random.default_rng(1)
    entropy_host = np.round(rng.exponential(0.5, size=(8, 16)), 2).astype(np.float32)  # ties
    valid_host = np.arange(16)[None, :] < rng.integers(1, 17, size=8)[:, None]

    reference = run_on(make_mesh(1, 1, 1, devices=jax.devices()[:1]), params_host, batch_host,
                       entropy_host, valid_host)
    # the engine's greedy tokens continue the prompts exactly like the test's own decoder
    engine_matches_decoder = bool(np.array_equal(reference["engine_greedy"], reference["greedy"]))
    out = {"engine_matches_decoder": engine_matches_decoder,
           "reference": {"loss": reference["loss"], "loss_threshold": reference["loss_threshold"],
                         "mask_threshold_bits": reference["mask_threshold_bits"],
                         "shard_shapes": reference["shard_shapes"]},
           "meshes": {}}
    for shape in common.MESHES:
        got = run_on(make_mesh(*shape), params_host, batch_host, entropy_host, valid_host)
        out["meshes"][str(shape)] = {
            "logits_diff": _max_diff(got["logits"], reference["logits"]),
            "loss_diff": abs(got["loss"] - reference["loss"]),
            "grads_diff": _max_diff(got["grads"], reference["grads"]),
            "grads_max": _max_diff(reference["grads"], jax.tree_util.tree_map(np.zeros_like, reference["grads"])),
            "loss_threshold_diff": abs(got["loss_threshold"] - reference["loss_threshold"]),
            "greedy_equal": bool(np.array_equal(got["greedy"], reference["greedy"])),
            "engine_greedy_equal": bool(np.array_equal(got["engine_greedy"], reference["engine_greedy"])),
            "continuous_greedy_equal": bool(np.array_equal(got["continuous_greedy"], reference["engine_greedy"])),
            "mask_threshold_bits": got["mask_threshold_bits"],
            "mask_equal": bool(np.array_equal(got["mask"], reference["mask"])),
            "shard_shapes": got["shard_shapes"],
            "cache_shard_shape": got["cache_shard_shape"],
            "num_shards": got["num_shards"],
        }
    check_load_and_reshard(params_host, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
