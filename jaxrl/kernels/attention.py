"""Decode attention: one new query token per row against the KV cache (flash-decoding style).

Layout matches the model's cache: q [B, H, hd], k/v [B, S, KVH, hd], H = G * KVH (GQA; query
head h reads kv head h // G). ``valid`` [B, S] marks cache slots the query may attend to.
Scores and softmax are float32; a row with no valid slot returns zeros (never NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG_INF = float("-inf")
_MIN_DOT_DIM = 16  # Triton's tl.dot needs every matmul dimension >= 16


def _check_shapes(q, k_cache, v_cache, valid):
    batch, num_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    kb, seq_len, num_kv_heads, khd = k_cache.shape
    if (kb, khd) != (batch, head_dim):
        raise ValueError(f"q {q.shape} does not match cache {k_cache.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} kv heads")
    if valid.shape != (batch, seq_len):
        raise ValueError(f"valid must have shape {(batch, seq_len)}, got {valid.shape}")
    return batch, num_heads, head_dim, seq_len, num_kv_heads


@functools.partial(jax.jit, static_argnames=("scale",))
def decode_attention_reference(q, k_cache, v_cache, valid, *, scale=None):
    """Pure-jnp decode attention; shapes/semantics as :func:`decode_attention`."""
    batch, num_heads, head_dim, _, num_kv_heads = _check_shapes(q, k_cache, v_cache, valid)
    scale = head_dim**-0.5 if scale is None else scale
    group = num_heads // num_kv_heads
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim) * scale
    scores = jnp.einsum(
        "bkgd,bskd->bkgs", qg, k_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    scores = jnp.where(valid[:, None, None, :], scores, _NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(m > _NEG_INF, m, 0.0))
    total = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bkgs,bskd->bkgd", probs, v_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    out = jnp.where(total > 0.0, out / jnp.where(total > 0.0, total, 1.0), 0.0)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def online_softmax_step(carry, scores, v):
    """One flash-attention step inside a Pallas/Triton kernel: carry (running max m [G, 1],
    sum [G, 1], acc [G, hd]) updated with masked float32 scores [G, n] (-inf = masked) and
    values v [n, hd]; fully masked blocks leave the carry unchanged (no NaN)."""
    m, total, acc = carry
    m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
    m_safe = jnp.where(m_new > _NEG_INF, m_new, 0.0)
    correction = jnp.exp(m - m_safe)
    probs = jnp.exp(scores - m_safe)
    total = correction * total + jnp.sum(probs, axis=1, keepdims=True)
    return m_new, total, correction * acc + plgpu.dot(probs, v)


def _decode_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, *, scale, block_s, seq_len):
    """One (row, kv head): q [Gp, hd], k/v [S, hd], valid int32 [S] -> o [Gp, hd]."""
    group_pad, head_dim = q_ref.shape
    q = q_ref[...].astype(jnp.float32) * scale
    offsets = lax.broadcasted_iota(jnp.int32, (block_s,), 0)

    def body(j, carry):
        start = j * block_s
        position = start + offsets
        in_seq = position < seq_len
        window = pl.ds(pl.multiple_of(start, block_s), block_s)
        kv_mask = jnp.broadcast_to(in_seq[:, None], (block_s, head_dim))
        k = plgpu.load(k_ref.at[window, :], mask=kv_mask, other=0.0).astype(jnp.float32)
        v = plgpu.load(v_ref.at[window, :], mask=kv_mask, other=0.0).astype(jnp.float32)
        attend = plgpu.load(valid_ref.at[window], mask=in_seq, other=0) != 0
        scores = plgpu.dot(q, k, trans_b=True)  # [Gp, block_s]
        return online_softmax_step(carry, jnp.where(attend[None, :], scores, _NEG_INF), v)

    init = (
        jnp.full((group_pad, 1), _NEG_INF, jnp.float32),
        jnp.zeros((group_pad, 1), jnp.float32),
        jnp.zeros((group_pad, head_dim), jnp.float32),
    )
    _, total, acc = lax.fori_loop(0, pl.cdiv(seq_len, block_s), body, init)
    has_mass = total > 0.0
    out = jnp.where(has_mass, acc / jnp.where(has_mass, total, 1.0), 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def _decode_attention_pallas(q, k_cache, v_cache, valid, *, scale, block_s, interpret):
    batch, num_heads, head_dim, seq_len, num_kv_heads = _check_shapes(q, k_cache, v_cache, valid)
    if head_dim & (head_dim - 1) or head_dim < _MIN_DOT_DIM:
        raise ValueError(f"the Pallas kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if block_s & (block_s - 1) or block_s < _MIN_DOT_DIM:
        raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
    group = num_heads // num_kv_heads
    group_pad = max(_MIN_DOT_DIM, pl.next_power_of_2(group))
    block_s = min(block_s, max(_MIN_DOT_DIM, pl.next_power_of_2(seq_len)))
    # Query heads are tiny: pad the group to the dot's minimum instead of masking.
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    kernel = functools.partial(_decode_kernel, scale=scale, block_s=block_s, seq_len=seq_len)
    head_block = pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h: (b, h, 0, 0))
    cache_block = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h: (b, 0, h, 0))
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads),
        in_specs=[head_block, cache_block, cache_block, pl.BlockSpec((None, seq_len), lambda b, h: (b, 0))],
        out_specs=head_block,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton, not Mosaic GPU
        name="decode_attention",
    )(qg, k_cache, v_cache, valid.astype(jnp.int32))
    return out[:, :, :group].reshape(batch, num_heads, head_dim)


def pallas_supported(head_dim: int) -> bool:
    """Whether "auto" picks the Pallas decode-attention kernel: a GPU and a power-of-two hd >= 16."""
    return jax.default_backend() == "gpu" and head_dim >= _MIN_DOT_DIM and not head_dim & (head_dim - 1)


@functools.partial(jax.jit, static_argnames=("scale", "impl", "block_s", "interpret"))
def decode_attention(q, k_cache, v_cache, valid, *, scale=None, impl="auto", block_s=64, interpret=None):
    """Attention of one new token per row over the KV cache.

    q: [B, H, hd]; k_cache, v_cache: [B, S, KVH, hd] (H a multiple of KVH); valid: bool [B, S]
    (True = the slot holds a token this query may attend to). scale defaults to hd**-0.5.
    Returns [B, H, hd] in q's dtype; float32 scores/softmax/accumulation; all-invalid rows -> 0.
    impl: "auto" (Pallas/Triton on GPU when hd is a power of two >= 16; the jnp reference on
    CPU and TPU, where this Triton-shaped kernel is not tuned), "pallas" or "reference".
    block_s: cache tile (power of two >= 16). interpret: default True on CPU.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = "pallas" if pallas_supported(q.shape[-1]) else "reference"
    if impl == "reference":
        return decode_attention_reference(q, k_cache, v_cache, valid, scale=scale)
    if impl != "pallas":
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _decode_attention_pallas(
        q, k_cache, v_cache, valid, scale=scale, block_s=block_s, interpret=interpret
    )


