"""model.attention_impl inside the decoder: blocked == dense (xla) for the training forward and
gradient, for the cached prefill, and greedy decoding gives identical tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (decoder_hidden, decoder_hidden_with_cache, init_kv_cache,
                                      init_params, logits_from_hidden, positions_from_mask)
from jaxrl.sampling import engine
from jaxrl.sampling.engine import SamplingConfig

CFG = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, eos_token_id=2, pad_token_id=0)


def _batch(seed=0, rows=3, width=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (rows, width)).astype(np.int32)
    mask = np.ones((rows, width), bool)
    mask[0, :5] = False   # left-padded prompt
    mask[1, -6:] = False  # right-padded response
    mask[2, :2] = False
    mask[2, -3:] = False
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_unknown_impl_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="attention_impl"):
        CFG.replace(attention_impl="flash")


def test_blocked_forward_and_gradient_equal_dense():
    tokens, mask = _batch()
    positions = positions_from_mask(mask)
    params = init_params(CFG, jax.random.key(0), std=0.2)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(3, 24, 64)).astype(np.float32)) * mask[..., None]

    def loss(p, cfg):
        logits = logits_from_hidden(p, cfg, decoder_hidden(p, cfg, tokens, positions, mask))
        return jnp.sum(logits * weight), logits

    results = {}
    for impl in ("xla", "blocked"):
        cfg = CFG.replace(attention_impl=impl)
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, cfg)
        results[impl] = (np.asarray(logits), grads)
    live = np.asarray(mask)
    # float32, 2 layers, 24 positions: the two paths differ only in summation order (~1e-6)
    np.testing.assert_allclose(results["blocked"][0][live], results["xla"][0][live], atol=2e-5, rtol=1e-5)
    flat_b = jax.tree_util.tree_leaves_with_path(results["blocked"][1])
    flat_x = jax.tree_util.tree_leaves(results["xla"][1])
    for (path, gb), gx in zip(flat_b, flat_x):
        scale = float(np.max(np.abs(np.asarray(gx)))) + 1e-6
        np.testing.assert_allclose(np.asarray(gb), np.asarray(gx), atol=2e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_blocked_cached_prefill_equals_full_forward():
    tokens, mask = _batch(2, rows=3, width=20)
    mask = mask.at[:, -6:].set(True)  # prefill 14 slots then decode 6
    positions = positions_from_mask(mask)
    cfg = CFG.replace(attention_impl="blocked")
    params = init_params(cfg, jax.random.key(4), std=0.2)
    full = logits_from_hidden(params, CFG.replace(attention_impl="xla"),
                              decoder_hidden(params, CFG.replace(attention_impl="xla"), tokens, positions, mask))
    cache = init_kv_cache(cfg, 3, 32)
    valid = np.zeros((3, 32), bool)
    valid[:, :14] = np.asarray(mask)[:, :14]
    hidden, cache = decoder_hidden_with_cache(params, cfg, tokens[:, :14], positions[:, :14], cache,
                                              jnp.int32(0), jnp.asarray(valid))
    got = [logits_from_hidden(params, cfg, hidden)]
    for t in range(14, 20):
        valid[:, t] = True
        hidden, cache = decoder_hidden_with_cache(params, cfg, tokens[:, t:t + 1], positions[:, t:t + 1],
                                                  cache, jnp.int32(t), jnp.asarray(valid))
        got.append(logits_from_hidden(params, cfg, hidden))
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    live = np.asarray(mask)
    np.testing.assert_allclose(got[live], np.asarray(full)[live], atol=2e-5)


def test_greedy_tokens_identical_with_blocked_prefill():
    sampling = SamplingConfig(max_prompt_tokens=16, max_new_tokens=12, min_prompt_bucket=16,
                              min_new_tokens_bucket=16, temperature=0.0, stop_token_ids=(2,), impl="reference")
    prompts = jnp.asarray(np.random.default_rng(3).integers(3, 64, (3, 16)), jnp.int32)
    lengths = jnp.array([16, 9, 4], jnp.int32)
    prompts = jnp.where(jnp.arange(16)[None] >= 16 - lengths[:, None], prompts, 0)
    params = init_params(CFG, jax.random.key(5), std=0.3)
    out = {impl: engine.generate_from_params(params, CFG.replace(attention_impl=impl), prompts, lengths, 2,
                                             sampling, jax.random.key(0))
           for impl in ("xla", "blocked")}
    np.testing.assert_array_equal(np.asarray(out["blocked"].tokens), np.asarray(out["xla"].tokens))
    np.testing.assert_array_equal(np.asarray(out["blocked"].lengths), np.asarray(out["xla"].lengths))
