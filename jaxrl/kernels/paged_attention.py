"""Paged decode attention: one new query token per row against K/V stored in fixed-size pages.

Layout: q [B, H, hd]; k_pages, v_pages [P, page, KVH, hd] (a pool of P pages of ``page``
slots, rotary already applied); block_tables int32 [B, W]: row b's logical slot j lives in
page ``block_tables[b, j // page]`` at offset ``j % page``; the row may attend to the logical
slots ``starts[b] <= j < ends[b]`` (int32 [B]). A start offset inside the first page lets a
prompt be right-aligned in pages it shares with its samples (no copy-on-write). H = G * KVH
(query head h reads kv head h // G). Scores and softmax in float32; a row with no valid slot
returns zeros (never NaN).

Implementations:

* ``paged_attention_reference``: gather the row's pages by its block table into a dense
  [B, W * page, KVH, hd] view and run :func:`jaxrl.kernels.attention.decode_attention_reference`
  (the oracle, and the CPU path).
* ``_paged_attention_pallas``: a Pallas/Triton kernel, grid (row, kv head), looping over only
  the pages that overlap ``[start, end)`` with an online softmax (work per row is its own live
  length, not the table width). Tested against the reference in interpret mode on CPU.
* TPU: jax ships ``pallas.ops.tpu.ragged_paged_attention`` (present in the installed jax), but
  its contract is "valid kv = slots [0, kv_len)" with k/v interleaved in one array, so it cannot
  express the start offset of shared right-aligned prompts; "auto" uses the reference on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxrl.kernels.attention import decode_attention_reference, online_softmax_step

_NEG_INF = float("-inf")
_MIN_DOT_DIM = 16  # Triton's tl.dot needs every matmul dimension >= 16


def _check_shapes(q, k_pages, v_pages, block_tables, starts, ends):
    batch, num_heads, head_dim = q.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    _, page, num_kv_heads, khd = k_pages.shape
    if khd != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape} does not match the pages {k_pages.shape} (head_dim, GQA groups)")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, W], got {block_tables.shape}")
    if starts.shape != (batch,) or ends.shape != (batch,):
        raise ValueError(f"starts and ends must be [{batch}], got {starts.shape} and {ends.shape}")
    return batch, num_heads, head_dim, page, num_kv_heads


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Dense view of each row's pages: pages [P, page, ...], block_tables int [B, W] ->
    [B, W * page, ...] (logical slot j of row b at index j)."""
    batch, width = block_tables.shape
    gathered = jnp.take(pages, block_tables, axis=0)  # [B, W, page, ...]
    return gathered.reshape((batch, width * pages.shape[1]) + pages.shape[2:])


def logical_valid(starts: jax.Array, ends: jax.Array, num_slots: int) -> jax.Array:
    """bool [B, num_slots]: logical slot j of row b is attendable iff starts[b] <= j < ends[b]."""
    slot = jnp.arange(num_slots)[None, :]
    return (slot >= starts[:, None]) & (slot < ends[:, None])


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_attention_reference(q, k_pages, v_pages, block_tables, starts, ends, *, scale=None):
    """Pure-jnp paged decode attention (gather by block table); see the module docstring.

    Returns [B, H, hd] in q's dtype."""
    batch, _, head_dim, page, _ = _check_shapes(q, k_pages, v_pages, block_tables, starts, ends)
    scale = head_dim**-0.5 if scale is None else scale
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    valid = logical_valid(starts, ends, block_tables.shape[1] * page)
    return decode_attention_reference(q, k, v, valid, scale=scale)


