"""Decode attention: Pallas kernel (interpret mode) vs jnp reference vs float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.kernels.attention import decode_attention, decode_attention_reference


def attention_numpy(q, k, v, valid, scale):
    """float64 oracle, one head at a time: q [B,H,hd], k/v [B,S,KVH,hd], valid [B,S]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    out = np.zeros((batch, num_heads, head_dim))
    for b in range(batch):
        slots = np.flatnonzero(valid[b])
        if slots.size == 0:
            continue
        for h in range(num_heads):
            scores = k[b, slots, h // group] @ q[b, h] * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ v[b, slots, h // group] / weights.sum()
    return out


def random_case(seed, batch, num_heads, num_kv_heads, seq_len, head_dim, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, num_heads, head_dim)).astype(dtype)
    k = rng.normal(size=(batch, seq_len, num_kv_heads, head_dim)).astype(dtype)
    v = rng.normal(size=(batch, seq_len, num_kv_heads, head_dim)).astype(dtype)
    lengths = rng.integers(1, seq_len + 1, size=batch)
    valid = np.arange(seq_len)[None, :] < lengths[:, None]
    valid[0, : seq_len // 3] = False  # a left-padded prompt
    valid[-1] = False  # nothing to attend to -> zeros
    if batch > 2:
        valid[1] = rng.random(seq_len) < 0.5  # scattered holes
    return q, k, v, valid


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, seq_len, block_s",
    [(8, 2, 75, 16), (6, 6, 40, 32), (7, 1, 33, 16)],
    ids=["gqa4-S75", "mha-S40", "mqa7-S33"],
)
def test_kernel_matches_reference_and_float64(num_heads, num_kv_heads, seq_len, block_s):
    q, k, v, valid = random_case(0, 4, num_heads, num_kv_heads, seq_len, 16)
    scale = 16**-0.5
    kernel = jax.block_until_ready(
        decode_attention(q, k, v, valid, impl="pallas", block_s=block_s)
    )
    reference = decode_attention_reference(q, k, v, valid)
    expected = attention_numpy(q, k, v, valid, scale)
    np.testing.assert_allclose(kernel, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kernel)[-1], 0.0)  # no valid slot


def test_bf16_cache_and_custom_scale():
    q, k, v, valid = random_case(1, 3, 4, 2, 50, 32, dtype=np.float32)
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = jax.block_until_ready(
        decode_attention(q16, k16, v16, valid, scale=0.3, impl="pallas", block_s=16)
    )
    assert out.dtype == jnp.bfloat16
    exact_inputs = [np.asarray(a.astype(jnp.float32)) for a in (q16, k16, v16)]
    expected = attention_numpy(*exact_inputs, valid, 0.3)
    # Only the bf16 rounding of the output remains (f32 accumulation inside).
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2)
    reference = decode_attention_reference(q16, k16, v16, valid, scale=0.3)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(reference, np.float32), rtol=1e-2, atol=1e-2
    )


def test_auto_uses_reference_on_cpu_and_rejects_bad_shapes():
    q, k, v, valid = random_case(2, 2, 4, 2, 20, 16)
    np.testing.assert_array_equal(
        decode_attention(q, k, v, valid), decode_attention_reference(q, k, v, valid)
    )
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v, valid, impl="reference")
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q[..., :12], k[..., :12], v[..., :12], valid, impl="pallas")


def test_kernel_lowers_to_triton():
    """Cross-lowers for CUDA (no GPU needed): Pallas' Triton lowering checks block shapes and
    primitives; compiling the Triton IR needs the real device."""
    import functools

    from jaxrl.kernels.attention import _decode_attention_pallas

    q = jnp.zeros((2, 28, 128), jnp.bfloat16)  # Qwen2.5-7B-like: 28 heads over 4 kv heads
    cache = jnp.zeros((2, 300, 4, 128), jnp.bfloat16)
    kernel = functools.partial(_decode_attention_pallas, scale=0.1, block_s=64, interpret=False)
    lowered = jax.jit(kernel).trace(q, cache, cache, jnp.ones((2, 300), bool)).lower(
        lowering_platforms=("cuda",)
    )
    assert "decode_attention" in lowered.as_text()
