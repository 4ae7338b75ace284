"""Decode-step time vs cache fill: cost follows the filled length, not the bucket (issue 13.2).

Usage: python benchmarks/bench_decode_fill.py [--rows 16] [--slots 4096] [--steps 16] [--repeats 5]
           [--shape small]

One engine decode step (``jaxrl.sampling.decode.decode_hidden`` + lm head + fused sampler,
T = 1) on a ``--slots``-slot bucket, timed at 12.5%, 25%, 50% and 100% fill: the
new token goes to slot ``fill * slots - 1`` and attention reads the window the engine's phased
loop uses there (``attention_windows``). "full bucket" reads every slot at the same fill (what
the engine did before the live-length bound). The cache is donated, so a call writes it in place
(no per-call copy). Each number: a jitted ``fori_loop`` of
``--steps`` steps, median of ``--repeats`` calls, ms per step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.bench_sampling import bench_model_config
from jaxrl.kernels.noise import make_key_data
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.transformer import init_params, logits_from_hidden
from jaxrl.sampling.decode import attention_windows, decode_hidden, layer_params


def step_ms(params, cfg, rows: int, slots: int, slot: int, window: int, steps: int, repeats: int) -> float:
    """ms per decode step writing ``slot`` and attending over ``window`` slots (the engine's
    phase layout: one [rows * K, window, hd] buffer per layer; ``slots`` only names the bucket)."""
    shape = (rows * cfg.num_kv_heads, window, cfg.head_dim)
    k = tuple(jnp.full(shape, 0.01, jnp.float32) for _ in range(cfg.num_layers))
    v = tuple(jnp.full(shape, 0.02, jnp.float32) for _ in range(cfg.num_layers))
    ones = jnp.ones((rows,), jnp.float32)
    layers = layer_params(params)

    @functools.partial(jax.jit, donate_argnums=(1, 2))  # the cache is updated in place
    def run(token, k, v):
        def body(i, carry):
            token, k, v = carry
            hidden, k, v = decode_hidden(params, cfg, token, jnp.full((rows,), slot, jnp.int32), k, v,
                                         jnp.zeros((rows,), jnp.int32), jnp.int32(slot),
                                         attention_impl="reference", layers=layers)
            tok, _, _ = sample_tokens(logits_from_hidden(params, cfg, hidden), make_key_data(jax.random.key(0), i),
                                      ones, jnp.zeros((rows,), jnp.int32), ones, impl="reference")
            return tok, k, v
        return lax.fori_loop(0, steps, body, (token, k, v))

    state = jax.block_until_ready(run(jnp.zeros((rows,), jnp.int32), k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(run(*state))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="small")
    args = parser.parse_args()
    cfg = bench_model_config(args.shape)
    params = init_params(cfg, jax.random.key(0))
    windows = attention_windows(16, args.slots)
    print(f"backend={jax.default_backend()} shape={args.shape} rows={args.rows} slots={args.slots} "
          f"windows={windows} (median of {args.repeats}, {args.steps} steps per call)")
    print("| fill | slot | window read | ms/step (live bound) | ms/step (full bucket) | live / 100% live |")
    print("|-----:|-----:|------------:|---------------------:|----------------------:|-----------------:|")
    rows = []
    for fill in (0.125, 0.25, 0.5, 1.0):
        slot = int(fill * args.slots) - 1
        window = next(w for w in windows if slot + 1 <= w)
        live = step_ms(params, cfg, args.rows, args.slots, slot, window, args.steps, args.repeats)
        full = step_ms(params, cfg, args.rows, args.slots, slot, args.slots, args.steps, args.repeats)
        rows.append((fill, slot, window, live, full))
    top = rows[-1][3]
    for fill, slot, window, live, full in rows:
        print(f"| {fill:>4.0%} | {slot:>4} | {window:>11} | {live:>20.2f} | {full:>21.2f} | {live / top:>16.2f} |")


if __name__ == "__main__":
    main()
