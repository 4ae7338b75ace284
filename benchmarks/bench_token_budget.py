"""Fixed micro-batches vs token-budget micro-batches (``rl.micro_batch_tokens``) on a ragged batch.

Usage: python benchmarks/bench_token_budget.py [--rows 64 --prompt 64 --response 960
       --micro-rows 8 --reps 5 --attention auto]

One mini-batch of ``rows`` rows, padded width S = prompt + response; 90% of the responses are
1-128 tokens, 10% full length. Fixed: micro-batches of ``micro-rows`` full-width rows. Budget:
``micro_batch_tokens`` = micro-rows × S (the same positions per micro-batch). For each, prints
the compiled update's temporary bytes (XLA ``memory_analysis()``), the positions its
micro-batches run (cost model), and the median wall time of ``reps`` updates, the two run
interleaved (fixed, budget, fixed, ...) so load changes hit both alike. Same for the forward-
only trainer log-prob pass. A narrow model (2 layers, d = 64, V = 256) keeps it about a minute
on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl.data.token_budget import bucket_shapes, padded_tokens
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.rl.losses import LossConfig
from jaxrl.train import step as train_step
from jaxrl.types import TrainBatch


def model_config(attention: str = "auto") -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, attention_impl=attention)


def ragged_batch(rows: int, prompt: int, response: int, seed: int = 0) -> TrainBatch:
    """90% of responses 1-128 tokens, 10% (at least one row) the full ``response``; prompts 16..prompt."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(rows) < 0.9, rng.integers(1, min(128, response) + 1, rows), response)
    lengths[0] = response
    prompt_lengths = rng.integers(16, prompt + 1, rows)
    width = prompt + response
    mask = np.zeros((rows, width), bool)
    for i in range(rows):
        mask[i, prompt - prompt_lengths[i]: prompt + lengths[i]] = True
    tokens = np.where(mask, rng.integers(3, 256, (rows, width)), 0).astype(np.int32)
    loss_mask = (np.arange(response)[None] < lengths[:, None]).astype(np.float32)
    return TrainBatch(
        input_tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)),
        targets=jnp.asarray(tokens[:, prompt:]), loss_mask=jnp.asarray(loss_mask),
        advantages=jnp.asarray(rng.normal(size=rows).astype(np.float32)),
        old_logp=jnp.asarray(-5.5 + 0.1 * rng.normal(size=(rows, response)), jnp.float32),
        rollout_entropy=jnp.zeros((rows, response), jnp.float32),
        group_ids=jnp.asarray(np.arange(rows) // 8, jnp.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=960)
    parser.add_argument("--micro-rows", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--attention", default="auto", help="model.attention_impl (auto: dense up to 512 "
                        "positions on a CPU, so short budget micro-batches run dense attention)")
    args = parser.parse_args()
    cfg = model_config(args.attention)
    width = args.prompt + args.response
    budget = args.micro_rows * width
    batch = ragged_batch(args.rows, args.prompt, args.response)
    select = batch.loss_mask > 0
    params = init_params(cfg, jax.random.PRNGKey(0))
    tx = optax.set_to_zero()  # the update's work without moving the params: every call is alike
    loss_cfg = LossConfig()
    common = dict(micro_batch_rows=args.micro_rows, temperature=1.0, chunk_size=256)
    variants = {"fixed": 0, "budget": budget}
    updates, logprobs, temp, logprob_temp, compile_s = {}, {}, {}, {}, {}
    inputs = (batch.input_tokens, batch.attention_mask, batch.positions, batch.targets)
    for name, tokens in variants.items():
        updates[name] = train_step.make_update_fn(cfg, loss_cfg, tx, micro_batch_tokens=tokens, **common)
        logprobs[name] = train_step.make_logprob_fn(cfg, micro_batch_tokens=tokens, **common)
        state = train_step.init_train_state(params, tx, seed=0)
        start = time.perf_counter()
        compiled = updates[name].lower(state, batch, select).compile()
        compile_s[name] = time.perf_counter() - start
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
        logprob_temp[name] = logprobs[name].lower(params, *inputs).compile().memory_analysis().temp_size_in_bytes
        updates[name] = compiled
    states = {name: train_step.init_train_state(jax.tree.map(jnp.copy, params), tx, seed=0) for name in variants}
    times = {name: [] for name in variants}
    logprob_times = {name: [] for name in variants}
    losses = {}
    for _ in range(args.reps + 1):  # the first round warms up (not counted)
        for name in variants:
            start = time.perf_counter()
            states[name], metrics = updates[name](states[name], batch, select)
            losses[name] = float(jax.block_until_ready(metrics["loss"]))
            times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(logprobs[name](params, *inputs))
            logprob_times[name].append(time.perf_counter() - start)
    extents = np.asarray(jnp.sum(batch.loss_mask > 0, axis=1))
    shapes = bucket_shapes(budget, args.prompt, args.response, max_rows=args.rows)
    positions = {"fixed": args.rows * width, "budget": padded_tokens(extents, shapes, args.prompt)}
    print(f"rows {args.rows}, S = {args.prompt} + {args.response}, responses: {int(np.sum(extents <= 128))} "
          f"<= 128 tokens, {int(np.sum(extents == args.response))} full; real positions "
          f"{int(np.sum(np.asarray(batch.attention_mask)))}; budget {budget} tokens, shapes (width, rows) {shapes}; "
          f"attention {args.attention}; cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(f"loss fixed {losses['fixed']:.6f} budget {losses['budget']:.6f}")
    print("| micro-batches | positions run | update temp MiB | update median s | log-prob temp MiB "
          "| log-prob median s | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, tokens in variants.items():
        label = f"fixed, {args.micro_rows} rows x {width}" if not tokens else f"budget, {tokens} tokens"
        print(f"| {label} | {positions[name]} | {temp[name] / 2**20:.1f} | {statistics.median(times[name][1:]):.3f} "
              f"| {logprob_temp[name] / 2**20:.1f} | {statistics.median(logprob_times[name][1:]):.3f} "
              f"| {compile_s[name]:.1f} |")


if __name__ == "__main__":
    main()
