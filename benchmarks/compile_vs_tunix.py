"""Compile time and generated tokens/s of jaxrl's sampling engine vs tunix's JAX sampler.

Usage: PYTHONPATH=$PWD python benchmarks/compile_vs_tunix.py [--shapes small deep] [--runs 3]
           [--repeats 5] [--tunix-python /work/tunixenv/bin/python]
       ... --jaxrl-breakdown [--runs 3 --repeats 2]   jaxrl only: its engine vs patched variants
       ... --jaxrl-phases [--runs 3]                  jaxrl only: pieces of its program jitted alone

tunix (google-tunix, a benchmark peer only, never a jaxrl dependency) lives in its own
virtual environment (see BUILD_NOTES.md); this driver runs under jaxrl's python and starts
one FRESH subprocess per measurement, alternating tunix, jaxrl, tunix, jaxrl, ... per shape
(``--runs`` each). Every subprocess has JAX's persistent compilation cache off
(JAX_COMPILATION_CACHE_DIR unset, JAX_ENABLE_COMPILATION_CACHE=false and
``jax_enable_compilation_cache`` False) and JAXRL_COMPILATION_CACHE=off, so its first call
compiles everything it runs.

Workload (that of benchmarks/bench_sampling.py): the ``SHAPES`` models of bench_sampling
(Qwen3, random weights, float32), 8 prompts x 8 samples = 64 rows, 64-token prompts, 128 new
tokens, T = 1, no stop token. Each subprocess reports:
  first call s   wall seconds of the first generate call (tracing + compiling + running)
  programs       XLA programs compiled during it (jax.monitoring backend_compile events)
  trace/lower/compile s  sums of the jaxpr-trace, MLIR-lowering and backend-compile events
  tokens/s       64 * 128 / median seconds of ``--repeats`` further calls
  first - steady s  first call minus that median: the first call's extra cost

jaxrl side: ``benchmarks.compile_time.sampler_first_call`` (its engine's first call on the
shape), then ``generate_from_params`` again for the steady state.

tunix side: ``tunix.models.qwen3.model.Qwen3`` built from a ``ModelConfig`` with the same
fields as jaxrl's (vocab, embed/hidden, intermediate, layers, q/kv heads, head_dim, rope
theta 10000, norm eps 1e-6, untied embeddings; Qwen3 always has q/k norm) and random init
(``nnx.Rngs(0)``), sampled by ``tunix.generate.sampler.Sampler`` with a
``CacheConfig(cache_size=64 + 128)``. tunix has no per-prompt fan-out, so it gets the 64 rows
as 64 prompts (each of the 8 prompts 8 times) and prefills all 64; jaxrl prefills 8 and
fans out. tunix's sampler takes strings, so a minimal tokenizer maps "prompt <i>" to the
fixed 64 token ids of prompt i (bos_id 0: no BOS is prepended; pad_id 0 as in jaxrl's
config). T = 1 with top_p=1.0, top_k=None (tunix's plain ``jax.random.categorical`` path)
and ``return_logprobs=True`` (jaxrl always returns logprobs); eos = ``vocab_size``, an id
the model cannot emit, so every row runs the full 128 tokens. tunix's decode while_loop
runs 128 forward steps after prefill (its last step's token falls outside the buffer),
jaxrl's 127; tunix's first call also compiles a handful of small eager ops (state init).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 8, 8, 64, 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_cache_env() -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["JAXRL_COMPILATION_CACHE"] = "off"
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    return env


def _events():
    """A dict of jax.monitoring duration events, filled from now on."""
    import collections

    import jax

    events = collections.defaultdict(list)

    def listen(name, secs, fun_name=None, **_):
        events[name].append(secs)
        if name == "/jax/core/compile/backend_compile_duration":
            events["by_fun"].append((fun_name, secs))

    jax.monitoring.register_event_duration_secs_listener(listen)
    return events


def _summary(events) -> dict:
    compiles = events["/jax/core/compile/backend_compile_duration"]
    return dict(programs=len(compiles), trace_s=sum(events["/jax/core/compile/jaxpr_trace_duration"]),
                lower_s=sum(events["/jax/core/compile/jaxpr_to_mlir_module_duration"]),
                compile_s=sum(compiles), by_fun=sorted(events["by_fun"], key=lambda x: -x[1])[:4])


VARIANTS = ("engine", "one-phase", "plain-sampler", "one-phase+plain-sampler")


def _patch_engine(variant: str) -> None:
    """Diagnostic variants of jaxrl's engine program, patched in this subprocess only (the
    engine's source is untouched): "one-phase" decodes in a single while_loop over all slots
    (no phased attention windows); "plain-sampler" replaces the fused sampler (top-k/top-p
    threshold searches under lax.cond) by tunix's T-only path, jax.random.categorical +
    log_softmax (+ entropy)."""
    import jax
    import jax.numpy as jnp

    import jaxrl.sampling.decode as decode
    import jaxrl.sampling.static as static

    if "one-phase" in variant:
        static.attention_windows = lambda prompt_width, total_slots, phased=True: (total_slots,)
    if "plain-sampler" in variant:
        def plain(logits, key_data, temperature, top_k, top_p, *, impl="auto", compute_entropy=True):
            del top_k, top_p, impl
            logits = logits.astype(jnp.float32) / temperature[:, None]
            tokens = jax.random.categorical(key_data, logits, axis=-1).astype(jnp.int32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1) if compute_entropy else jnp.zeros(tokens.shape)
            return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], entropy
        decode.sample_tokens = plain


def worker_jaxrl(shape: str, repeats: int, variant: str = "engine") -> dict:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import numpy as np

    _patch_engine(variant)

    from benchmarks.bench_sampling import bench_model_config
    from benchmarks.compile_time import sampler_first_call
    from jaxrl.models.transformer import init_params
    from jaxrl.sampling.engine import SamplingConfig, generate_from_params

    count, trace, lower, comp, wall = sampler_first_call(shape)
    cfg = bench_model_config(shape)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (PROMPTS, PROMPT_LEN)).astype(np.int32)
    lengths = np.full((PROMPTS,), PROMPT_LEN, np.int32)
    sampling = SamplingConfig(max_prompt_tokens=PROMPT_LEN, max_new_tokens=NEW_TOKENS, stop_token_ids=())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_from_params(params, cfg, prompts, lengths, SAMPLES, sampling, jax.random.key(1))
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - start)
    assert out.tokens.shape == (PROMPTS * SAMPLES, NEW_TOKENS), out.tokens.shape
    return dict(programs=count, trace_s=trace, lower_s=lower, compile_s=comp, first_s=wall,
                step_s=statistics.median(times), times=times)


def worker_jaxrl_phases(shape: str) -> dict:
    """Lower+compile seconds of the pieces of jaxrl's engine program, each jitted alone at the
    engine's shapes (prefill of the 8 prompts; the reference sampler on [64, V]; one decode
    step of 64 rows at the first phase's window, without and with its sampler) and of the
    whole program (``static._generate`` lowered with the engine's arguments)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    import numpy as np

    from benchmarks.bench_sampling import bench_model_config
    from jaxrl.kernels.noise import make_key_data
    from jaxrl.kernels.sampling import sample_tokens_reference
    from jaxrl.models.transformer import (decoder_hidden_with_cache, init_kv_cache, init_params,
                                          logits_from_hidden, positions_from_mask)
    from jaxrl.sampling.decode import attention_windows, decode_hidden, layer_params

    cfg = bench_model_config(shape)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    rows, total = PROMPTS * SAMPLES, PROMPT_LEN + NEW_TOKENS
    windows = attention_windows(PROMPT_LEN, total)
    f32, i32 = jnp.float32, jnp.int32

    def prefill(params, tokens):
        mask = jnp.ones(tokens.shape, bool)
        hidden, cache = decoder_hidden_with_cache(params, cfg, tokens, positions_from_mask(mask),
                                                  init_kv_cache(cfg, tokens.shape[0], PROMPT_LEN), jnp.int32(0), mask)
        return logits_from_hidden(params, cfg, hidden[:, -1]), cache

    def sampler(logits, key_data, t, k, p, may_truncate=True):
        return sample_tokens_reference(logits, key_data, t, k, p, compute_entropy=True, may_truncate=may_truncate)

    def step(params, token, k_cache, v_cache, with_sampler, key_data=None, t=None, k=None, p=None):
        hidden, k_cache, v_cache = decode_hidden(params, cfg, token, token, k_cache, v_cache, jnp.zeros_like(token),
                                                 jnp.int32(PROMPT_LEN), attention_impl="reference",
                                                 layers=layer_params(params))
        logits = logits_from_hidden(params, cfg, hidden)
        if with_sampler:
            return sample_tokens_reference(logits, key_data, t, k, p, compute_entropy=True), k_cache, v_cache
        return logits, k_cache, v_cache

    # The engine's decode layout: one [rows * kv heads, window, hd] buffer per layer.
    tok = jax.ShapeDtypeStruct((rows,), i32)
    kv = (jax.ShapeDtypeStruct((rows * cfg.num_kv_heads, windows[0], cfg.head_dim), f32),) * cfg.num_layers
    key_data = make_key_data(jax.random.key(1), 0)
    controls = (jax.ShapeDtypeStruct((rows,), f32), jax.ShapeDtypeStruct((rows,), i32),
                jax.ShapeDtypeStruct((rows,), f32))
    pieces = {
        "trivial (x + 1, fixed cost)": lambda: jax.jit(lambda x: x + 1).lower(tok),
        "prefill [8 x 64]": lambda: jax.jit(prefill).lower(params, jax.ShapeDtypeStruct((PROMPTS, PROMPT_LEN), i32)),
        "sampler [64 x V]": lambda: jax.jit(sampler).lower(jax.ShapeDtypeStruct((rows, cfg.vocab_size), f32),
                                                          key_data, *controls),
        "sampler [64 x V], no top-k/top-p (may_truncate=False)": lambda: jax.jit(
            functools.partial(sampler, may_truncate=False)).lower(
            jax.ShapeDtypeStruct((rows, cfg.vocab_size), f32), key_data, *controls),
        "decode step, no sampler": lambda: jax.jit(functools.partial(step, with_sampler=False)).lower(
            params, tok, kv, kv),
        "decode step + sampler": lambda: jax.jit(functools.partial(step, with_sampler=True)).lower(
            params, tok, kv, kv, key_data=key_data, t=controls[0], k=controls[1], p=controls[2]),
    }
    out = {}
    for name, lower in pieces.items():
        start = time.perf_counter()
        lowered = lower()
        mid = time.perf_counter()
        lowered.compile()
        out[name] = (mid - start, time.perf_counter() - mid)
    return out


class _FixedTokenizer:
    """What tunix's TokenizerAdapter needs (encode/decode/bos_id/eos_id/pad_id): "prompt <i>"
    encodes to the fixed token ids of prompt i."""

    def __init__(self, prompts, eos_id: int):
        self._prompts, self._eos = prompts, eos_id

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in self._prompts[int(text.split()[1])]]

    def decode(self, ids, **_) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> int:
        return 0  # falsy: tunix prepends no BOS

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return 0


