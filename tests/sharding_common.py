"""Tiny model, batch, loss and greedy decoder shared by the sharding test scripts.

Imported by the subprocess scripts (which set XLA_FLAGS before importing jax), so this module
must not create arrays at import time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (decoder_hidden, decoder_hidden_with_cache, init_kv_cache,
                                      logits_from_hidden, unembedding)
from jaxrl.rl.logprobs import token_logprobs_and_entropy
from jaxrl.rl.losses import LossConfig, policy_loss

TINY = ModelConfig(
    model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, rope_theta=10000.0,
)
PROMPT_LEN = 8
RESPONSE_LEN = 8
BATCH = 8
LOSS_CFG = LossConfig(token_mask="top", entropy_rho=0.2, clip_eps_low=0.2, clip_eps_high=0.28)
MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))


def make_batch(seed: int = 0, batch: int = BATCH) -> dict[str, np.ndarray]:
    """Host batch: tokens [B, P+T], targets/old_logp/mask [B, T], advantages [B]."""
    rng = np.random.default_rng(seed)
    total = PROMPT_LEN + RESPONSE_LEN
    tokens = rng.integers(1, TINY.vocab_size, size=(batch, total)).astype(np.int32)
    lengths = rng.integers(2, RESPONSE_LEN + 1, size=batch)
    mask = (np.arange(RESPONSE_LEN)[None, :] < lengths[:, None]).astype(np.float32)
    return {
        "tokens": tokens,
        "targets": tokens[:, PROMPT_LEN:],
        "old_logp": (-3.0 + 0.3 * rng.standard_normal((batch, RESPONSE_LEN))).astype(np.float32),
        "mask": mask,
        "advantages": rng.standard_normal(batch).astype(np.float32),
    }


BATCH_AXES = {"tokens": "tokens", "targets": "tokens", "old_logp": "tokens", "mask": "tokens",
              "advantages": "rows"}


def loss_fn(params, batch):
    """(policy loss, metrics) of the DAPO objective with top-20% forking-token masking."""
    hidden = decoder_hidden(params, TINY, batch["tokens"])
    response_hidden = hidden[:, PROMPT_LEN - 1:-1]
    logp, entropy = token_logprobs_and_entropy(
        response_hidden, unembedding(params, TINY), batch["targets"], chunk_size=4,
        entropy_grad=False,
    )
    return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], LOSS_CFG,
                       entropy=entropy)


def forward_logits(params, tokens):
    """float32 logits [B, T, V]."""
    return logits_from_hidden(params, TINY, decoder_hidden(params, TINY, tokens))


def greedy_decode(params, prompts, cache, *, steps: int):
    """Greedy continuation int32 [B, steps] of full-length prompts [B, P] using the KV cache."""
    batch, prompt_len = prompts.shape
    slots = cache.max_length
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompts.shape)
    valid = jnp.broadcast_to(jnp.arange(slots) < prompt_len, (batch, slots))
    hidden, cache = decoder_hidden_with_cache(params, TINY, prompts, positions, cache,
                                              jnp.int32(0), valid)
    first = jnp.argmax(logits_from_hidden(params, TINY, hidden[:, -1]), axis=-1).astype(jnp.int32)

    def step(carry, i):
        token, cache = carry
        slot = prompt_len + i
        valid = jnp.broadcast_to(jnp.arange(slots) <= slot, (batch, slots))
        pos = jnp.full((batch, 1), slot, jnp.int32)
        hidden, cache = decoder_hidden_with_cache(params, TINY, token[:, None], pos, cache, slot, valid)
        nxt = jnp.argmax(logits_from_hidden(params, TINY, hidden[:, 0]), axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(steps - 1, dtype=jnp.int32))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def new_cache(batch: int, steps: int):
    """Zero KV cache for ``batch`` prompts of PROMPT_LEN plus ``steps`` generated tokens."""
    return init_kv_cache(TINY, batch, PROMPT_LEN + steps)


def optimizer():
    """AdamW used by the multi-device training checks."""
    return optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1)


def train_step(params, opt_state, batch, tx):
    """One optimizer update → (params, opt_state, loss)."""
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
