"""Per-step profile of the engine's decode loop, by ablation, beside the FLOP and byte floors.

Usage: python benchmarks/profile_decode.py [--shape small|deep] [--rows 64] [--prompt-len 64]
           [--new-tokens 128] [--steps 32] [--repeats 5]

Model: a Qwen3 shape of ``bench_sampling.py`` (small: V 4096, d 256, 4 layers, 4 q / 2 kv
heads, hd 64; deep: d 128, 28 layers, hd 32), float32, T = 1, no stop. Cache slots S = bucket(prompt) + bucket(new tokens).

Rows (ms per decode step; each part is a jitted ``fori_loop`` of ``--steps`` iterations, so
dispatch is amortised, median of ``--repeats`` calls):

  engine step        (engine at --new-tokens) - (engine at 1 new token), / (new - 1): the real
                     per-step cost of ``generate_from_params``, prefill and host work excluded
  layer matmuls      the L decoder blocks on one token with attention replaced by identity
  attention, S slots jnp GQA attention of one query over all S slots, L layers
  attention, live    the same over the live prefix only (S/2 slots: the mean fill of a run)
  attention head-major  the engine's ``decode_attention_heads`` (jnp path) on its [L, B, K, S, hd]
                     cache, all slots and the live prefix (present after issue 15)
  attention per-layer  the same attention on one [B * K, W, hd] buffer per layer (the engine's
                     layout after the deep-shape work: no per-layer slice copy), slot written
                     in place first, W = all slots and the live prefix
  cache update, copy the layer scan with the cache as scan xs/ys (a fresh [L,B,S,K,hd] per step)
  cache update, in place  per-layer dynamic_update_slice of one slot on a carried cache
  lm head            logits = h @ W_out [B, V]
  sampler (+entropy) the fused sampler's jnp reference at T = 1
  sampler (no entropy)  the same with ``compute_entropy=False`` (when the build has it)
  bookkeeping        full-width validity mask + 3 buffer writes + stop/done flags

Floors: FLOPs of one step (2 per MAC: projections, MLP, head, attention over the live prefix)
at the measured matmul rate of this machine, and bytes (weights + live KV cache read once) at
the measured read bandwidth; the floor is the larger of the two. The 1-minute load average
is printed (other processes share the cores).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.bench_sampling import bench_model_config

try:  # absent before issue 15: the profile also runs on the old engine for the "before" table
    from jaxrl.kernels.attention import decode_attention_heads
except ImportError:
    decode_attention_heads = None
from jaxrl.kernels.noise import make_key_data
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.transformer import (
    _block,
    attention,
    embed,
    init_params,
    logits_from_hidden,
    rope_inverse_frequencies,
)
from jaxrl.sampling.engine import SamplingConfig, bucket_size, generate_from_params


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _looped(body, init, steps: int):
    """A jitted callable running ``body(i, carry)`` ``steps`` times."""
    run = jax.jit(lambda c: lax.fori_loop(0, steps, body, c))
    return lambda: run(init)


def machine_rates(repeats: int) -> tuple[float, float]:
    """(matmul GFLOP/s at [64, 1024] x [1024, 4096] float32, read GB/s summing 64 MiB)."""
    a = jnp.ones((64, 1024), jnp.float32)
    w = jnp.ones((1024, 4096), jnp.float32) * 1e-3
    mm = jax.jit(lambda a, w: lax.fori_loop(0, 8, lambda i, x: x + (x @ w)[:, :1024] * 1e-6, a))
    flops = 8 * 2 * 64 * 1024 * 4096 / _median_seconds(lambda: mm(a, w), repeats)
    big = jnp.ones((16 * 2**20,), jnp.float32)
    bandwidth = big.nbytes / _median_seconds(lambda: jax.jit(jnp.sum)(big), repeats)
    return flops / 1e9, bandwidth / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=["small", "deep"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = bench_model_config(args.shape)
    params = init_params(cfg, jax.random.key(0))
    rows, steps = args.rows, args.steps
    slots = bucket_size(args.prompt_len, 16) + bucket_size(args.new_tokens, 16)
    live = slots // 2
    L, K, H, hd, d, V = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    inv_freq = rope_inverse_frequencies(cfg)
    tokens = jnp.arange(rows, dtype=jnp.int32)[:, None] % V
    positions = jnp.full((rows, 1), args.prompt_len, jnp.int32)
    x0 = embed(params, cfg, tokens)
    cache = jnp.ones((L, rows, slots, K, hd), jnp.float32) * 0.01
    parts: list[tuple[str, float]] = []

    # Engine end to end: per-step cost from two call lengths.
    prompts = np.random.default_rng(0).integers(3, V, (rows // 8, args.prompt_len)).astype(np.int32)
    lengths = np.full((rows // 8,), args.prompt_len, np.int32)

    def engine_seconds(new):
        sc = SamplingConfig(max_prompt_tokens=args.prompt_len, max_new_tokens=new, temperature=1.0,
                            stop_token_ids=())
        return _median_seconds(lambda: generate_from_params(params, cfg, prompts, lengths, 8, sc,
                                                            jax.random.key(1)).tokens, args.repeats)

    full, one = engine_seconds(args.new_tokens), engine_seconds(1)
    parts.append(("engine step (end to end)", (full - one) / (args.new_tokens - 1)))

    def blocks_no_attention(i, x):
        def layer(x, p):
            return _block(cfg, inv_freq, x, p, positions, lambda q, k, v: (q, None))[0], None
        return lax.scan(layer, x, params["blocks"])[0] * 0.5

    parts.append(("layer matmuls (no attention)", _median_seconds(_looped(blocks_no_attention, x0, steps), args.repeats) / steps))

    q0 = jnp.ones((rows, 1, H, hd), jnp.float32)

    def attention_over(width):
        mask = jnp.ones((rows, 1, width), bool)

        def body(i, q):
            def layer(q, kv):
                return attention(q, kv[:, :width], kv[:, :width], mask) * 0.5 + q, None
            return lax.scan(layer, q, cache)[0]
        return body

    parts.append((f"attention, all {slots} slots", _median_seconds(_looped(attention_over(slots), q0, steps), args.repeats) / steps))
    parts.append((f"attention, live {live} slots", _median_seconds(_looped(attention_over(live), q0, steps), args.repeats) / steps))

    if decode_attention_heads is not None:  # the engine's layout: [L, B, K, S, hd], one batch axis
        heads_cache = jnp.ones((L, rows, K, slots, hd), jnp.float32) * 0.01
        qh = jnp.ones((rows, K, H // K, hd), jnp.float32)

        def heads_over(width):
            def body(i, q):
                def layer(l, q):
                    bounds = jnp.stack([jnp.zeros((rows,), jnp.int32), jnp.full((rows,), width, jnp.int32),
                                        jnp.full((rows,), l, jnp.int32)], axis=1)
                    return decode_attention_heads(q, heads_cache, heads_cache, bounds, impl="reference",
                                                  window=width) * 0.5 + q
                return lax.fori_loop(0, L, layer, q)
            return body

        for width, label in ((slots, f"all {slots}"), (live, f"live {live}")):
            parts.append((f"attention head-major, {label}", _median_seconds(_looped(heads_over(width), qh, steps), args.repeats) / steps))

        def per_layer(width):
            buffers = tuple(jnp.ones((rows * K, width, hd), jnp.float32) * 0.01 for _ in range(L))
            new_kv = jnp.ones((rows * K, 1, hd), jnp.float32)
            bounds = jnp.stack([jnp.zeros((rows,), jnp.int32), jnp.full((rows,), width, jnp.int32),
                                jnp.zeros((rows,), jnp.int32)], axis=1)

            def body(i, carry):
                q, caches = carry
                out = []
                for cache_l in caches:  # as the engine: update in place, then read the whole buffer
                    cache_l = lax.dynamic_update_slice(cache_l, new_kv * q[0, 0, 0, 0], (0, i, 0))
                    shaped = cache_l.reshape(1, rows, K, width, hd)
                    q = decode_attention_heads(q, shaped, shaped, bounds, impl="reference") * 0.5 + q
                    out.append(cache_l)
                return q, tuple(out)
            return _looped(body, (qh, buffers), steps)

        for width, label in ((slots, f"all {slots}"), (live, f"live {live}")):
            parts.append((f"attention per-layer, {label}", _median_seconds(per_layer(width), args.repeats) / steps))

    new_kv = jnp.ones((rows, 1, K, hd), jnp.float32)

    def cache_copy(i, c):
        def layer(_, layer_cache):
            return None, lax.dynamic_update_slice_in_dim(layer_cache, new_kv, i, axis=1)
        return lax.scan(layer, None, c)[1]

    def cache_in_place(i, c):
        return lax.fori_loop(0, L, lambda l, c: lax.dynamic_update_slice(c, new_kv[None], (l, 0, i, 0, 0)), c)

    for name, body in (("cache update, copy (scan ys)", cache_copy), ("cache update, in place", cache_in_place)):
        # k and v: two caches per step.
        parts.append((name, 2 * _median_seconds(_looped(body, cache, steps), args.repeats) / steps))

    h0 = jnp.ones((rows, d), jnp.float32)
    parts.append(("lm head", _median_seconds(_looped(lambda i, h: h + logits_from_hidden(params, cfg, h)[:, :d] * 1e-6, h0, steps), args.repeats) / steps))

    key = jax.random.key(3)
    ones = jnp.ones((rows,), jnp.float32)
    has_switch = "compute_entropy" in inspect.signature(sample_tokens).parameters
    logits0 = jax.random.normal(jax.random.key(2), (rows, V))
    for name, extra in (("sampler, T=1 (+entropy)", {}), ("sampler, T=1 (no entropy)", {"compute_entropy": False})):
        if extra and not has_switch:
            continue
        sample = functools.partial(sample_tokens, **extra)

        def sampler_body(i, z, sample=sample):
            tok, lp, ent = sample(z, make_key_data(key, i), ones, jnp.zeros((rows,), jnp.int32), ones)
            return z + (lp + ent + tok)[:, None] * 1e-9
        parts.append((name, _median_seconds(_looped(sampler_body, logits0, steps), args.repeats) / steps))

    prompt_mask = jnp.ones((rows, args.prompt_len), bool)
    budget = slots - args.prompt_len
    new_slot = jnp.arange(budget)[None, :]

    def bookkeeping(i, state):
        buf, lp, done, valid_sum = state
        valid = jnp.concatenate([prompt_mask, jnp.broadcast_to(new_slot < i, (rows, budget))], axis=1)
        tok = jnp.full((rows,), i, jnp.int32)
        put = lambda b, col: lax.dynamic_update_slice_in_dim(b, col[:, None], i, axis=1)
        return (put(buf, tok), put(lp, tok.astype(jnp.float32)), done | (tok == 7),
                valid_sum + valid.sum(1))

    init = (jnp.zeros((rows, budget), jnp.int32), jnp.zeros((rows, budget), jnp.float32),
            jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32))
    parts.append(("bookkeeping (mask + buffers)", _median_seconds(_looped(bookkeeping, init, steps), args.repeats) / steps))

    gflops, gbps = machine_rates(args.repeats)
    macs = L * (d * (H * hd + 2 * K * hd) + H * hd * d + 3 * d * cfg.intermediate_size) + d * V
    flop = 2 * rows * macs + 4 * rows * L * H * hd * live
    weight_bytes = 4 * (L * (d * (H * hd + 2 * K * hd) + H * hd * d + 3 * d * cfg.intermediate_size) + d * V)
    cache_bytes = 4 * 2 * L * rows * live * K * hd
    flop_ms, byte_ms = flop / gflops / 1e6, (weight_bytes + cache_bytes) / gbps / 1e6
    print(f"backend={jax.default_backend()} shape={args.shape} rows={rows} slots={slots} (live mean {live}) "
          f"steps/call={steps} median of {args.repeats}; machine: {gflops:.0f} GFLOP/s matmul, "
          f"{gbps:.1f} GB/s read; load {os.getloadavg()[0]:.2f}")
    print(f"| {'part':<34} | {'ms/step':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    for name, seconds in parts:
        print(f"| {name:<34} | {seconds * 1e3:>8.2f} |")
    print(f"| {'FLOP floor (%.2f GFLOP)' % (flop / 1e9):<34} | {flop_ms:>8.2f} |")
    print(f"| {'byte floor (%.1f MB)' % ((weight_bytes + cache_bytes) / 1e6):<34} | {byte_ms:>8.2f} |")


if __name__ == "__main__":
    main()
