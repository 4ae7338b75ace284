"""Why the static engine's decode step unrolls its layers (issue 15, compile time vs speed).

Attention of one decode step over L layers' caches, three ways, on random data at the deep
sampler shape (28 layers, 64 rows x 2 kv heads, 2 query heads per kv head, head_dim 32):

* ``unrolled``: one [R, W, hd] buffer per layer, the layers a Python loop (the engine today):
  each layer's attention dot reads its buffer in place; compile time grows with L.
* ``scan-slice``: a stacked [L, R, W, hd] cache and a ``fori_loop`` over layers: XLA CPU
  copies each layer's dynamic slice before the dot; compile time flat in L.
* ``scan-blocks``: the stacked cache, a ``fori_loop`` over layers and, inside, a loop over
  only the live key blocks (online softmax), so one program serves every fill (no phases).

Each variant runs STEPS decode steps (the new slot written in place, as in the engine) and
prints compile seconds and ms per step; outputs are checked against ``unrolled``.

Usage: python benchmarks/decode_layer_loop.py [--window 192] [--live 184] [--block 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYERS, ROWS, GROUP, HEAD_DIM, STEPS = 28, 128, 2, 32, 16


def _attend(q, k, v, live):
    scores = jnp.einsum("rgh,rwh->rgw", q, k)
    scores = jnp.where(jnp.arange(k.shape[1]) < live, scores, -jnp.inf)
    weights = jnp.exp(scores - scores.max(-1, keepdims=True))
    return jnp.einsum("rgw,rwh->rgh", weights / weights.sum(-1, keepdims=True), v)


def unrolled(q, k_all, v_all, live):
    k_layers = tuple(k_all[i] for i in range(LAYERS))
    v_layers = tuple(v_all[i] for i in range(LAYERS))

    def step(_, carry):
        q, ks, vs = carry
        new_k, new_v = [], []
        for k, v in zip(ks, vs):
            k = lax.dynamic_update_slice(k, q[:, :1], (0, live - 1, 0))
            v = lax.dynamic_update_slice(v, q[:, 1:], (0, live - 1, 0))
            q = _attend(q, k, v, live) * 0.5 + q * 0.5
            new_k.append(k)
            new_v.append(v)
        return q, tuple(new_k), tuple(new_v)

    return lax.fori_loop(0, STEPS, step, (q, k_layers, v_layers))[0]


def scan_slice(q, k_all, v_all, live):
    def layer(i, carry):
        q, ks, vs = carry
        ks = lax.dynamic_update_slice(ks, q[None, :, :1], (i, 0, live - 1, 0))
        vs = lax.dynamic_update_slice(vs, q[None, :, 1:], (i, 0, live - 1, 0))
        out = _attend(q, lax.dynamic_index_in_dim(ks, i, keepdims=False),
                      lax.dynamic_index_in_dim(vs, i, keepdims=False), live)
        return out * 0.5 + q * 0.5, ks, vs

    return lax.fori_loop(0, STEPS, lambda _, c: lax.fori_loop(0, LAYERS, layer, c), (q, k_all, v_all))[0]


def scan_blocks(q, k_all, v_all, live, block):
    rows, group, head_dim = q.shape

    def layer(i, carry):
        q, ks, vs = carry
        ks = lax.dynamic_update_slice(ks, q[None, :, :1], (i, 0, live - 1, 0))
        vs = lax.dynamic_update_slice(vs, q[None, :, 1:], (i, 0, live - 1, 0))

        def key_block(b, acc):
            m, s, o = acc
            k = lax.dynamic_slice(ks, (i, 0, b * block, 0), (1, rows, block, head_dim))[0]
            v = lax.dynamic_slice(vs, (i, 0, b * block, 0), (1, rows, block, head_dim))[0]
            scores = jnp.einsum("rgh,rwh->rgw", q, k)
            scores = jnp.where(b * block + jnp.arange(block) < live, scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            scale, e = jnp.exp(m - m_new), jnp.exp(scores - m_new)
            return m_new, s * scale + e.sum(-1, keepdims=True), o * scale + jnp.einsum("rgw,rwh->rgh", e, v)

        init = (jnp.full((rows, group, 1), -jnp.inf), jnp.zeros((rows, group, 1)), jnp.zeros((rows, group, head_dim)))
        _, s, o = lax.fori_loop(0, (live + block - 1) // block, key_block, init)
        return (o / s) * 0.5 + q * 0.5, ks, vs

    return lax.fori_loop(0, STEPS, lambda _, c: lax.fori_loop(0, LAYERS, layer, c), (q, k_all, v_all))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=192, help="cache slots W (the phase's window)")
    parser.add_argument("--live", type=int, default=184, help="filled slots (<= window)")
    parser.add_argument("--block", type=int, default=64, help="key block of scan-blocks")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not 0 < args.live <= args.window:
        parser.error("--live must be in (0, --window]")
    slots = -(-args.window // args.block) * args.block  # whole blocks (the unread tail is zeros)
    q = jax.random.normal(jax.random.key(0), (ROWS, GROUP, HEAD_DIM)) * 0.3
    k_all = jnp.pad(jax.random.normal(jax.random.key(1), (LAYERS, ROWS, args.window, HEAD_DIM)),
                    ((0, 0), (0, 0), (0, slots - args.window), (0, 0)))
    v_all = jnp.pad(jax.random.normal(jax.random.key(2), (LAYERS, ROWS, args.window, HEAD_DIM)),
                    ((0, 0), (0, 0), (0, slots - args.window), (0, 0)))
    variants = {"unrolled": unrolled, "scan-slice": scan_slice,
                "scan-blocks": lambda *a: scan_blocks(*a, block=args.block)}
    reference = None
    print(f"W={args.window} live={args.live} block={args.block}; {LAYERS} layers, {ROWS} rows x {GROUP} q heads, "
          f"hd {HEAD_DIM}; medians of {args.repeats}")
    print("| variant | compile s | ms per step | max |diff| vs unrolled |")
    print("|---|--:|--:|--:|")
    for name, fn in variants.items():
        inputs = (q, k_all[:, :, :args.window], v_all[:, :, :args.window]) if name != "scan-blocks" else (q, k_all, v_all)
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*inputs, args.live).compile()
        compile_s = time.perf_counter() - start
        out = np.asarray(jax.block_until_ready(compiled(*inputs, args.live)))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs, args.live))
            times.append(time.perf_counter() - start)
        reference = out if reference is None else reference
        print(f"| {name} | {compile_s:.2f} | {np.median(times) / STEPS * 1e3:.2f} | {np.abs(out - reference).max():.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
