"""Generated tokens/s of the sampling engine vs HuggingFace ``generate`` (and a naive sampler).

Usage: python benchmarks/bench_sampling.py [--shape small|deep|1b] [--prompts 8] [--samples 8]
           [--prompt-len 64] [--new-tokens 128] [--repeats 5] [--impl auto] [--dtype float32] [--cpu-threads 0]
           [--layer-loop auto|rolled|unrolled]
           [--no-hf] [--naive] [--max-other 0.3]

Models (random weights, saved once as HF safetensors and loaded by both sides):
  small  Qwen3 shape: vocab 4096, hidden 256, 4 layers, 4 q / 2 kv heads, head_dim 64
  deep   the same at 28 layers, hidden 128, 4 q / 2 kv heads, head_dim 32
  1b     Qwen3-1.7B-like: vocab 151936, hidden 2048, 28 layers, 16 q / 8 kv heads, hd 128
T = 1, no stop tokens, so every row generates exactly ``new_tokens`` tokens and tokens/s =
rows * new_tokens / seconds. Compile time is excluded (one warm-up call each) and printed.

jaxrl runs as a default config runs it: the static rollout backend with ``sampling.cpu_threads``
= 0 (auto: as many concurrent engine calls as available cores, on CPU); ``--cpu-threads 1`` times
the engine alone (one program on ~one core), k > 1 forces k threads.

HF vs jaxrl: torch ``generate`` (eager, DynamicCache, do_sample, top_k=0, top_p=1,
num_return_sequences = samples, min_new_tokens = max_new_tokens) on the same weights and
prompts, in this process, interleaved per repeat as (HF, jaxrl, HF). Each timed call is
guarded: the CPU time the rest of the machine used during the call (from /proc/stat minus
this process) must stay under ``--max-other`` cores, else the call is retried (up to
``--tries`` times; the last try is kept and flagged). Every timed call is printed as it ends. Medians of ``--repeats`` repeats.

Rows of ``--naive``:
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
import os
import statistics
import tempfile
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


SHAPES = {
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64),
    "deep": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=28, num_heads=4,
                 num_kv_heads=2, head_dim=32),
    "1b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
               num_kv_heads=8, head_dim=128),
}


def bench_model_config(shape: str = "small", dtype: str = "float32") -> ModelConfig:
    """The Qwen3-shaped benchmark model ``shape`` (see the module docstring)."""
    return ModelConfig(model_type="qwen3", qk_norm=True, eos_token_id=2, pad_token_id=0, dtype=dtype,
                       param_dtype=dtype, **SHAPES[shape])


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


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def guarded_call(fn, max_other: float, tries: int = 5) -> tuple[float, float]:
    """(wall seconds, cores used by other processes meanwhile) of ``fn()``, retried while the
    rest of the machine used more than ``max_other`` cores (the last try is kept)."""
    for _ in range(tries):
        busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        other = max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / wall
        if other <= max_other:
            break
    return wall, other


def time_calls(fn, repeats):
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


def hf_generate_fn(directory: str, prompts: np.ndarray, samples: int, new_tokens: int, dtype: str):
    """A callable running stock HF ``generate`` (sampling, T = 1, no truncation, no stop)."""
    import torch  # the peer under test; torch is only in the "test" extra
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=getattr(torch, dtype)).eval()
    inputs = torch.as_tensor(prompts, dtype=torch.long)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=samples,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return run


def engine_fn(args, cfg, params, prompts, lengths, sampling):
    """A callable returning jaxrl's tokens for the benchmark's prompts (computed), and its
    label: with ``--cpu-threads`` 1 the engine itself (one program); otherwise the static
    rollout backend with ``sampling.cpu_threads`` = that value (0 = auto, the default config's:
    k concurrent engine calls, k = the available cores where threads can run)."""
    if args.cpu_threads != 1:
        from jaxrl.sampling.backend import StaticBackend

        backend = StaticBackend(cfg, sampling.replace(cpu_threads=args.cpu_threads), None)
        auto = " (auto)" if args.cpu_threads == 0 else ""
        return (lambda: jax.block_until_ready(backend.generate(params, prompts, lengths, args.samples,
                                                               jax.random.key(1)).tokens),
                f"jaxrl, {backend.threads} threads{auto}")
    return (lambda: jax.block_until_ready(generate_from_params(params, cfg, prompts, lengths, args.samples,
                                                               sampling, jax.random.key(1)).tokens),
            "jaxrl engine, 1 call")


def compare_with_hf(args, cfg, params, prompts, lengths, sampling) -> None:
    """Interleaved (HF, jaxrl, HF) x repeats, guarded; prints the table and the ratio."""
    from jaxrl.models.hf_io import save_pretrained
    from jaxrl.models.transformer import Transformer

    rows = args.prompts * args.samples
    generated = rows * args.new_tokens
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(Transformer(cfg, params=params), directory)
        hf = hf_generate_fn(directory, prompts, args.samples, args.new_tokens, args.dtype)
        start = time.perf_counter()
        out = hf()
        hf_first = time.perf_counter() - start
        assert out.shape == (rows, args.prompt_len + args.new_tokens), out.shape

        ours, label = engine_fn(args, cfg, params, prompts, lengths, sampling)
        start = time.perf_counter()
        ours()
        ours_first = time.perf_counter() - start
        hf_times, ours_times, others = [], [], []
        for _ in range(args.repeats):
            for name, fn, bucket in (("hf", hf, hf_times), ("jaxrl", ours, ours_times), ("hf", hf, hf_times)):
                seconds, other = guarded_call(fn, args.max_other, args.tries)
                bucket.append(seconds)
                others.append(other)
                print(f"  {name}: {generated / seconds:.0f} tokens/s ({seconds:.3f} s, other processes "
                      f"{other:.2f} cores{' > limit, kept' if other > args.max_other else ''})", flush=True)
    hf_rate = generated / statistics.median(hf_times)
    ours_rate = generated / statistics.median(ours_times)
    print(f"load: 1-min average {os.getloadavg()[0]:.2f}; other processes during timed calls: "
          f"median {statistics.median(others):.2f} cores, max {max(others):.2f}")
    print(f"| {'sampler':<40} | {'tokens/s':>9} | {'median s':>8} | {'first call s':>12} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|{'-' * 14}|")
    print(f"| {'HF generate (torch eager, ' + str(2 * args.repeats) + ' calls)':<40} | {hf_rate:>9.0f} | "
          f"{statistics.median(hf_times):>8.3f} | {hf_first:>12.2f} |")
    label = f"{label} ({args.repeats} calls)"
    print(f"| {label:<40} | {ours_rate:>9.0f} | "
          f"{statistics.median(ours_times):>8.3f} | {ours_first:>12.2f} |")
    print(f"jaxrl / HF = {ours_rate / hf_rate:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    parser.add_argument("--no-hf", action="store_true", help="skip the HF comparison")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="jaxrl through the static backend with sampling.cpu_threads = this (0 = auto, "
                             "the default config's); 1 = the engine itself, one call")
    parser.add_argument("--layer-loop", default="auto", choices=["auto", "rolled", "unrolled"],
                        help="SamplingConfig.layer_loop of the jaxrl engine")
    parser.add_argument("--naive", action="store_true", help="also time the naive sampler rows")
    parser.add_argument("--max-other", type=float, default=0.3,
                        help="cores other processes may use during a timed call before it is retried")
    parser.add_argument("--tries", type=int, default=5, help="tries per timed call under the guard")
    args = parser.parse_args()

    cfg = bench_model_config(args.shape, args.dtype)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)
    lengths = np.full((args.prompts,), args.prompt_len, np.int32)
    sampling = SamplingConfig(max_prompt_tokens=args.prompt_len, max_new_tokens=args.new_tokens,
                              temperature=1.0, stop_token_ids=(), impl=args.impl, layer_loop=args.layer_loop)
    print(f"backend={jax.default_backend()} shape={args.shape} dtype={args.dtype} impl={args.impl} "
          f"rows={args.prompts}x{args.samples} prompt={args.prompt_len} new={args.new_tokens} T=1 "
          f"(median of {args.repeats}); cores={os.cpu_count()}")
    if not args.no_hf:
        compare_with_hf(args, cfg, params, prompts, lengths, sampling)
    if args.naive:
        naive_table(args, cfg, params, prompts, lengths, sampling)
    if args.no_hf and not args.naive:  # the engine alone (no peer, no guard)
        run, label = engine_fn(args, cfg, params, prompts, lengths, sampling)
        first, median = time_calls(run, args.repeats)
        cpu_start, wall_start = _own_seconds(), time.perf_counter()
        for _ in range(args.repeats):
            run()
        cores = (_own_seconds() - cpu_start) / (time.perf_counter() - wall_start)
        tokens = args.prompts * args.samples * args.new_tokens
        print(f"{label}: {tokens / median:.0f} tokens/s (median {median:.3f} s, first call {first:.2f} s); "
              f"cores used {cores:.2f} (process CPU time / wall time over {args.repeats} more calls)")


def naive_table(args, cfg, params, prompts, lengths, sampling) -> None:
    """The engine against the naive sampler and against itself without fan-out."""
    key = jax.random.key(1)
    repeated = jnp.asarray(np.repeat(prompts, args.samples, axis=0))
    mask = jnp.ones(repeated.shape, bool)
    results = [
        ("naive (per-sample prefill, unfused sampling, step loop)",
         time_calls(lambda: naive_generate(params, cfg, repeated, mask, args.new_tokens, key), args.repeats)),
        ("engine (n=1, prompts repeated: no fan-out)",
         time_calls(lambda: generate_from_params(params, cfg, np.asarray(repeated), np.repeat(lengths, args.samples),
                                            1, sampling, key).tokens, args.repeats)),
        ("engine (prefill once, fan-out, fused sampler)",
         time_calls(lambda: generate_from_params(params, cfg, prompts, lengths, args.samples, sampling,
                                            key).tokens, args.repeats)),
    ]
    generated = args.prompts * args.samples * args.new_tokens
    print(f"| {'sampler':<55} | {'tokens/s':>9} | {'seconds':>8} | {'first call s':>12} |")
    print(f"|{'-' * 57}|{'-' * 11}|{'-' * 10}|{'-' * 14}|")
    for name, (first, seconds) in results:
        print(f"| {name:<55} | {generated / seconds:>9.0f} | {seconds:>8.3f} | {first:>12.2f} |")


if __name__ == "__main__":
    main()
