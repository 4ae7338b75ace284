"""Blocked (flash) attention vs the dense jnp attention vs a float64 NumPy oracle: values and
gradients, causal, left-padded, GQA, segment ids, prefill offsets; the TPU Pallas kernel in
interpret mode; the implementation selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.kernels.flash_attention import (
    blocked_attention,
    resolve_impl,
    self_attention,
)
from jaxrl.models.transformer import attention


def oracle(q, k, v, mask):
    """float64 softmax attention, one (row, head, query) at a time; mask [B, T, S]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, hd = q.shape
    group = h // k.shape[2]
    out = np.zeros(q.shape)
    for r in range(b):
        for head in range(h):
            for i in range(t):
                keys = np.flatnonzero(mask[r, i])
                if keys.size == 0:
                    continue
                s = k[r, keys, head // group] @ q[r, i, head] / np.sqrt(hd)
                w = np.exp(s - s.max())
                out[r, i, head] = w @ v[r, keys, head // group] / w.sum()
    return out


def case(seed, b=2, s=40, h=4, kv=2, hd=8, left_pad=(0, 7), right_pad=(0, 5)):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, s, kv, hd)).astype(np.float32)
    v = rng.normal(size=(b, s, kv, hd)).astype(np.float32)
    valid = np.ones((b, s), bool)
    for r in range(b):
        valid[r, : left_pad[r]] = False
        if right_pad[r]:
            valid[r, s - right_pad[r]:] = False
    return q, k, v, valid


def dense_mask(valid):
    s = valid.shape[1]
    return np.tril(np.ones((s, s), bool))[None] & valid[:, None, :]


def live_queries(valid):
    """Queries with at least one key (left padding has none): [B, S] bool."""
    return dense_mask(valid).any(-1)


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blocked_values_match_oracle_and_dense(block):
    q, k, v, valid = case(0)  # GQA 4 heads / 2 KV heads, left + right padding, S % 16 != 0
    mask = dense_mask(valid)
    out = np.asarray(blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid),
                                       block_size=block))
    dense = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    ref = oracle(q, k, v, mask)
    live = live_queries(valid)
    # float32 scores of 8-dim dots and a 40-term softmax: errors ~1e-6; 2e-5 leaves margin
    np.testing.assert_allclose(out[live], ref[live], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(out[live], dense[live], atol=2e-5, rtol=2e-5)
    assert np.isfinite(out).all()


def test_blocked_gradients_match_dense():
    q, k, v, valid = case(1, left_pad=(3, 11))
    mask = jnp.asarray(dense_mask(valid))
    weight = jnp.asarray(np.random.default_rng(5).normal(size=q.shape).astype(np.float32))
    weight = weight * jnp.asarray(live_queries(valid))[:, :, None, None]  # loss reads live rows only

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * weight)

    dense_g = jax.grad(loss(lambda a, b_, c: attention(a, b_, c, mask)), argnums=(0, 1, 2))(q, k, v)
    blocked_g = jax.grad(loss(lambda a, b_, c: blocked_attention(a, b_, c, jnp.asarray(valid), block_size=16)),
                         argnums=(0, 1, 2))(q, k, v)
    for name, d, bl in zip("qkv", dense_g, blocked_g):
        scale = float(np.max(np.abs(np.asarray(d))))
        # sums over <= 40 keys x 2 heads of O(1) terms in float32: 1e-5 relative to the largest
        np.testing.assert_allclose(np.asarray(bl), np.asarray(d), atol=1e-5 * scale + 1e-6, err_msg=name)


