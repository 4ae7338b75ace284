"""Generated tokens/s of the sampling engine vs a naive sampler.

Usage: python benchmarks/bench_sampling.py [--prompts 8] [--samples 8] [--prompt-len 64]
           [--new-tokens 128] [--repeats 3] [--impl auto]

Model: tiny Qwen3-shaped decoder (vocab 4096, hidden 256, 4 layers, 4 q heads, 2 kv heads,
head_dim 64), random weights. T = 1, no stop tokens, so every row generates exactly
``new_tokens`` tokens and tokens/s = rows * new_tokens / seconds. Compile time is excluded
(one warm-up call each) and printed separately.

Rows:
  naive   per-sample prefill (prompts * samples rows, no fan-out), then a Python loop over
          decode steps, each a jitted call: one-token forward with the KV cache, then unfused
          sampling (jax.random.categorical, then a separate log_softmax and entropy).
  engine  jaxrl.sampling.engine.generate_from_params: prefill each prompt once, fan the cache
          out to its samples, fused sampler, the whole decode in one jitted while_loop.
  engine (n=1, prompts repeated)  the engine without fan-out: every sample is its own prompt.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (
    decoder_hidden_with_cache,
    init_kv_cache,
    init_params,
    logits_from_hidden,
    positions_from_mask,
)
from jaxrl.sampling.engine import SamplingConfig, generate_from_params


def bench_model_config() -> ModelConfig:
    """The tiny Qwen3-shaped model of the issue (float32)."""
    return ModelConfig(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=768,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True,
                       eos_token_id=2, pad_token_id=0)


@functools.partial(jax.jit, static_argnames=("cfg", "total_slots"))
def _naive_prefill(params, cfg, tokens, mask, *, total_slots):
    """Prefill every row (no fan-out) into a cache of ``total_slots``; last-token logits."""
    cache = init_kv_cache(cfg, tokens.shape[0], total_slots)
    valid = jnp.pad(mask, ((0, 0), (0, total_slots - mask.shape[1])))
    hidden, cache = decoder_hidden_with_cache(params, cfg, tokens, positions_from_mask(mask), cache,
                                              jnp.int32(0), valid)
    return cache, logits_from_hidden(params, cfg, hidden[:, -1])


def _unfused_sample(logits, key, temperature):
    """categorical sample + separate log_softmax / entropy passes: (tokens, logprobs, entropies)."""
    scaled = logits / temperature
    tokens = jax.random.categorical(key, scaled, axis=-1)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], entropy


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _naive_step(params, cfg, cache, token, position, slot, valid, key, temperature):
    hidden, cache = decoder_hidden_with_cache(params, cfg, token[:, None], position[:, None], cache,
                                              slot, valid)
    return (cache,) + _unfused_sample(logits_from_hidden(params, cfg, hidden[:, 0]), key, temperature)


def naive_generate(params, cfg, tokens, mask, new_tokens, key, temperature=1.0):
    """Baseline sampler over already-repeated rows; returns tokens, logprobs, entropies [B, T]."""
    width = tokens.shape[1]
    cache, logits = _naive_prefill(params, cfg, tokens, mask, total_slots=width + new_tokens)
    lengths = mask.sum(1)
    valid = jnp.pad(mask, ((0, 0), (0, new_tokens)))
    token, logprob, entropy = _unfused_sample(logits, jax.random.fold_in(key, 0), temperature)
    outputs = [(token, logprob, entropy)]
    for step in range(1, new_tokens):
        slot = width + step - 1
        valid = valid.at[:, slot].set(True)
        cache, token, logprob, entropy = _naive_step(
            params, cfg, cache, token, lengths + step - 1, jnp.int32(slot), valid,
            jax.random.fold_in(key, step), jnp.float32(temperature))
        outputs.append((token, logprob, entropy))
    return tuple(jnp.stack(column, axis=1) for column in zip(*outputs))


def _time(fn, repeats):
    """(first-call seconds incl. compile, median seconds of ``repeats`` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    args = parser.parse_args()

    cfg = bench_model_config()
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)
    lengths = np.full((args.prompts,), args.prompt_len, np.int32)
    rows = args.prompts * args.samples
    sampling = SamplingConfig(max_prompt_tokens=args.prompt_len, max_new_tokens=args.new_tokens,
                              temperature=1.0, stop_token_ids=(), impl=args.impl)
    key = jax.random.key(1)

    repeated = jnp.asarray(np.repeat(prompts, args.samples, axis=0))
    mask = jnp.ones(repeated.shape, bool)
    results = [
        ("naive (per-sample prefill, unfused sampling, step loop)",
         _time(lambda: naive_generate(params, cfg, repeated, mask, args.new_tokens, key), args.repeats)),
        ("engine (n=1, prompts repeated: no fan-out)",
         _time(lambda: generate_from_params(params, cfg, repeated, np.repeat(lengths, args.samples), 1,
                                            sampling, key).tokens, args.repeats)),
        ("engine (prefill once, fan-out, fused sampler)",
         _time(lambda: generate_from_params(params, cfg, prompts, lengths, args.samples, sampling,
                                            key).tokens, args.repeats)),
    ]
    generated = rows * args.new_tokens
    print(f"backend={jax.default_backend()} impl={args.impl} rows={args.prompts}x{args.samples} "
          f"prompt={args.prompt_len} new={args.new_tokens} T=1 (median of {args.repeats})")
    print(f"| {'sampler':<55} | {'tokens/s':>9} | {'seconds':>8} | {'first call s':>12} |")
    print(f"|{'-' * 57}|{'-' * 11}|{'-' * 10}|{'-' * 14}|")
    for name, (first, seconds) in results:
        print(f"| {name:<55} | {generated / seconds:>9.0f} | {seconds:>8.3f} | {first:>12.2f} |")


if __name__ == "__main__":
    main()
