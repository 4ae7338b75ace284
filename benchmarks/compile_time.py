"""Compile time of forward + backward vs depth: proves the layer scan (compile time flat in L).

Usage: python benchmarks/compile_time.py [--layers 2 16]
Prints a table of lowering+compile seconds per depth and the ratio to the shallowest.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import forward_params, init_params


def tiny_config(num_layers: int) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16)


def compile_seconds(num_layers: int, *, batch: int = 2, length: int = 32) -> float:
    """Wall seconds to lower and compile loss+grad of a forward pass at this depth."""
    cfg = tiny_config(num_layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(p, t):
        return jnp.mean(forward_params(p, cfg, t) ** 2)

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    args = parser.parse_args()
    compile_seconds(1)  # warm up tracing machinery
    rows = [(n, compile_seconds(n)) for n in args.layers]
    base = rows[0][1]
    print(f"{'layers':>6} {'compile_s':>10} {'ratio':>6}")
    for n, sec in rows:
        print(f"{n:>6} {sec:>10.3f} {sec / base:>6.2f}")


if __name__ == "__main__":
    main()
