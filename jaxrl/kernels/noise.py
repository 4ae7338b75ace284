"""Counter-based Gumbel noise of the fused sampler (see :mod:`jaxrl.kernels.sampling`).

The noise of entry (row, v) is a pure function of the two key words, the (global) row index
and the vocab index: a murmur3-finaliser integer hash on int32 bit patterns, turned into a
uniform in (0, 1) and then into Gumbel(0, 1). Pure ``jnp``/``lax`` so that the Pallas kernel
body and the jnp reference draw the very same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _i32(value: int) -> int:
    """The int32 with the same 32 bits as the unsigned constant ``value``."""
    return int(np.array(value, dtype=np.uint32).view(np.int32))


_GOLDEN = _i32(0x9E3779B9)
_MIX_1 = _i32(0x85EBCA6B)
_MIX_2 = _i32(0xC2B2AE35)
_INDEX_MUL = _i32(0x27D4EB2F)


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3 finaliser on int32 bit patterns (wrapping arithmetic, logical shifts)."""
    h = h ^ lax.shift_right_logical(h, 16)
    h = h * _MIX_1
    h = h ^ lax.shift_right_logical(h, 13)
    h = h * _MIX_2
    return h ^ lax.shift_right_logical(h, 16)


def row_seeds(seed0: jax.Array, seed1: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two int32 per-row hash words from the key words and the (global) row index."""
    first = _fmix32(seed0 ^ _fmix32(seed1 + row * _GOLDEN))
    second = _fmix32(first + _GOLDEN)
    return first, second


def gumbel_from_seeds(first: jax.Array, second: jax.Array, vocab_index: jax.Array) -> jax.Array:
    """float32 Gumbel(0, 1) noise for each vocab index, from 23 hash bits per entry."""
    h = _fmix32(_fmix32((vocab_index * _INDEX_MUL) ^ first) + second)
    mantissa = lax.shift_right_logical(h, 9).astype(jnp.float32)
    uniform = (mantissa + 0.5) * (1.0 / (1 << 23))  # in [2^-24, 1 - 2^-24]: never 0 or 1
    return -jnp.log(-jnp.log(uniform))


def gumbel_noise(key_data: jax.Array, num_rows: int, vocab_size: int) -> jax.Array:
    """The exact noise the sampler adds: float32 [num_rows, vocab_size].

    key_data: uint32 [2] (all rows) or [num_rows, 2] (one pair per row; the row index is
    hashed in either way), e.g. from :func:`make_key_data`.
    """
    seed0, seed1 = per_row_key_words(key_data, num_rows)
    first, second = row_seeds(seed0[:, None], seed1[:, None], jnp.arange(num_rows)[:, None])
    return gumbel_from_seeds(first, second, jnp.arange(vocab_size, dtype=jnp.int32)[None, :])


def make_key_data(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """uint32 [2] sampler key words for one decode step from a jax PRNG key (any impl)."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(jax.random.fold_in(key, step), (2,), jnp.uint32)


def shift_rows(key_data: jax.Array, offset: jax.Array | int) -> jax.Array:
    """Key data under which sampler row r draws the noise of row ``r + offset``.

    key_data: uint32 [2] or [B, 2]; offset: int32 scalar or [B]. ``row_seeds`` hashes
    ``seed1 + row * GOLDEN``, so adding ``offset * GOLDEN`` to the second word (wrapping) moves
    every row by ``offset``: a chunk of rows starting at global row ``offset`` draws exactly the
    whole batch's noise for its rows, and a slot can draw the noise of the row it holds.
    """
    key_data = jnp.asarray(key_data)
    if key_data.dtype != jnp.uint32:
        raise TypeError(f"key_data must be uint32, got {key_data.dtype}")
    words = lax.bitcast_convert_type(key_data, jnp.int32)
    shifted = words[..., 1] + jnp.asarray(offset, jnp.int32) * _GOLDEN
    return lax.bitcast_convert_type(jnp.stack([jnp.broadcast_to(words[..., 0], shifted.shape), shifted], axis=-1),
                                    jnp.uint32)


def per_row_key_words(key_data: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Two int32 [num_rows] key words from uint32 [2] or [num_rows, 2] key data."""
    key_data = jnp.asarray(key_data)
    if key_data.dtype != jnp.uint32:
        raise TypeError(f"key_data must be uint32, got {key_data.dtype}")
    if key_data.shape == (2,):
        key_data = jnp.broadcast_to(key_data, (num_rows, 2))
    if key_data.shape != (num_rows, 2):
        raise ValueError(f"key_data must have shape [2] or [{num_rows}, 2], got {key_data.shape}")
    words = lax.bitcast_convert_type(key_data, jnp.int32)
    return words[:, 0], words[:, 1]