def worker_tunix(dims: dict, repeats: int) -> dict:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    events = _events()
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as qwen3

    config = qwen3.ModelConfig(
        num_layers=dims["num_layers"], vocab_size=dims["vocab_size"], embed_dim=dims["hidden_size"],
        hidden_dim=dims["intermediate_size"], num_heads=dims["num_heads"], head_dim=dims["head_dim"],
        num_kv_heads=dims["num_kv_heads"], rope_theta=int(dims["rope_theta"]), norm_eps=dims["rms_norm_eps"],
        use_tied_embedding=dims["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    prompts = np.random.default_rng(0).integers(3, dims["vocab_size"], (PROMPTS, PROMPT_LEN)).astype(np.int32)
    tokenizer = _FixedTokenizer(prompts, eos_id=dims["vocab_size"])  # an id the model cannot emit
    sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
        cache_size=PROMPT_LEN + NEW_TOKENS, num_layers=dims["num_layers"], num_kv_heads=dims["num_kv_heads"],
        head_dim=dims["head_dim"]))
    inputs = [f"prompt {i}" for i in range(PROMPTS) for _ in range(SAMPLES)]

    def call():
        out = sampler(inputs, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LEN, echo=False,
                      return_logprobs=True, temperature=1.0, top_p=1.0, top_k=None, seed=1)
        return out

    events.clear()
    start = time.perf_counter()
    out = call()  # returns host numpy arrays: already synchronised
    first = time.perf_counter() - start
    summary = _summary(events)
    assert len(out.tokens) == PROMPTS * SAMPLES and all(len(t) == NEW_TOKENS for t in out.tokens), \
        sorted({len(t) for t in out.tokens})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return dict(summary, first_s=first, step_s=statistics.median(times), times=times)


