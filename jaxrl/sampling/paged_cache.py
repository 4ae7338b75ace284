"""Paged KV cache: a pool of fixed-size pages, a free list, and page writes (pure device code).

Pool layout (:class:`PagePool`): k, v [L * Np, page, K, hd]. Each layer owns the ``Np`` pages
``layer * Np .. layer * Np + Np - 1``; a page *id* (what block tables hold) is the layer-local
index 0..Np-1, and layer ``l`` reads page id ``p`` at ``l * Np + p``, so one id names the same
slot range in every layer. Page ``Np - 1`` is the *trash* page (:func:`trash_page`): never
handed out, it absorbs the writes of idle slots and the unused tail of prefill chunks.

The free list is a stack: ``free[:num_free]`` are the free page ids. :func:`allocate` pops one
page per requesting entry; :func:`release` pushes pages back. Callers keep ``num_free`` from
going negative by reserving pages ahead (the continuous engine reserves each row's worst case
at admission), so an allocation never fails inside the compiled loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrl.models.config import ModelConfig


class PagePool(NamedTuple):
    """k, v [L * Np, page, K, hd]; free int32 [Np - 1] (a stack of page ids); num_free int32 []."""

    k: jax.Array
    v: jax.Array
    free: jax.Array
    num_free: jax.Array

    @property
    def pages_per_layer(self) -> int:
        return self.free.shape[0] + 1

    @property
    def page_size(self) -> int:
        return self.k.shape[1]


def trash_page(pages_per_layer: int) -> int:
    """The page id that absorbs discarded writes (never allocated)."""
    return pages_per_layer - 1


def init_pool(cfg: ModelConfig, pages_per_layer: int, page_size: int, dtype=None) -> PagePool:
    """An all-free pool of ``pages_per_layer`` pages (one of them the trash page) per layer."""
    if pages_per_layer < 2:
        raise ValueError(f"pages_per_layer must be >= 2 (one is the trash page), got {pages_per_layer}")
    shape = (cfg.num_layers * pages_per_layer, page_size, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    free = jnp.arange(pages_per_layer - 1, dtype=jnp.int32)[::-1]  # pops 0, 1, 2, ... first
    return PagePool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), free,
                    jnp.int32(pages_per_layer - 1))


def pool_bytes(cfg: ModelConfig, pages: int, page_size: int, dtype=None) -> int:
    """Bytes of K and V for ``pages`` pages per layer (what a pool of that size holds)."""
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype or cfg.dtype).itemsize
    return int(pages * page_size * per_slot)


def allocate(pool: PagePool, want: jax.Array) -> tuple[PagePool, jax.Array]:
    """Pop one page for each True in ``want`` (bool [M]); the others get the trash page.

    Returns the pool and int32 [M] page ids. The caller guarantees ``sum(want) <= num_free``.
    """
    rank = jnp.cumsum(want.astype(jnp.int32)) - 1
    index = jnp.clip(pool.num_free - 1 - rank, 0, pool.free.shape[0] - 1)
    ids = jnp.where(want, pool.free[index], trash_page(pool.pages_per_layer))
    return pool._replace(num_free=pool.num_free - jnp.sum(want, dtype=jnp.int32)), ids


def release(pool: PagePool, page_ids: jax.Array, mask: jax.Array) -> PagePool:
    """Push ``page_ids[mask]`` (int32 [M], bool [M]) back on the free stack."""
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
    slot = jnp.where(mask, pool.num_free + rank, pool.free.shape[0])  # out of range: dropped
    free = pool.free.at[slot].set(page_ids.astype(jnp.int32), mode="drop")
    return pool._replace(free=free, num_free=pool.num_free + jnp.sum(mask, dtype=jnp.int32))


def write_tokens(pages: jax.Array, base: jax.Array, page_ids: jax.Array, offsets: jax.Array,
                 values: jax.Array) -> jax.Array:
    """Write one token per row: pages [L * Np, page, K, hd], base = layer * Np, page_ids /
    offsets int32 [M], values [M, K, hd] -> pages with values[m] at (page_ids[m], offsets[m])."""
    return pages.at[base + page_ids, offsets].set(values.astype(pages.dtype))


def write_pages(pages: jax.Array, base: jax.Array, page_ids: jax.Array, values: jax.Array
                ) -> jax.Array:
    """Write whole pages: base = layer * Np, page_ids int32 [M], values [M, page, K, hd]
    (repeated trash ids are fine: the trash page is never read as a valid slot)."""
    return pages.at[base + page_ids].set(values.astype(pages.dtype))
