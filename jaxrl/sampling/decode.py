"""The engine's decode loop: one token per row per step, KV cache updated in place.

Cache layout here is head-major and layer-stacked, k, v [L, B, K, S, hd] (see
:func:`jaxrl.sampling.kv_cache.fan_out`): each (row, kv head) holds its slots contiguously,
so decode attention is one batched matmul over B * K (:func:`jaxrl.kernels.attention.
decode_attention_heads`). The layer loop carries the whole cache and writes the new slot with
one ``dynamic_update_slice`` per layer, which XLA does in place (a layer scan with the cache
as scan input/output would write a fresh cache every step).

Live length: row r attends to slots ``[start_r, P_b + step)`` (its left-padded prompt and the
tokens fed so far), so no validity mask is built. On the jnp path the loop runs in phases of
static attention windows (:func:`attention_windows`): while ``P_b + step <= w`` attention
reads only slots ``< w``, so the cost of a step follows the filled length, not the bucket.
The Pallas kernel skips blocks past each row's end by itself and runs one phase.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl.kernels.attention import decode_attention_heads
from jaxrl.kernels.noise import make_key_data
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import Params, _block, embed, logits_from_hidden, rms_norm, rope_inverse_frequencies
from jaxrl.types import FINISH_LENGTH, FINISH_STOP

MIN_WINDOW = 128  # smallest attention window (slots) of the phased jnp decode loop


def attention_windows(prompt_width: int, total_slots: int, phased: bool = True) -> tuple[int, ...]:
    """Static attention widths of the decode phases, ascending: powers of two from MIN_WINDOW
    that leave room for at least one decode step (> prompt_width), then ``total_slots``.
    ``phased=False`` gives one phase over every slot (the Pallas kernel bounds by itself)."""
    windows = []
    width = MIN_WINDOW
    while phased and width < total_slots:
        if width > prompt_width:
            windows.append(width)
        width *= 2
    return tuple(windows) + (total_slots,)


def decode_hidden(params: Params, cfg: ModelConfig, token: jax.Array, position: jax.Array,
                  k_cache: jax.Array, v_cache: jax.Array, row_start: jax.Array, slot: jax.Array,
                  *, window: int, attention_impl: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feed one token per row: final-normed hidden [B, D] and the caches with slot ``slot`` set.

    token, position, row_start int32 [B]; k_cache, v_cache [L, B, K, S, hd]; slot int32 scalar
    (the new token's slot; row r then attends to ``[row_start_r, slot]``); window: static bound
    > slot on the slots attention reads (jnp path).
    """
    num_rows = token.shape[0]
    kv_heads, head_dim = cfg.num_kv_heads, cfg.head_dim
    group = cfg.num_heads // kv_heads
    inv_freq = rope_inverse_frequencies(cfg)
    end = jnp.broadcast_to(slot + 1, (num_rows,))

    def layer(carry, p):
        x, k_all, v_all, index = carry

        def attend(q, k, v):
            at = (index, 0, 0, slot, 0)
            k_new = lax.dynamic_update_slice(k_all, k.transpose(0, 2, 1, 3)[None].astype(k_all.dtype), at)
            v_new = lax.dynamic_update_slice(v_all, v.transpose(0, 2, 1, 3)[None].astype(v_all.dtype), at)
            bounds = jnp.stack([row_start, end, jnp.broadcast_to(index, (num_rows,))], axis=1)
            out = decode_attention_heads(q[:, 0].reshape(num_rows, kv_heads, group, head_dim), k_new, v_new,
                                         bounds, impl=attention_impl, window=window)
            return out.reshape(num_rows, 1, cfg.num_heads, head_dim), (k_new, v_new)

        x, (k_all, v_all) = _block(cfg, inv_freq, x, p, position[:, None], attend)
        return (x, k_all, v_all, index + 1), None

    init = (embed(params, cfg, token[:, None]), k_cache, v_cache, jnp.int32(0))
    (x, k_cache, v_cache, _), _ = lax.scan(layer, init, params["blocks"])
    return rms_norm(x[:, 0], params["final_norm"], cfg.rms_norm_eps), k_cache, v_cache


def decode_loop(params: Params, cfg: ModelConfig, k_cache: jax.Array, v_cache: jax.Array,
                first_logits: jax.Array, row_start: jax.Array, prompt_lengths: jax.Array,
                row_active: jax.Array, key: jax.Array, is_stop_token: jax.Array, limit: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, prompt_width: int,
                budget: int, pad_id: int, sampler_impl: str, attention_impl: str,
                compute_entropy: bool, windows: tuple[int, ...]):
    """Sample up to ``limit`` (<= budget) tokens per row; stop per row on a stop token.

    k_cache, v_cache [L, B, K, P_b + budget, hd] (prompt in slots < P_b); first_logits f32
    [B, V]; row_start int32 [B] = P_b - prompt length; prompt_lengths int32 [B]; row_active
    bool [B] (False = bucket padding, done from the start); is_stop_token bool [V]; per-row
    controls temperature/top_p f32 [B], top_k int32 [B]. Returns tokens int32, logprobs f32,
    entropies f32 (zeros when not ``compute_entropy``) [B, budget], lengths, finish [B].
    windows: the phases' attention widths (:func:`attention_windows`, last = P_b + budget).
    The loop exits when every row is done.
    """
    num_rows = row_start.shape[0]
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               impl=sampler_impl, compute_entropy=compute_entropy)

    def record(state, step, token, logprob, entropy):
        active = ~state["done"]
        token = jnp.where(active, token, pad_id)

        def put(buffer, column):
            return lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1)

        stopped = active & is_stop_token[token]
        return dict(
            state,
            last_token=token,
            tokens=put(state["tokens"], token),
            logprobs=put(state["logprobs"], jnp.where(active, logprob, 0.0)),
            entropies=put(state["entropies"], jnp.where(active, entropy, 0.0)),
            lengths=state["lengths"] + active.astype(jnp.int32),
            finish=jnp.where(stopped, FINISH_STOP, state["finish"]),
            done=state["done"] | stopped | (step + 1 >= limit),
        )

    state = dict(
        step=jnp.int32(1), k=k_cache, v=v_cache,
        last_token=jnp.zeros((num_rows,), jnp.int32),
        tokens=jnp.full((num_rows, budget), pad_id, jnp.int32),
        logprobs=jnp.zeros((num_rows, budget), jnp.float32),
        entropies=jnp.zeros((num_rows, budget), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32),
        finish=jnp.full((num_rows,), FINISH_LENGTH, jnp.int32),
        done=~row_active,
    )
    state = record(state, 0, *sample(first_logits, make_key_data(key, 0)))

    def step_fn(window):
        def decode_step(state):
            step = state["step"]
            # Feed completion token step-1 into slot P_b + step - 1.
            hidden, k_new, v_new = decode_hidden(
                params, cfg, state["last_token"], prompt_lengths + step - 1, state["k"], state["v"],
                row_start, prompt_width + step - 1, window=window, attention_impl=attention_impl)
            logits = logits_from_hidden(params, cfg, hidden)
            state = record(dict(state, k=k_new, v=v_new), step, *sample(logits, make_key_data(key, step)))
            return dict(state, step=step + 1)
        return decode_step

    for window in windows:
        def keep_going(state, window=window):
            return (state["step"] < limit) & (prompt_width + state["step"] <= window) & ~jnp.all(state["done"])

        state = lax.while_loop(keep_going, step_fn(window), state)
    return state["tokens"], state["logprobs"], state["entropies"], state["lengths"], state["finish"]
