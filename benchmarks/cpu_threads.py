"""How many CPU cores one XLA:CPU program uses, and what two Python threads buy (issue 15 lead).

A deep narrow chain like the deep sampler shape's layers (28 x [64 rows, d 128] -> 384 -> 128
matmuls with a tanh, 128 steps in a ``fori_loop``) run four ways: 64 rows in one program;
two independent 32-row chains in one program; two 32-row calls dispatched back to back (async
dispatch); two 32-row calls on two Python threads. Prints seconds per call and cores used
(process CPU time / wall time).

Usage: python benchmarks/cpu_threads.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import jax
import jax.numpy as jnp
from jax import lax

LAYERS, ROWS, WIDTH, FFN, STEPS = 28, 64, 128, 384, 128


def _chain(weights, x):
    for w_in, w_out in weights:
        x = x + jnp.tanh(x @ w_in) @ w_out
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 2 * LAYERS)
    weights = [(jax.random.normal(keys[2 * i], (WIDTH, FFN)) * 0.05, jax.random.normal(keys[2 * i + 1], (FFN, WIDTH)) * 0.05)
               for i in range(LAYERS)]
    x = jax.random.normal(jax.random.key(1), (ROWS, WIDTH))
    half_a, half_b = x[: ROWS // 2], x[ROWS // 2:]
    one = jax.jit(lambda x: lax.fori_loop(0, STEPS, lambda _, x: _chain(weights, x), x))
    two_chains = jax.jit(lambda a, b: lax.fori_loop(0, STEPS, lambda _, c: (_chain(weights, c[0]), _chain(weights, c[1])), (a, b)))

    def threads():
        workers = [threading.Thread(target=lambda h=h: one(h).block_until_ready()) for h in (half_a, half_b)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    variants = {
        "one program, 64 rows": lambda: one(x).block_until_ready(),
        "one program, two independent 32-row chains": lambda: jax.block_until_ready(two_chains(half_a, half_b)),
        "two 32-row calls, async dispatch": lambda: jax.block_until_ready((one(half_a), one(half_b))),
        "two 32-row calls on two Python threads": threads,
    }
    print("| variant | s per call | cores used |")
    print("|---|--:|--:|")
    for name, run in variants.items():
        run()  # compile
        cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.repeats):
            run()
        cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        print(f"| {name} | {wall / args.repeats:.3f} | {cpu / wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
