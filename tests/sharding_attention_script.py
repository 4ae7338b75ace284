"""Blocked attention under a mesh (heads over tensor, rows over data/fsdp, weights gathered per
layer) vs dense attention on one device: logits and gradients of the tiny model.

Usage: sharding_attention_script.py (XLA_FLAGS must give 8 CPU devices). Prints one JSON line
per mesh with the largest absolute differences and the reference magnitudes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.models.transformer import decoder_hidden, init_params, logits_from_hidden
from jaxrl.sharding.mesh import make_mesh
from jaxrl.sharding.rules import named_sharding, param_shardings
from tests.sharding_common import TINY

ROWS, WIDTH = 8, 40


def loss_and_grads(cfg, params, tokens, mask, weight):
    """(logits [B, S, V], grads) of sum(logits * weight)."""

    def loss(p):
        logits = logits_from_hidden(p, cfg, decoder_hidden(p, cfg, tokens, None, mask))
        return jnp.sum(logits * weight), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def main():
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, TINY.vocab_size, (ROWS, WIDTH)).astype(np.int32)
    mask = np.ones((ROWS, WIDTH), bool)
    for r in range(ROWS):  # left-padded prompts, right-padded responses
        mask[r, : r % 4] = False
        mask[r, WIDTH - (r % 3) * 4:] = False
    weight = (rng.standard_normal((ROWS, WIDTH, TINY.vocab_size)) * mask[..., None]).astype(np.float32)
    params = init_params(TINY, jax.random.key(0), std=0.2)
    ref_logits, ref_grads = jax.jit(loss_and_grads, static_argnums=0)(
        TINY.replace(attention_impl="xla"), params, tokens, mask, weight)
    blocked = TINY.replace(attention_impl="blocked")
    for shape in ((2, 2, 2), (1, 2, 4), (1, 8, 1)):
        mesh = make_mesh(*shape)
        p_sh = param_shardings(blocked, mesh)
        tok_sh = named_sharding("tokens", mesh, (ROWS, WIDTH))
        w_sh = named_sharding("logits", mesh, weight.shape)
        fn = jax.jit(loss_and_grads, static_argnums=0, in_shardings=(p_sh, tok_sh, tok_sh, w_sh))
        with jax.set_mesh(mesh):
            logits, grads = fn(blocked, jax.device_put(params, p_sh), tokens, mask, weight)
        live = mask
        grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads),
                                                                        jax.tree.leaves(ref_grads)))
        print(json.dumps({
            "mesh": shape,
            "logit_diff": float(np.max(np.abs(np.asarray(logits)[live] - np.asarray(ref_logits)[live]))),
            "logit_scale": float(np.max(np.abs(np.asarray(ref_logits)))),
            "grad_diff": grad_diff,
            "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)),
        }), flush=True)


if __name__ == "__main__":
    main()
