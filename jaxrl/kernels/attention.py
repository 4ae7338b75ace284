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


def _pallas_supported(head_dim: int) -> bool:
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
        impl = "pallas" if _pallas_supported(q.shape[-1]) else "reference"
    if impl == "reference":
        return decode_attention_reference(q, k_cache, v_cache, valid, scale=scale)
    if impl != "pallas":
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _decode_attention_pallas(
        q, k_cache, v_cache, valid, scale=scale, block_s=block_s, interpret=interpret
    )
