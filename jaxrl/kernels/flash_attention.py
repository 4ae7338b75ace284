"""Attention for training and prefill without an S x S buffer.

Four implementations behind one signature, chosen by ``model.attention_impl``:

* ``xla``: today's dense jnp attention (``jaxrl.models.transformer.attention``); it builds
  [B, H, T, S] float32 scores. Fastest for short sequences.
* ``blocked``: a ``lax.scan`` over key/value blocks of ``block_size`` slots with an online
  softmax (running max, running sum), forward and backward both custom (``jax.custom_vjp``):
  the backward pass recomputes each block's probabilities from the saved log-sum-exp, so the
  live memory is O(B · H · T · block) and nothing S x S is kept between passes. Pure jnp, so
  it runs on every backend; it is the portable reference the others are tested against.
* ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/fp16).
  cuDNN masks by sequence lengths (right padding), so each row is first rolled to start at
  its first real token; that needs the real tokens of a row to be one contiguous run, which
  holds for every batch jaxrl builds (left-padded prompt + right-padded response).
* ``tpu_flash``: the Pallas TPU flash-attention kernel shipped with JAX, padding handled by
  segment ids (1 = real, 0 = pad); KV heads are repeated to the query heads (the kernel has
  no GQA). Sequence length must be a multiple of 128.

``auto`` picks cudnn on GPU for bf16/fp16, tpu_flash on TPU when the length divides, and on
CPU (or float32 GPU) ``xla`` up to ``DENSE_MAX_LEN`` positions and ``blocked`` beyond.

Masking semantics (all implementations agree on every query that has at least one key to
attend to): query i may attend key slot j when ``kv_valid[b, j]``, ``j <= q_pos[i]`` (causal)
and the segment ids match. A query with no such key gets a finite output (the dense path
averages all values; callers never read those rows: they are left padding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "tpu_flash")
DENSE_MAX_LEN = 512  # auto on CPU: dense up to this many positions (BENCHMARKS.md, issue 13)
DEFAULT_BLOCK = 512
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, as in the dense path
_TPU_BLOCK = 128


def resolve_impl(impl: str, seq_len: int, dtype, backend: str | None = None) -> str:
    """The concrete implementation for ``impl`` (``auto`` resolved) at ``seq_len`` positions.

    dtype: the compute dtype of q/k/v; backend: "cpu" | "gpu" | "tpu" (default: JAX's).
    Raises ValueError naming ``model.attention_impl`` for an unknown value.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={impl!r} must be one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend in ("gpu", "cuda", "rocm") and half:
        return "cudnn"
    if backend == "tpu" and seq_len % _TPU_BLOCK == 0:
        return "tpu_flash"
    return "xla" if seq_len <= DENSE_MAX_LEN else "blocked"


# --------------------------------------------------------------------------- blocked (portable)
def _block_mask(valid_b, kseg_b, qseg, q_pos, k_pos, causal: bool):
    """bool [B, T, Bk]: which of the block's keys each query may attend."""
    mask = valid_b[:, None, :] & (qseg[:, :, None] == kseg_b[:, None, :])
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[None, :, None])
    return mask


def _blocks(x, block: int):
    """[B, S, ...] -> [S / block, B, block, ...] (S already a multiple of block)."""
    b, s = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, s // block, block, *x.shape[2:]), 1, 0)