def _run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def breakdown(args, script: str, env: dict, generated: int) -> None:
    """jaxrl's engine vs its diagnostic variants, fresh subprocesses, interleaved; medians."""
    for shape in args.shapes:
        runs = {v: [] for v in VARIANTS}
        for i in range(args.runs):
            for variant in VARIANTS:
                res = _run([sys.executable, script, "--worker", "jaxrl", "--shape", shape, "--variant", variant,
                            "--repeats", str(args.repeats)], env)
                runs[variant].append(res)
                print(f"  {shape} run {i + 1} {variant}: first call {res['first_s']:.2f} s, trace "
                      f"{res['trace_s']:.2f} s, lower {res['lower_s']:.2f} s, compile {res['compile_s']:.2f} s, "
                      f"{generated / res['step_s']:.0f} tokens/s; {_load()}", flush=True)
        print(f"\n{_load()}; jaxrl engine variants, shape {shape}, {args.runs} fresh subprocesses each; medians")
        print("| shape | variant | trace s | lower s | backend compile s | trace+lower+compile s | first call s "
              "| tokens/s |")
        print("|---|---|--:|--:|--:|--:|--:|--:|")
        for variant, rs in runs.items():
            m = {k: statistics.median(r[k] for r in rs) for k in ("trace_s", "lower_s", "compile_s", "first_s")}
            total = statistics.median(r["trace_s"] + r["lower_s"] + r["compile_s"] for r in rs)
            rate = statistics.median(generated / r["step_s"] for r in rs)
            print(f"| {shape} | {variant} | {m['trace_s']:.2f} | {m['lower_s']:.2f} | {m['compile_s']:.2f} | "
                  f"{total:.2f} | {m['first_s']:.2f} | {rate:.0f} |")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "deep"], choices=["small", "deep"])
    parser.add_argument("--runs", type=int, default=3, help="fresh subprocesses per sampler and shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first, per subprocess")
    parser.add_argument("--tunix-python", default="/work/tunixenv/bin/python",
                        help="python of the separate venv holding google-tunix")
    parser.add_argument("--jaxrl-breakdown", action="store_true",
                        help="instead: jaxrl only, its engine against diagnostic variants (see _patch_engine), "
                             "interleaved, to see which part of the program compiles slowest")
    parser.add_argument("--jaxrl-phases", action="store_true",
                        help="instead: lower+compile seconds of the pieces of jaxrl's program, each alone")
    parser.add_argument("--worker", choices=["jaxrl", "tunix", "jaxrl-phases"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="engine", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dims", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "jaxrl":
        print("RESULT " + json.dumps(worker_jaxrl(args.shape, args.repeats, args.variant)), flush=True)
        return
    if args.worker == "jaxrl-phases":
        print("RESULT " + json.dumps(worker_jaxrl_phases(args.shape)), flush=True)
        return
    if args.worker == "tunix":
        print("RESULT " + json.dumps(worker_tunix(json.loads(args.dims), args.repeats)), flush=True)
        return

    if not os.path.isfile(args.tunix_python) or not os.access(args.tunix_python, os.X_OK):
        sys.exit(f"tunix python {args.tunix_python!r} not found: create the peer venv first "
                 "(python3.11 -m venv /work/tunixenv && /work/tunixenv/bin/pip install google-tunix; "
                 "see BUILD_NOTES.md) or pass --tunix-python")
    sys.path.insert(0, ROOT)
    from benchmarks.bench_sampling import bench_model_config

    env = _no_cache_env()
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tunix_env = dict(env)
    tunix_env["PYTHONPATH"] = ROOT  # the script only; tunix's venv never imports jaxrl
    script = os.path.abspath(__file__)
    generated = PROMPTS * SAMPLES * NEW_TOKENS
    if args.jaxrl_breakdown:
        breakdown(args, script, env, generated)
        return
    if args.jaxrl_phases:
        for shape in args.shapes:
            runs = [_run([sys.executable, script, "--worker", "jaxrl-phases", "--shape", shape], env)
                    for _ in range(args.runs)]
            print(f"\n{_load()}; jaxrl pieces jitted alone, shape {shape}, {args.runs} fresh subprocesses; medians")
            print("| shape | piece | lower s | compile s |")
            print("|---|---|--:|--:|")
            for name in runs[0]:
                print(f"| {shape} | {name} | {statistics.median(r[name][0] for r in runs):.2f} | "
                      f"{statistics.median(r[name][1] for r in runs):.2f} |", flush=True)
        return
    results = {}
    for shape in args.shapes:
        cfg = bench_model_config(shape)
        dims = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                             "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                                             "rms_norm_eps", "tie_word_embeddings")}
        assert cfg.qk_norm and cfg.model_type == "qwen3" and cfg.dtype == "float32", cfg
        print(f"shape {shape}: {dims}", flush=True)
        runs = {"tunix": [], "jaxrl": []}
        for i in range(args.runs):
            for name in ("tunix", "jaxrl"):
                if name == "tunix":
                    cmd = [args.tunix_python, script, "--worker", "tunix", "--dims", json.dumps(dims),
                           "--repeats", str(args.repeats)]
                    res = _run(cmd, tunix_env)
                else:
                    cmd = [sys.executable, script, "--worker", "jaxrl", "--shape", shape,
                           "--repeats", str(args.repeats)]
                    res = _run(cmd, env)
                runs[name].append(res)
                print(f"  {shape} run {i + 1} {name}: first call {res['first_s']:.2f} s, "
                      f"{res['programs']} programs, trace {res['trace_s']:.2f} s, lower {res['lower_s']:.2f} s, "
                      f"compile {res['compile_s']:.2f} s, {generated / res['step_s']:.0f} tokens/s "
                      f"(calls {', '.join(f'{t:.2f}' for t in res['times'])} s); {_load()}", flush=True)
                if res.get("by_fun"):
                    print("    slowest compiles: " + ", ".join(f"{f} {t:.2f} s" for f, t in res["by_fun"]), flush=True)
        results[shape] = runs

    print(f"\n{_load()}; {args.runs} fresh subprocesses per cell, interleaved tunix/jaxrl; medians")
    print("| shape | sampler | programs | trace s | lower s | backend compile s | trace+lower+compile s "
          "| first call s | first - steady s | tokens/s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for shape, runs in results.items():
        med = {}
        for name in ("tunix", "jaxrl"):
            rs = runs[name]
            m = {k: statistics.median(r[k] for r in rs) for k in ("programs", "trace_s", "lower_s", "compile_s",
                                                                  "first_s", "step_s")}
            m["total_s"] = statistics.median(r["trace_s"] + r["lower_s"] + r["compile_s"] for r in rs)
            m["rate"] = statistics.median(generated / r["step_s"] for r in rs)
            m["over_s"] = statistics.median(r["first_s"] - r["step_s"] for r in rs)
            med[name] = m
            print(f"| {shape} | {name} | {m['programs']:.0f} | {m['trace_s']:.2f} | {m['lower_s']:.2f} | "
                  f"{m['compile_s']:.2f} | {m['total_s']:.2f} | {m['first_s']:.2f} | {m['over_s']:.2f} | "
                  f"{m['rate']:.0f} |")
        t, j = med["tunix"], med["jaxrl"]
        target = 0.25 if shape == "deep" else 0.5
        print(f"| {shape} | jaxrl / tunix | | | | {j['compile_s'] / t['compile_s']:.2f}x | "
              f"{j['total_s'] / t['total_s']:.2f}x | {j['first_s'] / t['first_s']:.2f}x | "
              f"{j['over_s'] / t['over_s']:.2f}x | {j['rate'] / t['rate']:.2f}x |")
        verdict = "meets" if j["total_s"] / t["total_s"] <= target else "MISSES"
        print(f"  {shape}: target compile (trace+lower+compile) <= {target}x tunix: {verdict} "
              f"({j['total_s'] / t['total_s']:.2f}x; first call {j['first_s'] / t['first_s']:.2f}x, "
              f"first - steady {j['over_s'] / t['over_s']:.2f}x)")


if __name__ == "__main__":
    main()
