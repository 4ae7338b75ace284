"""The decoder over a paged KV pool: one decode token per slot, or one prefill chunk of a prompt.

Used by the continuous engine (:mod:`jaxrl.sampling.continuous`). Both run the model's own
decoder layer (``_block`` of :mod:`jaxrl.models.transformer`) with an attention that writes the
new K/V into pages and reads each row's pages through its block table. Layers run in a
``fori_loop`` carrying the whole pool, so page writes are in place (no per-layer pool copy).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl.kernels.paged_attention import gather_pages, paged_attention
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import _block  # one decoder layer with a pluggable attention
from jaxrl.models.transformer import Params, attention, embed, rms_norm, rope_inverse_frequencies
from jaxrl.sampling import paged_cache as pc


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """Everything static about one compiled rollout (the jit cache key).

    slots: decode slots S; page_size: slots per page; prefill_chunk: C (a multiple of
    page_size); pages: pool pages per layer (incl. the trash page); prompt_pages: Pp (pages of
    the widest prompt); samples_per_prompt: n; max_new_tokens: T (output width).
    """

    model_cfg: ModelConfig
    slots: int
    page_size: int
    prefill_chunk: int
    pages: int
    prompt_pages: int
    samples_per_prompt: int
    max_new_tokens: int
    pad_id: int
    sampler_impl: str
    attention_impl: str
    may_truncate: bool = True  # False: no row has top-k/top-p on (sampler compiled without them)

    @property
    def completion_pages(self) -> int:
        """Cp: pages a row's completion may need (its last token's K/V is never written)."""
        return -(-(self.max_new_tokens - 1) // self.page_size) if self.max_new_tokens > 1 else 0

    @property
    def table_width(self) -> int:
        return self.prompt_pages + self.completion_pages


def _layer_params(params: Params, layer: jax.Array) -> Params:
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, layer, keepdims=False), params["blocks"])


def _run_layers(params, cfg, x, positions, pool, attend_fn):
    """x [B, T, D] through every layer; ``attend_fn(layer, pool, q, k, v) -> (out, pool)``."""
    inv_freq = rope_inverse_frequencies(cfg)

    def layer(i, carry):
        x, pool = carry
        x, pool = _block(cfg, inv_freq, x, _layer_params(params, i), positions,
                         functools.partial(attend_fn, i, pool))
        return x, pool

    x, pool = lax.fori_loop(0, cfg.num_layers, layer, (x, pool))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), pool


def paged_decode_step(params, plan: EnginePlan, pool, tokens, positions, tables, starts, write_slot,
                    decoding):
    """One token per slot: write its K/V at logical ``write_slot`` and attend to [start, slot].

    tokens / positions / starts / write_slot int32 [S], tables int32 [S, W], decoding bool [S]
    (idle slots write to the trash page and attend to nothing). Returns hidden [S, D], pool."""
    page, num_pages = plan.page_size, plan.pages
    rows = jnp.arange(tables.shape[0])
    page_ids = jnp.where(decoding, tables[rows, write_slot // page], pc.trash_page(num_pages))
    ends = jnp.where(decoding, write_slot + 1, starts)
    impl = plan.attention_impl

    def attend(layer, pool, q, k, v):
        base = layer * num_pages
        pool = pool._replace(k=pc.write_tokens(pool.k, base, page_ids, write_slot % page, k[:, 0]),
                             v=pc.write_tokens(pool.v, base, page_ids, write_slot % page, v[:, 0]))
        out = paged_attention(q[:, 0], pool.k, pool.v, tables + base, starts, ends, impl=impl)
        return out[:, None], pool

    x = embed(params, plan.model_cfg, tokens[:, None])
    hidden, pool = _run_layers(params, plan.model_cfg, x, positions[:, None], pool, attend)
    return hidden[:, 0], pool


def paged_prefill_chunk(params, plan: EnginePlan, pool, prompt_row, table_row, prompt_len, chunk):
    """Chunk ``chunk`` of one prompt: logical slots [chunk * C, chunk * C + C) of its pages.

    prompt_row int32 [Pp * page + C]: the prompt left-padded to ``Pp * page``, then padding;
    table_row int32 [Pp + C / page] (trash past the prompt's pages); prompt_len: real tokens.
    The prompt occupies logical slots [start, n_pp * page), start = n_pp * page - prompt_len.
    Returns hidden [C, D] (row j = logical slot chunk * C + j) and the pool."""
    cfg, page, c = plan.model_cfg, plan.page_size, plan.prefill_chunk
    prompt_slots = -(-prompt_len // page) * page
    start = prompt_slots - prompt_len
    offset = plan.prompt_pages * page - prompt_slots
    first = chunk * c
    tokens = lax.dynamic_slice_in_dim(prompt_row, offset + first, c)
    query_slot = first + jnp.arange(c)
    positions = jnp.maximum(query_slot - start, 0)
    chunk_pages = lax.dynamic_slice_in_dim(table_row, first // page, c // page)
    key_slot = jnp.arange(plan.prompt_pages * page)
    mask = (key_slot[None, :] >= start) & (key_slot[None, :] <= query_slot[:, None])
    tables = table_row[None, :plan.prompt_pages]

    def attend(layer, pool, q, k, v):
        base = layer * plan.pages
        shape = (c // page, page) + k.shape[2:]
        pool = pool._replace(k=pc.write_pages(pool.k, base, chunk_pages, k[0].reshape(shape)),
                             v=pc.write_pages(pool.v, base, chunk_pages, v[0].reshape(shape)))
        keys = gather_pages(pool.k, tables + base).astype(q.dtype)
        values = gather_pages(pool.v, tables + base).astype(q.dtype)
        return attention(q, keys, values, mask[None]), pool

    x = embed(params, cfg, tokens[None])
    hidden, pool = _run_layers(params, cfg, x, positions[None], pool, attend)
    return hidden[0], pool