# ----------------------------------------------------------------------------------------------
# Head-major decode attention over a row range [start, end): what the sampling engine calls.
# ----------------------------------------------------------------------------------------------


def _check_heads(q, k_cache, v_cache, bounds):
    """(B, K, G, hd, S) of head-major inputs; k/v [L, B, K, S, hd], bounds int32 [B, 3]."""
    batch, num_kv_heads, group, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    _, kb, kh, seq_len, khd = k_cache.shape
    if (kb, kh, khd) != (batch, num_kv_heads, head_dim):
        raise ValueError(f"q {q.shape} does not match the head-major cache {k_cache.shape}")
    if bounds.shape != (batch, 3):
        raise ValueError(f"bounds must have shape {(batch, 3)} (start, end, layer), got {bounds.shape}")
    return batch, num_kv_heads, group, head_dim, seq_len


def decode_attention_heads_reference(q, k_cache, v_cache, bounds, *, scale=None, window=None):
    """Pure-jnp head-major decode attention; shapes/semantics as :func:`decode_attention_heads`.

    Reads only slots ``[0, window)`` (static; None = all S): callers pass a window >= every
    row's end. One batched matmul over B * K (XLA's CPU dot is several times faster with one
    batch axis than with two). Scores scaled after the dot, float32 softmax; empty rows -> 0.
    """
    batch, num_kv_heads, group, head_dim, seq_len = _check_heads(q, k_cache, v_cache, bounds)
    scale = head_dim**-0.5 if scale is None else scale
    seq_len = seq_len if window is None else min(window, seq_len)
    start = (bounds[0, 2], 0, 0, 0, 0)
    size = (1, batch, num_kv_heads, seq_len, head_dim)
    k = lax.dynamic_slice(k_cache, start, size).reshape(batch * num_kv_heads, seq_len, head_dim)
    v = lax.dynamic_slice(v_cache, start, size).reshape(batch * num_kv_heads, seq_len, head_dim)
    qf = q.reshape(batch * num_kv_heads, group, head_dim).astype(k.dtype)
    scores = lax.dot_general(qf, k, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, num_kv_heads, group, seq_len) * scale
    slot = jnp.arange(seq_len)
    live = (slot[None, :] >= bounds[:, 0:1]) & (slot[None, :] < bounds[:, 1:2])  # [B, S]
    scores = jnp.where(live[:, None, None, :], scores, _NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(m > _NEG_INF, m, 0.0))
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = (probs / jnp.where(total > 0.0, total, 1.0)).astype(v.dtype)
    out = lax.dot_general(probs.reshape(batch * num_kv_heads, group, seq_len), v,
                          (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return out.reshape(batch, num_kv_heads, group, head_dim).astype(q.dtype)


def _split_kernel(bounds_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, block_s, chunk, seq_len):
    """One (row, kv head, split): q [Gp, hd], k/v [L, S, hd], bounds int32 [3] (start, end,
    layer) -> unnormalised acc [Gp, hd], running max m [Gp], mass l [Gp] over the split's slots
    ``[max(start, split * chunk), min(end, (split + 1) * chunk))``; blocks outside are skipped."""
    group_pad, head_dim = q_ref.shape
    split = pl.program_id(2)
    start, end, layer = bounds_ref[0], bounds_ref[1], bounds_ref[2]
    lo = jnp.maximum(start, split * chunk)
    hi = jnp.minimum(jnp.minimum(end, (split + 1) * chunk), seq_len)
    first = lo // block_s
    last = jnp.maximum(first, (hi + block_s - 1) // block_s)
    q = q_ref[...].astype(jnp.float32) * scale
    offsets = lax.broadcasted_iota(jnp.int32, (block_s,), 0)

    def body(j, carry):
        m, total, acc = carry
        position = j * block_s + offsets
        window = pl.ds(pl.multiple_of(j * block_s, block_s), block_s)
        kv_mask = jnp.broadcast_to((position < seq_len)[:, None], (block_s, head_dim))
        k = plgpu.load(k_ref.at[layer, window, :], mask=kv_mask, other=0.0).astype(jnp.float32)
        v = plgpu.load(v_ref.at[layer, window, :], mask=kv_mask, other=0.0).astype(jnp.float32)
        scores = plgpu.dot(q, k, trans_b=True)  # [Gp, block_s]
        scores = jnp.where(((position >= lo) & (position < hi))[None, :], scores, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        m_safe = jnp.where(m_new > _NEG_INF, m_new, 0.0)
        correction = jnp.exp(m - m_safe)
        probs = jnp.exp(scores - m_safe[:, None])
        total = correction * total + jnp.sum(probs, axis=1)
        acc = correction[:, None] * acc + plgpu.dot(probs, v)
        return m_new, total, acc

    init = (jnp.full((group_pad,), _NEG_INF, jnp.float32), jnp.zeros((group_pad,), jnp.float32),
            jnp.zeros((group_pad, head_dim), jnp.float32))
    m, total, acc = lax.fori_loop(first, last, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = total


def _decode_attention_heads_pallas(q, k_cache, v_cache, bounds, *, scale, block_s, num_splits, interpret):
    """Split-K flash-decoding: grid (B, K, splits), partials combined in jnp (shapes as
    :func:`decode_attention_heads`)."""
    batch, num_kv_heads, group, head_dim, seq_len = _check_heads(q, k_cache, v_cache, bounds)
    if head_dim & (head_dim - 1) or head_dim < _MIN_DOT_DIM:
        raise ValueError(f"the Pallas kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if block_s & (block_s - 1) or block_s < _MIN_DOT_DIM:
        raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
    num_layers = k_cache.shape[0]
    group_pad = max(_MIN_DOT_DIM, pl.next_power_of_2(group))
    block_s = min(block_s, max(_MIN_DOT_DIM, pl.next_power_of_2(seq_len)))
    if num_splits is None:  # enough programs to fill a GPU, each split at least 4 blocks long
        num_splits = max(1, min(pl.cdiv(seq_len, 4 * block_s), pl.cdiv(1024, batch * num_kv_heads)))
    chunk = pl.cdiv(pl.cdiv(seq_len, num_splits), block_s) * block_s
    qg = jnp.pad(q, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    kernel = functools.partial(_split_kernel, scale=scale, block_s=block_s, chunk=chunk, seq_len=seq_len)
    cache_block = pl.BlockSpec((num_layers, None, None, seq_len, head_dim), lambda b, h, s: (0, b, h, 0, 0))
    part = lambda *tail: pl.BlockSpec((None, None, None) + tail, lambda b, h, s: (b, h, s) + (0,) * len(tail))
    acc, m, total = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[pl.BlockSpec((None, 3), lambda b, h, s: (b, 0)),
                  pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  cache_block, cache_block],
        out_specs=[part(group_pad, head_dim), part(group_pad), part(group_pad)],
        out_shape=[jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, group_pad, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, group_pad), jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, group_pad), jnp.float32)],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton, not Mosaic GPU
        name="decode_attention_split_k",
    )(bounds.astype(jnp.int32), qg, k_cache, v_cache)
    # Combine the splits: rescale each partial to the global max (empty splits have m = -inf).
    m_all = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.where(m > _NEG_INF, jnp.exp(m - jnp.where(m_all > _NEG_INF, m_all, 0.0)), 0.0)
    total = jnp.sum(weight * total, axis=2)
    acc = jnp.sum(weight[..., None] * acc, axis=2)
    out = jnp.where(total[..., None] > 0.0, acc / jnp.where(total > 0.0, total, 1.0)[..., None], 0.0)
    return out[:, :, :group].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "impl", "block_s", "num_splits", "interpret", "window"))
def decode_attention_heads(q, k_cache, v_cache, bounds, *, scale=None, impl="auto", block_s=64,
                           num_splits=None, interpret=None, window=None):
    """One new query per row over a head-major, layer-stacked KV cache, reading a row range.

    q: [B, K, G, hd] (query head k * G + g reads kv head k); k_cache, v_cache: [L, B, K, S, hd];
    bounds: int32 [B, 3] = (start, end, layer): row b attends to slots start_b <= s < end_b of
    layer ``bounds[:, 2]`` (the same layer on every row). Returns [B, K, G, hd] in q's dtype;
    float32 scores/softmax/accumulation; empty ranges give zeros. scale defaults to hd**-0.5.
    impl: "auto" (Pallas/Triton on GPU when hd is a power of two >= 16, else the reference),
    "pallas" or "reference". The kernel skips cache blocks outside each row's range and splits
    the slots over ``num_splits`` programs per (row, head) (split-K flash-decoding; default:
    enough programs for ~1k, each split >= 4 blocks), so a few long rows do not serialise.
    window: static bound on every row's end used by the reference (reads slots < window only;
    the kernel skips by ``bounds`` instead). interpret: default True on CPU.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = "pallas" if pallas_supported(q.shape[-1]) else "reference"
    if impl == "reference":
        return decode_attention_heads_reference(q, k_cache, v_cache, bounds, scale=scale, window=window)
    if impl != "pallas":
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _decode_attention_heads_pallas(q, k_cache, v_cache, bounds, scale=scale, block_s=block_s,
                                          num_splits=num_splits, interpret=interpret)