def _paged_kernel(q_ref, k_ref, v_ref, table_ref, bounds_ref, o_ref, *, scale, page):
    """One (row, kv head): q [Gp, hd], k/v pools [P, page, hd], table [W], bounds [2]."""
    group_pad, head_dim = q_ref.shape
    q = q_ref[...].astype(jnp.float32) * scale
    start, end = bounds_ref[0], bounds_ref[1]
    offsets = lax.broadcasted_iota(jnp.int32, (page,), 0)

    def body(j, carry):
        page_id = table_ref[pl.ds(j, 1)]  # [1]: a gather load, as in jax's GPU paged attention
        k = k_ref[page_id].reshape(page, head_dim).astype(jnp.float32)
        v = v_ref[page_id].reshape(page, head_dim).astype(jnp.float32)
        slot = j * page + offsets
        attend = (slot >= start) & (slot < end)
        scores = plgpu.dot(q, k, trans_b=True)  # [Gp, page]
        return online_softmax_step(carry, jnp.where(attend[None, :], scores, _NEG_INF), v)

    init = (
        jnp.full((group_pad, 1), _NEG_INF, jnp.float32),
        jnp.zeros((group_pad, 1), jnp.float32),
        jnp.zeros((group_pad, head_dim), jnp.float32),
    )
    first = start // page
    last = jnp.maximum((end + page - 1) // page, first)  # only the pages overlapping [start, end)
    _, total, acc = lax.fori_loop(first, last, body, init)
    has_mass = total > 0.0
    out = jnp.where(has_mass, acc / jnp.where(has_mass, total, 1.0), 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def _paged_attention_pallas(q, k_pages, v_pages, block_tables, starts, ends, *, scale, interpret):
    batch, num_heads, head_dim, page, num_kv_heads = _check_shapes(
        q, k_pages, v_pages, block_tables, starts, ends)
    for name, size in (("head_dim", head_dim), ("page size", page)):
        if size & (size - 1) or size < _MIN_DOT_DIM:
            raise ValueError(f"the Pallas paged kernel needs a power-of-two {name} >= 16, got {size}")
    num_pages, width = k_pages.shape[0], block_tables.shape[1]
    group = num_heads // num_kv_heads
    group_pad = max(_MIN_DOT_DIM, pl.next_power_of_2(group))
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    bounds = jnp.stack([starts, ends], axis=1).astype(jnp.int32)
    head_block = pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h: (b, h, 0, 0))
    pool_block = pl.BlockSpec((num_pages, page, None, head_dim), lambda b, h: (0, 0, h, 0))
    out = pl.pallas_call(
        functools.partial(_paged_kernel, scale=scale, page=page),
        grid=(batch, num_kv_heads),
        in_specs=[head_block, pool_block, pool_block,
                  pl.BlockSpec((None, width), lambda b, h: (b, 0)),
                  pl.BlockSpec((None, 2), lambda b, h: (b, 0))],
        out_specs=head_block,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton, not Mosaic GPU
        name="paged_attention",
    )(qg, k_pages, v_pages, block_tables.astype(jnp.int32), bounds)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("scale", "impl", "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, starts, ends, *, scale=None, impl="auto",
                    interpret=None):
    """Attention of one new token per row over its pages.

    q [B, H, hd]; k_pages, v_pages [P, page, KVH, hd]; block_tables int32 [B, W] (page ids;
    entries past the row's end may point anywhere in the pool); starts, ends int32 [B] (the
    attendable logical slots). Returns [B, H, hd] in q's dtype. impl: "auto" (Pallas/Triton on
    GPU when hd and page are powers of two >= 16, else the reference), "pallas" (interpret mode
    on CPU unless ``interpret`` says otherwise) or "reference".
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        page, head_dim = k_pages.shape[1], q.shape[-1]
        pow2 = all(s >= _MIN_DOT_DIM and not s & (s - 1) for s in (page, head_dim))
        impl = "pallas" if jax.default_backend() == "gpu" and pow2 else "reference"
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, block_tables, starts, ends, scale=scale)
    if impl != "pallas":
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _paged_attention_pallas(q, k_pages, v_pages, block_tables, starts, ends, scale=scale,
                                   interpret=interpret)