def _scores(qg, kb, mask, scale):
    """float32 [B, K, G, T, Bk] masked scores of grouped queries qg [B, K, G, T, hd]."""
    s = jnp.einsum("bkgtd,bskd->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, _MASK_VALUE)


def _pad_kv(k, v, kv_valid, kv_seg, block: int):
    pad = -k.shape[1] % block
    if pad:
        widths = ((0, 0), (0, pad)) + ((0, 0),) * (k.ndim - 2)
        k, v = jnp.pad(k, widths), jnp.pad(v, widths)
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    return k, v, kv_valid, kv_seg


def _grouped(q, kv_heads: int):
    """q [B, T, H, hd] -> [B, K, G, T, hd] (query heads grouped by their KV head)."""
    b, t, h, hd = q.shape
    return jnp.transpose(q.reshape(b, t, kv_heads, h // kv_heads, hd), (0, 2, 3, 1, 4))


def _ungrouped(x):
    """[B, K, G, T, hd] -> [B, T, H, hd]."""
    b, kh, g, t, hd = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, t, kh * g, hd)


def _tie(q, *mask_inputs):
    """Tie the mask inputs to q with an optimization barrier.

    Inside the layer scan the mask inputs do not change from layer to layer; without the tie,
    JAX's scan partial evaluation hoists the block masks out of the layer loop and stacks
    them for every block: a [blocks, B, K, G, T, block] bool buffer, i.e. T x S again.
    """
    return jax.lax.optimization_barrier((q, *mask_inputs))


def _forward(causal, block, q, k, v, kv_valid, q_pos, q_seg, kv_seg):
    """Online-softmax forward; returns (out [B, T, H, hd] in q's dtype, lse f32 [B, K, G, T])."""
    kv_heads, hd = k.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(hd)
    q, kv_valid, q_pos, q_seg, kv_seg = _tie(q, kv_valid, q_pos, q_seg, kv_seg)
    qg = _grouped(q, kv_heads)
    k, v, kv_valid, kv_seg = _pad_kv(k, v, kv_valid, kv_seg, block)
    xs = (_blocks(k, block), _blocks(v, block), _blocks(kv_valid, block), _blocks(kv_seg, block),
          jnp.arange(k.shape[1] // block) * block)
    stats = qg.shape[:4]

    def step(carry, x):
        m, l, acc = carry
        kb, vb, valid_b, kseg_b, start = x
        mask = _block_mask(valid_b, kseg_b, q_seg, q_pos, start + jnp.arange(block), causal)
        s = _scores(qg, kb, mask, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full(stats, _MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(qg.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    out = _ungrouped(acc / l[..., None]).astype(q.dtype)
    return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked(causal, block, q, k, v, kv_valid, q_pos, q_seg, kv_seg):
    return _forward(causal, block, q, k, v, kv_valid, q_pos, q_seg, kv_seg)[0]


def _blocked_fwd(causal, block, q, k, v, kv_valid, q_pos, q_seg, kv_seg):
    out, lse = _forward(causal, block, q, k, v, kv_valid, q_pos, q_seg, kv_seg)
    return out, (q, k, v, kv_valid, q_pos, q_seg, kv_seg, out, lse)


def _blocked_bwd(causal, block, res, dout):
    """Flash-attention backward: one pass over KV blocks, probabilities recomputed from lse."""
    q, k, v, kv_valid, q_pos, q_seg, kv_seg, out, lse = res
    s_len, kv_heads, hd = k.shape[1], k.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(hd)
    q, kv_valid, q_pos, q_seg, kv_seg = _tie(q, kv_valid, q_pos, q_seg, kv_seg)
    qg = _grouped(q, kv_heads)
    do = _grouped(dout.astype(q.dtype), kv_heads)
    delta = jnp.sum(do.astype(jnp.float32) * _grouped(out, kv_heads).astype(jnp.float32), axis=-1)
    kp, vp, valid_p, kseg_p = _pad_kv(k, v, kv_valid, kv_seg, block)
    xs = (_blocks(kp, block), _blocks(vp, block), _blocks(valid_p, block), _blocks(kseg_p, block),
          jnp.arange(kp.shape[1] // block) * block)

    def step(dq, x):
        kb, vb, valid_b, kseg_b, start = x
        mask = _block_mask(valid_b, kseg_b, q_seg, q_pos, start + jnp.arange(block), causal)
        p = jnp.exp(_scores(qg, kb, mask, scale) - lse[..., None])
        dv = jnp.einsum("bkgts,bkgtd->bskd", p.astype(vb.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bskd->bkgts", do, vb, preferred_element_type=jnp.float32)
        ds = (jnp.where(mask[:, None, None], p * (dp - delta[..., None]), 0.0) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, kb, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,bkgtd->bskd", ds, qg, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), xs)

    def unblock(x, like):
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s_len].astype(like.dtype)

    return (_ungrouped(dq).astype(q.dtype), unblock(dk, k), unblock(dv, v), None, None, None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array, *,
                      q_pos: jax.Array | None = None, causal: bool = True,
                      q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                      block_size: int = DEFAULT_BLOCK) -> jax.Array:
    """Blocked (flash) grouped-query attention, memory O(B · H · T · block_size).

    q [B, T, H, hd]; k, v [B, S, K, hd] (H a multiple of K); kv_valid bool [B, S];
    q_pos int32 [T]: the key slot of each query for the causal mask (default
    ``S - T + arange(T)``, i.e. the queries are the last T slots); segment ids int32
    [B, T] / [B, S] (default all 0): a query sees only keys of its own segment. Scores and
    softmax in float32; returns [B, T, H, hd] in q's dtype. Differentiable in q, k, v.
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    if q_pos is None:
        q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    block = min(block_size, s)
    return _blocked(causal, block, q, k, v, kv_valid.astype(bool), q_pos.astype(jnp.int32), q_seg, kv_seg)


# --------------------------------------------------------------------------- accelerator paths
def _roll_rows(x, shift):
    """Roll each row of x [B, S, ...] left by shift [B] (wrapping)."""
    idx = (jnp.arange(x.shape[1])[None, :] + shift[:, None]) % x.shape[1]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Causal self-attention through cuDNN flash attention (GPU only, bf16/fp16).

    q [B, S, H, hd], k/v [B, S, K, hd], attention_mask bool [B, S] with one contiguous run of
    True per row. Rows are rolled so the run starts at 0, attended with cuDNN's
    padding-causal mask (lengths = the run's length), and rolled back. Returns [B, S, H, hd].
    """
    mask = attention_mask.astype(bool)
    start = jnp.argmax(mask, axis=1).astype(jnp.int32)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    qr, kr, vr = (_roll_rows(x, start) for x in (q, k, v))
    out = jax.nn.dot_product_attention(qr, kr, vr, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
    return _roll_rows(out, -start)


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Causal self-attention through JAX's Pallas TPU flash-attention kernel.

    q [B, S, H, hd], k/v [B, S, K, hd], attention_mask bool [B, S] (any pattern: real and
    padding tokens get segment ids 1 and 0). S must be a multiple of 128. Returns [B, S, H, hd].
    """
    # imported here: the module pulls in the Mosaic TPU lowering, not needed on CPU/GPU runs
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

    s = q.shape[1]
    if s % _TPU_BLOCK:
        raise ValueError(f"model.attention_impl=tpu_flash needs a sequence length divisible by "
                         f"{_TPU_BLOCK}, got {s}")
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    seg = attention_mask.astype(jnp.int32)
    q_t, k_t, v_t = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
    block = min(512, s) if s % 512 == 0 else _TPU_BLOCK
    sizes = tpu_fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                              block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                              block_q_dkv=block, block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    out = tpu_fa.flash_attention(q_t, k_t, v_t, segment_ids=tpu_fa.SegmentIds(q=seg, kv=seg), causal=True,
                                 sm_scale=1.0 / math.sqrt(q.shape[-1]), block_sizes=sizes)
    return jnp.transpose(out, (0, 2, 1, 3))


def self_attention(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array,
                   *, block_size: int = DEFAULT_BLOCK) -> jax.Array:
    """Causal self-attention of a padded batch by a concrete implementation (not ``auto``/``xla``).

    q [B, S, H, hd], k/v [B, S, K, hd], attention_mask bool [B, S] (False = padding).
    Returns [B, S, H, hd] in q's dtype.
    """
    if impl == "blocked":
        return blocked_attention(q, k, v, attention_mask, causal=True, block_size=block_size)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, attention_mask)
    if impl == "tpu_flash":
        return tpu_flash_attention(q, k, v, attention_mask)
    raise ValueError(f"self_attention: no implementation {impl!r}")
