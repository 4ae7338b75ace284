"""Long-tail rollouts: the continuous backend (paged KV, continuous batching) vs the static engine.

Usage: python benchmarks/bench_continuous.py [--prompts 64] [--samples 8] [--prompt-len 64]
           [--long 1024] [--short-by 128] [--long-frac 0.1] [--slots 64] [--uniform]
           [--repeats 1]

Model: the tiny Qwen3 shape of ``bench_sampling.py`` (vocab 4096, hidden 256, 4 layers, 4 q
heads, 2 kv heads, head_dim 64, float32), random weights. Lengths are driven per row:

* stop ids: ``round(p * V)`` token ids whose ``lm_head`` columns are zeroed, so their logit is
  exactly 0 while the largest of the other ~4000 logits is always > 0. p is set so that a T = 1
  row stops by ``--short-by`` tokens with probability 0.99.
* a ``--long-frac`` share of the rows (spread over all prompts: row r is long iff
  ``r % round(1 / long_frac) == round(1 / long_frac) - 1``) is greedy: it never emits a stop id
  and runs to ``--long`` tokens; every other row samples at T = 1 and stops early.
* ``--uniform``: no stop ids, every row runs to ``--short-by`` tokens (``--long`` ignored).

The realised length distribution is printed. tokens/s = generated tokens (sum of row lengths,
the same for both engines: they draw identical tokens) / seconds, compile excluded (one warm-up
call each). KV bytes: static = its whole cache (rows x (prompt bucket + decode bucket) slots);
continuous = the allocated page pool, and the peak of pages in use.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_sampling import bench_model_config
from jaxrl.models.transformer import init_params
from jaxrl.sampling import paged_cache
from jaxrl.sampling.continuous import ContinuousBackend
from jaxrl.sampling.engine import SamplingConfig, generate_from_params
from jaxrl.sampling.static import bucket_size


def _time(fn, repeats):
    """(first-call seconds incl. compile, median seconds of ``repeats`` later calls, last output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--short-by", type=int, default=128)
    parser.add_argument("--long-frac", type=float, default=0.1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    cfg = bench_model_config()
    params = init_params(cfg, jax.random.key(0))
    rows = args.prompts * args.samples
    if args.uniform:
        stop_ids, new_tokens = (), args.short_by
        temperature = np.ones(rows, np.float32)
    else:
        new_tokens = args.long
        rate = 1.0 - 0.01 ** (1.0 / args.short_by)  # P(stop by short_by) = 0.99 at T = 1
        stop_ids = tuple(range(3, 3 + max(1, round(rate * cfg.vocab_size))))
        params["lm_head"] = params["lm_head"].at[:, jnp.asarray(stop_ids)].set(0.0)
        every = round(1 / args.long_frac)
        temperature = np.where(np.arange(rows) % every == every - 1, 0.0, 1.0).astype(np.float32)
    rng = np.random.default_rng(0)
    low = 3 + len(stop_ids)
    prompts = rng.integers(low, cfg.vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)
    lengths = np.full((args.prompts,), args.prompt_len, np.int32)
    sampling = SamplingConfig(max_prompt_tokens=args.prompt_len, max_new_tokens=new_tokens,
                              temperature=1.0, stop_token_ids=stop_ids, impl="reference")
    key = jax.random.key(1)

    continuous = ContinuousBackend(cfg, sampling, None, slots=args.slots, page_size=args.page_size)
    static_first, static_s, static_out = _time(
        lambda: generate_from_params(params, cfg, prompts, lengths, args.samples, sampling, key,
                                     temperature=jnp.asarray(temperature)), args.repeats)
    cont_first, cont_s, cont_out = _time(
        lambda: continuous.generate(params, prompts, lengths, args.samples, key, temperature=temperature),
        args.repeats)
    same = bool(np.array_equal(np.asarray(static_out.tokens), np.asarray(cont_out.tokens)))
    row_lengths = np.asarray(cont_out.lengths)
    generated = int(row_lengths.sum())
    static_slots = bucket_size(args.prompt_len, sampling.min_prompt_bucket) + bucket_size(
        new_tokens, sampling.min_new_tokens_bucket)
    static_bytes = paged_cache.pool_bytes(cfg, rows * static_slots, 1)
    stats = continuous.last_stats

    print(f"backend={jax.default_backend()} rows={args.prompts}x{args.samples} prompt={args.prompt_len} "
          f"{'uniform ' + str(args.short_by) if args.uniform else f'long={args.long} short-by={args.short_by}'} "
          f"slots={args.slots} page={args.page_size} stop_ids={len(stop_ids)} repeats={args.repeats}")
    print(f"lengths: mean {row_lengths.mean():.1f}, <= {args.short_by}: {np.mean(row_lengths <= args.short_by):.3f}, "
          f"== {new_tokens}: {np.mean(row_lengths == new_tokens):.3f}; generated tokens {generated}; "
          f"identical tokens: {same}; continuous iterations {stats['iterations']}")
    print(f"| {'engine':<11} | {'tokens/s':>9} | {'seconds':>8} | {'first call s':>12} | {'KV bytes (MiB)':>16} |")
    print(f"|{'-' * 13}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 18}|")
    mib = 1 / 2**20
    print(f"| {'static':<11} | {generated / static_s:>9.0f} | {static_s:>8.2f} | {static_first:>12.2f} | "
          f"{static_bytes * mib:>16.1f} |")
    print(f"| {'continuous':<11} | {generated / cont_s:>9.0f} | {cont_s:>8.2f} | {cont_first:>12.2f} | "
          f"{stats['pool_kv_bytes'] * mib:>7.1f} pool, {stats['peak_kv_bytes'] * mib:.1f} peak |")
    print(f"speed-up {static_s / cont_s:.2f}x; KV pool / static {stats['pool_kv_bytes'] / static_bytes:.3f}, "
          f"peak / static {stats['peak_kv_bytes'] / static_bytes:.3f}")
    assert math.isfinite(static_s)


if __name__ == "__main__":
    main()
