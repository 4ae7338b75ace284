"""Compile time of forward + backward vs depth (the layer scan keeps it flat in L), and of the
sampling engine's first call.

Usage: python benchmarks/compile_time.py [--layers 2 16]
       python benchmarks/compile_time.py --sampler small deep [--new-tokens 128 --prompts 8 --samples 8]
           [--layer-loop auto|rolled|unrolled] [--sampler-layers N] [--count-kernels]
The first prints lowering+compile seconds per depth and the ratio to the shallowest. The
second runs the engine's first call on each ``bench_sampling`` shape (8 prompts x 8 samples,
64-token prompts, 128 new tokens) and prints how many programs it compiled and the seconds
spent tracing, lowering and compiling them (jax.monitoring events), beside the call's wall time.
``--count-kernels`` adds the number of LLVM kernels XLA:CPU emitted for the engine's program
(object files of ``XLA_FLAGS=--xla_dump_to``, taken in a subprocess): identical fusions share
one kernel, and on XLA:CPU the backend-compile seconds follow this count (10–16 ms per kernel
on the 2-core dev machines, BENCHMARKS.md), so it is a noise-free proxy for compile time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_sampling import bench_model_config
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import forward_params, init_params
from jaxrl.sampling.engine import SamplingConfig, generate_from_params


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


_EVENTS: collections.defaultdict = collections.defaultdict(list)
jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **_: _EVENTS[name].append(secs))


def sampler_first_call(shape: str, new_tokens: int = 128, prompts_n: int = 8, samples: int = 8,
                       layer_loop: str = "auto", num_layers: int | None = None
                       ) -> tuple[int, float, float, float, float]:
    """(programs compiled, trace s, lower s, backend-compile s, wall s) of the engine's first
    call on the ``bench_sampling`` shape ``shape`` (64-token prompts, no stop; ``num_layers``
    overrides the shape's depth)."""
    cfg = bench_model_config(shape)
    cfg = cfg if num_layers is None else cfg.replace(num_layers=num_layers)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (prompts_n, 64)).astype(np.int32)
    sampling = SamplingConfig(max_prompt_tokens=64, max_new_tokens=new_tokens, stop_token_ids=(), layer_loop=layer_loop)
    _EVENTS.clear()
    start = time.perf_counter()
    jax.block_until_ready(generate_from_params(params, cfg, prompts, np.full((prompts_n,), 64, np.int32), samples,
                                               sampling, jax.random.key(1)).tokens)
    wall = time.perf_counter() - start
    compiles = _EVENTS["/jax/core/compile/backend_compile_duration"]
    return (len(compiles), sum(_EVENTS["/jax/core/compile/jaxpr_trace_duration"]),
            sum(_EVENTS["/jax/core/compile/jaxpr_to_mlir_module_duration"]), sum(compiles), wall)


def llvm_kernels(shape: str, new_tokens: int = 128, prompts_n: int = 8, samples: int = 8,
                 layer_loop: str = "auto", num_layers: int | None = None) -> int:
    """Number of LLVM kernels XLA:CPU emits for the engine program of :func:`sampler_first_call`
    (one object file per kernel under ``--xla_dump_to``; run in a fresh subprocess because
    XLA_FLAGS are read once per process)."""
    with tempfile.TemporaryDirectory() as dump:
        # A persistent-cache hit would compile (and dump) nothing.
        env = dict(os.environ, JAXRL_COMPILATION_CACHE="off", JAX_ENABLE_COMPILATION_CACHE="false",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} "
                             "--xla_dump_hlo_module_re=.*_generate.*".strip())
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--sampler", shape, "--new-tokens",
                              str(new_tokens), "--prompts", str(prompts_n), "--samples", str(samples),
                              "--layer-loop", layer_loop]
                             + ([] if num_layers is None else ["--sampler-layers", str(num_layers)]),
                             env=env, capture_output=True, text=True, cwd=root)
        if run.returncode:
            raise RuntimeError(f"the kernel-count subprocess failed ({run.returncode}): {run.stderr[-2000:]}")
        kernels = glob.glob(os.path.join(dump, "*jit__generate*obj-file*.o"))
        if not kernels:
            raise RuntimeError(f"XLA dumped no kernel object files for the engine under {dump}")
        return len(kernels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--sampler", nargs="+", choices=["small", "deep", "1b"])
    parser.add_argument("--new-tokens", type=int, default=128, help="decode budget of the --sampler call")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the --sampler call")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt of the --sampler call")
    parser.add_argument("--layer-loop", default="auto", choices=["auto", "rolled", "unrolled"],
                        help="SamplingConfig.layer_loop of the --sampler call")
    parser.add_argument("--sampler-layers", type=int, help="override the --sampler shapes' number of layers")
    parser.add_argument("--count-kernels", action="store_true",
                        help="also count the LLVM kernels of the --sampler program (a subprocess each)")
    args = parser.parse_args()
    if args.sampler:
        extra = " LLVM kernels |" if args.count_kernels else ""
        print(f"| shape | programs compiled | trace s | lower s | compile s | first call s |{extra}")
        print(f"|-------|------------------:|--------:|--------:|----------:|-------------:|{'--:|' if extra else ''}")
        for shape in args.sampler:
            sizes = (args.new_tokens, args.prompts, args.samples, args.layer_loop, args.sampler_layers)
            count, trace, lower, comp, wall = sampler_first_call(shape, *sizes)
            kernels = f" {llvm_kernels(shape, *sizes)} |" if args.count_kernels else ""
            print(f"| {shape} | {count} | {trace:.2f} | {lower:.2f} | {comp:.2f} | {wall:.2f} |{kernels}")
        return
    compile_seconds(1)  # warm up tracing machinery
    rows = [(n, compile_seconds(n)) for n in args.layers]
    base = rows[0][1]
    print(f"{'layers':>6} {'compile_s':>10} {'ratio':>6}")
    for n, sec in rows:
        print(f"{n:>6} {sec:>10.3f} {sec / base:>6.2f}")


if __name__ == "__main__":
    main()
