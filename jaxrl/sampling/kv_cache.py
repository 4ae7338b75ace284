"""KV-cache helpers for the sampling engine: fan a prefilled cache out to its samples.

The prefill writes the model's ``KVCache`` (k, v [L, N, P, K, hd], rotary already applied);
decoding reads a head-major copy, k, v [L, B, K, S, hd] (see :mod:`jaxrl.sampling.decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl.models.transformer import KVCache


def fan_out(cache: KVCache, samples_per_row: int, total_slots: int) -> tuple[jax.Array, jax.Array]:
    """Repeat each row ``samples_per_row`` times, go head-major and grow the slots.

    cache: k, v [L, N, S, K, hd]. Returns k, v [L, N * samples_per_row, K, total_slots, hd]:
    row ``r * samples_per_row + j`` is a copy of row ``r``; slots ``S..total_slots-1`` are zeros
    (filled by decoding). Rows of one source row are contiguous (GRPO groups).
    """
    if total_slots < cache.max_length:
        raise ValueError(f"total_slots={total_slots} is smaller than the cache's {cache.max_length} slots")
    extra = total_slots - cache.max_length

    def grow(x):
        x = jnp.repeat(x, samples_per_row, axis=1).transpose(0, 1, 3, 2, 4)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))

    return grow(cache.k), grow(cache.v)
