"""Long-context training memory and time: dense (xla) vs blocked attention.

For each sequence length S, compiles the trainer's loss + gradient (``response_logprobs`` of a
narrow model: forward, chunked log-probs, backward) with ``model.attention_impl`` = xla and
blocked, and reports XLA's ``memory_analysis()`` temporary bytes; then times one step (median
of ``--repeats`` after a warm-up) where ``--time-max-len`` allows.

    PYTHONPATH=$PWD python -m benchmarks.bench_long_context --lengths 2048,4096,8192,16384

Prints one JSON line per (impl, S) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.train.step import response_logprobs

NARROW = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
              num_heads=2, num_kv_heads=1, head_dim=32, qk_norm=True, remat="full")


def loss_and_grad_fn(cfg: ModelConfig, prompt: int, chunk: int):
    """Jitted (params, tokens, mask, positions, targets) -> (loss, grads): the trainer's pass."""

    def loss(params, tokens, mask, positions, targets):
        logp, _ = response_logprobs(params, cfg, tokens, mask, positions, targets, temperature=1.0,
                                    chunk_size=chunk)
        return -jnp.mean(logp)

    return jax.jit(jax.value_and_grad(loss))


def measure(impl: str, seq_len: int, rows: int, chunk: int, time_it: bool, repeats: int) -> dict:
    """Compiled temp bytes (and step seconds when ``time_it``) at S = seq_len."""
    cfg = ModelConfig(**NARROW, attention_impl=impl)
    prompt = seq_len // 8
    response = seq_len - prompt
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq_len)), jnp.int32)
    mask = jnp.ones((rows, seq_len), bool).at[:, : prompt // 4].set(False)  # left padding
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    targets = tokens[:, prompt:]
    fn = loss_and_grad_fn(cfg, prompt, chunk)
    compiled = fn.lower(params, tokens, mask, positions, targets).compile()
    result = {"impl": impl, "seq_len": seq_len, "rows": rows,
              "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
    if time_it:
        jax.block_until_ready(compiled(params, tokens, mask, positions, targets))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens, mask, positions, targets))
            times.append(time.perf_counter() - start)
        result["step_s"] = float(np.median(times))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--impls", default="xla,blocked")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-max-len", type=int, default=8192,
                        help="time steps only up to this S (the dense 16k step needs ~4 GiB of scores)")
    args = parser.parse_args(argv)
    results = []
    for seq_len in (int(x) for x in args.lengths.split(",")):
        for impl in args.impls.split(","):
            res = measure(impl, seq_len, args.rows, args.chunk, seq_len <= args.time_max_len, args.repeats)
            results.append(res)
            print(json.dumps(res), flush=True)
    by = {(r["impl"], r["seq_len"]): r for r in results}
    print("\n| S | dense temp MiB | blocked temp MiB | blocked / dense | dense step s | blocked step s |")
    print("|---|---|---|---|---|---|")
    for seq_len in sorted({r["seq_len"] for r in results}):
        d, b = by.get(("xla", seq_len), {}), by.get(("blocked", seq_len), {})
        ratio = b["temp_bytes"] / d["temp_bytes"] if d and b else float("nan")
        print(f"| {seq_len} | {d.get('temp_bytes', 0) / 2**20:.1f} | {b.get('temp_bytes', 0) / 2**20:.1f} | "
              f"{ratio:.3f} | {d.get('step_s', float('nan')):.2f} | {b.get('step_s', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
