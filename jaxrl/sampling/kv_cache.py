"""KV-cache helpers for the sampling engine: fan a prefilled cache out to its samples.

The cache layout is the model's ``KVCache`` (k, v [L, B, S, K, hd], rotary already applied).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrl.models.transformer import KVCache


def fan_out(cache: KVCache, samples_per_row: int, total_slots: int) -> KVCache:
    """Repeat each row ``samples_per_row`` times and grow the slot axis to ``total_slots``.

    cache: k, v [L, B, S, K, hd]. Returns k, v [L, B * samples_per_row, total_slots, K, hd]:
    row ``r * samples_per_row + j`` is a copy of row ``r``; the new slots ``S..total_slots-1``
    are zeros (filled by decoding). Rows of one source row are contiguous (GRPO groups).
    """
    if total_slots < cache.max_length:
        raise ValueError(f"total_slots={total_slots} is smaller than the cache's {cache.max_length} slots")
    extra = total_slots - cache.max_length

    def grow(x):
        x = jnp.repeat(x, samples_per_row, axis=1)
        return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))

    return KVCache(k=grow(cache.k), v=grow(cache.v))
