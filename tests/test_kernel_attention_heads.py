"""Head-major decode attention over row ranges: Pallas split-K kernel (interpret mode) and the
jnp reference vs a float64 numpy oracle; block skipping, splits, layer index, empty rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.kernels.attention import _decode_attention_heads_pallas, decode_attention_heads


def oracle(q, k, v, bounds, scale):
    """float64, one (row, head) at a time: q [B,K,G,hd], k/v [L,B,K,S,hd], bounds [B,3]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, kv_heads, group, head_dim = q.shape
    out = np.zeros(q.shape)
    for b in range(batch):
        start, end, layer = (int(x) for x in bounds[b])
        if end <= start:
            continue
        for h in range(kv_heads):
            keys, values = k[layer, b, h, start:end], v[layer, b, h, start:end]
            for g in range(group):
                scores = keys @ q[b, h, g] * scale
                weights = np.exp(scores - scores.max())
                out[b, h, g] = weights @ values / weights.sum()
    return out


def case(seed, batch=4, kv_heads=2, group=3, seq_len=150, head_dim=16, layers=3, layer=1):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, kv_heads, group, head_dim)).astype(np.float32)
    k = rng.normal(size=(layers, batch, kv_heads, seq_len, head_dim)).astype(np.float32)
    v = rng.normal(size=(layers, batch, kv_heads, seq_len, head_dim)).astype(np.float32)
    start = rng.integers(0, seq_len // 2, batch)
    end = np.minimum(seq_len, start + rng.integers(1, seq_len, batch))
    start[-1], end[-1] = 7, 7  # empty range -> zeros
    end[0] = seq_len  # a full row
    bounds = np.stack([start, end, np.full(batch, layer)], axis=1).astype(np.int32)
    return q, k, v, bounds


@pytest.mark.parametrize("block_s, num_splits", [(16, 1), (16, 3), (64, 2), (32, None)])
def test_kernel_and_reference_match_float64(block_s, num_splits):
    q, k, v, bounds = case(0)
    scale = 16**-0.5
    expected = oracle(q, k, v, bounds, scale)
    kernel = decode_attention_heads(q, k, v, bounds, impl="pallas", block_s=block_s, num_splits=num_splits)
    reference = decode_attention_heads(q, k, v, bounds, impl="reference")
    # float32 dot products over hd = 16 and <= 150 slots: ~1e-6 relative; 1e-5 leaves margin.
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(reference), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kernel)[-1], 0.0)
    np.testing.assert_array_equal(np.asarray(reference)[-1], 0.0)


def test_reference_window_reads_only_the_prefix():
    """Slots at or past the window never influence the output (NaN there would show)."""
    q, k, v, bounds = case(1)
    bounds[:, 1] = np.minimum(bounds[:, 1], 96)
    bounds[:, 0] = np.minimum(bounds[:, 0], bounds[:, 1])
    k[:, :, :, 96:] = np.nan
    v[:, :, :, 96:] = np.nan
    out = decode_attention_heads(q, k, v, bounds, impl="reference", window=96)
    np.testing.assert_allclose(np.asarray(out), oracle(q, k, v, bounds, 16**-0.5), rtol=1e-5, atol=1e-5)


def test_kernel_skips_blocks_outside_the_range():
    """NaN outside [start, end) in whole blocks: a kernel that read them would return NaN."""
    q, k, v, bounds = case(2, seq_len=128)
    bounds[:, 0], bounds[:, 1] = 32, 80  # blocks of 16: [0, 32) and [80, 128) are never loaded
    k[:, :, :, :32] = np.nan
    v[:, :, :, 80:] = np.nan
    out = decode_attention_heads(q, k, v, bounds, impl="pallas", block_s=16, num_splits=3)
    np.testing.assert_allclose(np.asarray(out), oracle(q, k, v, bounds, 16**-0.5), rtol=1e-5, atol=1e-5)


def test_bf16_cache():
    q, k, v, bounds = case(3)
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    exact = oracle(*(np.asarray(a.astype(jnp.float32)) for a in (q16, k16, v16)), bounds, 16**-0.5)
    for impl in ("pallas", "reference"):
        out = decode_attention_heads(q16, k16, v16, bounds, impl=impl, block_s=16, num_splits=2)
        assert out.dtype == jnp.bfloat16
        # bf16 rounding of the probabilities (reference) and of the output: ~2^-8 relative.
        np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2e-2, atol=2e-2)


def test_split_k_kernel_lowers_to_triton():
    """Cross-lowers for CUDA (no GPU needed); compiling the Triton IR needs the device."""
    q = jnp.zeros((2, 4, 7, 128), jnp.bfloat16)  # 28 heads over 4 kv heads
    cache = jnp.zeros((3, 2, 4, 300, 128), jnp.bfloat16)
    kernel = functools.partial(_decode_attention_heads_pallas, scale=0.1, block_s=64, num_splits=2,
                               interpret=False)
    lowered = jax.jit(kernel).trace(q, cache, cache, jnp.zeros((2, 3), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert "decode_attention_split_k" in lowered.as_text()