def test_blocked_gradient_matches_finite_differences_float64():
    """Independent of the dense path: central differences of the oracle's float64 output."""
    q, k, v, valid = case(2, b=1, s=12, h=2, kv=1, hd=4, left_pad=(2,), right_pad=(0,))
    mask = dense_mask(valid)
    live = live_queries(valid)
    w = np.random.default_rng(3).normal(size=q.shape) * live[:, :, None, None]
    g = jax.grad(lambda k_: jnp.sum(blocked_attention(jnp.asarray(q), k_, jnp.asarray(v), jnp.asarray(valid),
                                                      block_size=4) * w))(jnp.asarray(k))
    eps = 1e-5
    num = np.zeros(k.shape)
    for idx in np.ndindex(*k.shape):
        kp, km = k.astype(np.float64).copy(), k.astype(np.float64).copy()
        kp[idx] += eps
        km[idx] -= eps
        num[idx] = (np.sum(oracle(q, kp, v, mask) * w) - np.sum(oracle(q, km, v, mask) * w)) / (2 * eps)
    # float32 analytic gradient vs float64 differences (O(eps^2) = 1e-10): float32 rounding
    np.testing.assert_allclose(np.asarray(g), num, atol=2e-5)


def test_blocked_segments_and_prefill_offset():
    """Packed rows (segment ids) and queries that are the last T slots of a longer cache."""
    q, k, v, valid = case(4, b=2, s=24, left_pad=(0, 0), right_pad=(0, 4))
    seg = np.repeat(np.array([[0] * 10 + [1] * 14]), 2, 0)
    mask = dense_mask(valid) & (seg[:, :, None] == seg[:, None, :])
    out = blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid),
                            q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), block_size=8)
    np.testing.assert_allclose(np.asarray(out), oracle(q, k, v, mask), atol=2e-5)
    # prefill: 6 new queries at slots 10..15 of a 24-slot cache, slots > 15 empty
    t0, t = 10, 6
    cache_valid = valid & (np.arange(24) < t0 + t)[None]
    q_new = q[:, t0:t0 + t]
    pmask = cache_valid[:, None, :] & (np.arange(24)[None, None, :] <= (t0 + np.arange(t))[None, :, None])
    out = blocked_attention(jnp.asarray(q_new), jnp.asarray(k), jnp.asarray(v), jnp.asarray(cache_valid),
                            q_pos=jnp.arange(t) + t0, block_size=8)
    np.testing.assert_allclose(np.asarray(out), oracle(q_new, k, v, pmask), atol=2e-5)


def test_blocked_bfloat16_close_to_float64():
    q, k, v, valid = case(6, s=64)
    mask = dense_mask(valid)
    out = blocked_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(valid), block_size=16)
    live = live_queries(valid)
    assert out.dtype == jnp.bfloat16
    # bf16 inputs/probabilities (8 mantissa bits): 2^-8 relative, outputs are O(1)
    np.testing.assert_allclose(np.asarray(out, np.float32)[live], oracle(q, k, v, mask)[live], atol=4e-2)


@pytest.mark.slow
def test_tpu_flash_kernel_interpret_mode_matches_oracle():
    from jax.experimental.pallas import tpu as pltpu  # only this test needs the TPU interpreter

    q, k, v, valid = case(7, b=1, s=128, h=2, kv=1, hd=128, left_pad=(17,), right_pad=(9,))
    with pltpu.force_tpu_interpret_mode():
        out = self_attention("tpu_flash", *(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(valid))
    live = live_queries(valid) & valid  # padding queries see only padding there (segment 0)
    mask = dense_mask(valid)
    np.testing.assert_allclose(np.asarray(out)[live], oracle(q, k, v, mask)[live], atol=1e-4)


def test_resolve_impl():
    assert resolve_impl("auto", 4096, jnp.bfloat16, "gpu") == "cudnn"
    assert resolve_impl("auto", 4096, jnp.float32, "gpu") == "blocked"
    assert resolve_impl("auto", 4096, jnp.bfloat16, "tpu") == "tpu_flash"
    assert resolve_impl("auto", 300, jnp.bfloat16, "tpu") == "xla"
    assert resolve_impl("auto", 512, jnp.float32, "cpu") == "xla"
    assert resolve_impl("auto", 8192, jnp.float32, "cpu") == "blocked"
    assert resolve_impl("xla", 8192, jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="model.attention_impl"):
        resolve_impl("flash", 16, jnp.float32)
