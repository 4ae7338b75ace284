"""The prepared device checks (issues 13 and 15): one short script for a lent GPU.

Run it first thing on a device machine, then record its table in BENCHMARKS.md:

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 benchmarks/gpu_checks.py --out $OUT

It runs, in this order (each check is independent: a failure prints FAIL with its reason and
the next check still runs; the exit status is 1 if any check failed):

1. ``selection``: which implementation each "auto" entry point picks here: the fused sampler
   and the decode attention (Pallas/Triton), the paged attention (Pallas/Triton), the
   trainer's attention at bf16 (cuDNN). On a GPU anything else is a FAIL.
2. ``kernels``: each selected kernel against its jnp reference on this device (bf16 1B-shaped
   inputs): sampler tokens / log-probs / entropies, decode attention over a 2k-slot cache
   with ragged row ranges, paged attention, cuDNN attention forward and gradient against the
   dense path; with ms per call of kernel and reference.
3. ``engine``: the static engine on the 1B-shaped Qwen3 (``bench_sampling --shape 1b``) in
   bf16: 16 prompts x 8 samples = 128 rows, 64-token prompts, 1,024 new tokens, T = 1, no
   stop: compile s, tokens/s (median of ``--repeats``), the decode step's bytes (weights +
   the K/V it reads at the mean fill) over its time as a fraction of the HBM roofline, and
   the Pallas custom calls present in the compiled program (asserted on a GPU).
4. ``long_context``: the trainer's loss + gradient at S = 4k and 16k (bf16 narrow model,
   ``bench_long_context``'s) with cuDNN, blocked and dense attention: XLA's temporary bytes and
   step time.

``--smoke`` shrinks every shape so the script runs on a CPU in about a minute (the test suite
runs it that way, so it cannot rot); the numbers are then meaningless. One JSON line per
result goes to stdout and to ``--out``/gpu_checks.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_long_context import NARROW, loss_and_grad_fn
from benchmarks.bench_sampling import bench_model_config, time_calls
from jaxrl.kernels import attention as decode_kernels
from jaxrl.kernels import backend, flash_attention
from jaxrl.kernels.noise import make_key_data
from jaxrl.kernels.paged_attention import paged_attention
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.sampling import static
from jaxrl.sampling.engine import SamplingConfig, generate_from_params

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # vendor peak figures


class Report:
    """Collects one dict per result; prints and appends each as a JSON line."""

    def __init__(self, out_dir: str | None):
        self.failed = []
        self.path = os.path.join(out_dir, "gpu_checks.jsonl") if out_dir else None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)

    def add(self, check: str, **fields) -> None:
        line = json.dumps({"check": check, **fields}, default=str)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def run(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        try:
            fn(self, *args)
            self.add(name, status="ok", seconds=round(time.perf_counter() - start, 1))
        except Exception as error:  # noqa: BLE001  (every check reports, the next one still runs)
            self.failed.append(name)
            self.add(name, status="FAIL", error=f"{type(error).__name__}: {error}",
                     trace=traceback.format_exc(limit=4))


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def check_selection(report: Report, head_dim: int) -> None:
    picked = {
        "sampler": backend.resolve_impl("auto"),
        "decode_attention": "pallas" if decode_kernels.pallas_supported(head_dim) else "reference",
        "train_attention_bf16_4k": flash_attention.resolve_impl("auto", 4096, jnp.bfloat16),
    }
    report.add("selection", backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
               jax=jax.__version__, **picked)
    if _on_gpu():
        expected = {"sampler": "pallas", "decode_attention": "pallas", "train_attention_bf16_4k": "cudnn"}
        wrong = {k: v for k, v in picked.items() if v != expected[k]}
        assert not wrong, f"auto picked {wrong} on a GPU, expected {expected}"


def check_kernels(report: Report, smoke: bool, repeats: int) -> None:
    rng = np.random.default_rng(0)
    vocab, rows = (512, 8) if smoke else (151936, 128)
    impl = "pallas"
    # Sampler: same noise on both sides, so tokens agree but for float ties / top-p edges.
    logits = jnp.asarray(rng.normal(0, 3, (rows, vocab)), jnp.bfloat16)
    controls = (jnp.ones((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), jnp.float32))
    key_data = make_key_data(jax.random.key(1), 3)
    run_kernel = lambda: sample_tokens(logits, key_data, *controls, impl=impl)  # noqa: E731
    run_ref = lambda: sample_tokens(logits, key_data, *controls, impl="reference")  # noqa: E731
    (tk, lk, hk), (tr, lr, hr) = jax.block_until_ready(run_kernel()), jax.block_until_ready(run_ref())
    _, kernel_s = time_calls(run_kernel, repeats)
    _, ref_s = time_calls(run_ref, repeats)
    report.add("kernels/sampler", rows=rows, vocab=vocab, token_agreement=float(np.mean(np.asarray(tk) == np.asarray(tr))),
               max_logprob_diff=float(np.max(np.abs(np.asarray(lk) - np.asarray(lr)))),
               max_entropy_diff=float(np.max(np.abs(np.asarray(hk) - np.asarray(hr)))),
               kernel_ms=kernel_s * 1e3, reference_ms=ref_s * 1e3)
    assert np.mean(np.asarray(tk) == np.asarray(tr)) >= 0.99
    assert np.max(np.abs(np.asarray(lk) - np.asarray(lr))) < 1e-3

    # Decode attention: [1, B, K, S, hd] cache, ragged (start, end) per row.
    b, k, g, hd, slots = (4, 2, 2, 16, 128) if smoke else (128, 8, 2, 128, 2048)
    q = jnp.asarray(rng.normal(size=(b, k, g, hd)), jnp.bfloat16)
    kc = jnp.asarray(rng.normal(size=(1, b, k, slots, hd)), jnp.bfloat16)
    vc = jnp.asarray(rng.normal(size=(1, b, k, slots, hd)), jnp.bfloat16)
    starts = rng.integers(0, slots // 4, b)
    ends = np.maximum(starts + 1, rng.integers(slots // 8, slots + 1, b))
    bounds = jnp.asarray(np.stack([starts, ends, np.zeros(b, int)], 1), jnp.int32)
    run_kernel = lambda: decode_kernels.decode_attention_heads(q, kc, vc, bounds, impl=impl)  # noqa: E731
    run_ref = lambda: decode_kernels.decode_attention_heads(q, kc, vc, bounds, impl="reference")  # noqa: E731
    diff = float(jnp.max(jnp.abs(run_kernel().astype(jnp.float32) - run_ref().astype(jnp.float32))))
    _, kernel_s = time_calls(run_kernel, repeats)
    _, ref_s = time_calls(run_ref, repeats)
    cache_bytes = 2 * kc.size * kc.dtype.itemsize * float(np.mean(ends - starts)) / slots
    report.add("kernels/decode_attention", rows=b, kv_heads=k, slots=slots, max_abs_diff=diff,
               kernel_ms=kernel_s * 1e3, reference_ms=ref_s * 1e3,
               kernel_bytes_per_s=cache_bytes / kernel_s)
    assert diff < 3e-2, diff  # bf16 output (8 mantissa bits) of f32 accumulations

    # Paged attention: pages [P, page, KVH, hd], each row its own pages.
    page, pages_per_row = 16, (2 if smoke else 64)
    pool = b * pages_per_row
    kp = jnp.asarray(rng.normal(size=(pool, page, k, hd)), jnp.bfloat16)
    vp = jnp.asarray(rng.normal(size=(pool, page, k, hd)), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(pool).reshape(b, pages_per_row), jnp.int32)
    width = page * pages_per_row
    p_starts = jnp.asarray(rng.integers(0, width // 4, b), jnp.int32)
    p_ends = jnp.maximum(p_starts + 1, jnp.asarray(rng.integers(width // 8, width + 1, b), jnp.int32))
    qp = jnp.asarray(rng.normal(size=(b, k * g, hd)), jnp.bfloat16)
    run_kernel = lambda: paged_attention(qp, kp, vp, tables, p_starts, p_ends, impl=impl)  # noqa: E731
    run_ref = lambda: paged_attention(qp, kp, vp, tables, p_starts, p_ends, impl="reference")  # noqa: E731
    diff = float(jnp.max(jnp.abs(run_kernel().astype(jnp.float32) - run_ref().astype(jnp.float32))))
    _, kernel_s = time_calls(run_kernel, repeats)
    _, ref_s = time_calls(run_ref, repeats)
    report.add("kernels/paged_attention", rows=b, slots=width, max_abs_diff=diff,
               kernel_ms=kernel_s * 1e3, reference_ms=ref_s * 1e3)
    assert diff < 3e-2, diff

    # Trainer attention: cuDNN (GPU) against the dense path, forward and gradient.
    if _on_gpu():
        s, heads = 2048, 16
        qt = jnp.asarray(rng.normal(size=(2, s, heads, hd)), jnp.bfloat16)
        kt = jnp.asarray(rng.normal(size=(2, s, k, hd)), jnp.bfloat16)
        vt = jnp.asarray(rng.normal(size=(2, s, k, hd)), jnp.bfloat16)
        mask = jnp.ones((2, s), bool).at[1, : s // 4].set(False)
        loss = lambda impl_name: jax.jit(jax.value_and_grad(  # noqa: E731
            lambda q_: jnp.sum(flash_attention.self_attention(impl_name, q_, kt, vt, mask).astype(jnp.float32) ** 2)))
        (lc, gc), (lb, gb) = loss("cudnn")(qt), loss("blocked")(qt)
        grad_diff = float(jnp.max(jnp.abs(gc.astype(jnp.float32) - gb.astype(jnp.float32))) /
                          jnp.max(jnp.abs(gb.astype(jnp.float32))))
        report.add("kernels/train_attention", seq_len=s, loss_rel_diff=float(abs(lc - lb) / abs(lb)),
                   grad_rel_diff=grad_diff)
        assert abs(lc - lb) / abs(lb) < 2e-2 and grad_diff < 5e-2


def check_engine(report: Report, smoke: bool, repeats: int) -> None:
    shape, dtype = ("small", "float32") if smoke else ("1b", "bfloat16")
    prompts_n, samples, prompt_len, new_tokens = (2, 2, 16, 16) if smoke else (16, 8, 64, 1024)
    cfg = bench_model_config(shape, dtype)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (prompts_n, prompt_len)).astype(np.int32)
    lengths = np.full((prompts_n,), prompt_len, np.int32)
    # "auto" on a device; the smoke run forces the kernels (interpret mode) so that the kernel
    # detection below is exercised on a CPU too.
    sampling = SamplingConfig(max_prompt_tokens=prompt_len, max_new_tokens=new_tokens, stop_token_ids=(),
                              impl="pallas" if smoke else "auto")
    call = lambda: generate_from_params(params, cfg, prompts, lengths, samples, sampling, jax.random.key(1))  # noqa: E731
    plan_impls = (backend.resolve_impl(sampling.sampler_impl or sampling.impl),
                  static._attention_impl(sampling.attention_impl or sampling.impl, cfg.head_dim))
    # The program actually compiled for the first call, dumped by JAX: which kernels it holds.
    dump_dir = tempfile.mkdtemp(prefix="gpu_checks_ir_")
    jax.config.update("jax_dump_ir_to", dump_dir)
    try:
        first, median = time_calls(call, repeats)
    finally:
        jax.config.update("jax_dump_ir_to", "")
    programs = [name for name in os.listdir(dump_dir) if "_generate" in name]
    text = "".join(open(os.path.join(dump_dir, name), encoding="utf-8").read() for name in programs)
    kernels = {name: text.count(f'{name}/pallas_call') + text.count(f'name = "{name}"')
               for name in ("fused_sampler", "decode_attention_split_k", "decode_attention")}
    triton_calls = text.count("__gpu$xla.gpu.triton")
    shutil.rmtree(dump_dir, ignore_errors=True)
    out = call()
    assert int(np.min(np.asarray(out.lengths))) == new_tokens  # no stop: every row ran to the end
    rows = prompts_n * samples
    # Bytes a decode step must read: every weight but the embedding table (rows are gathered;
    # with tied embeddings the table is the LM head and is read whole), plus the K/V.
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not cfg.tie_word_embeddings:
        weights -= params["embed"].size * params["embed"].dtype.itemsize
    mean_fill = prompt_len + new_tokens / 2
    kv_bytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * mean_fill * jnp.dtype(dtype).itemsize
    step_s = median / new_tokens
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)
    achieved = (weights + kv_bytes) / step_s
    report.add("engine", shape=shape, dtype=dtype, rows=rows, new_tokens=new_tokens, sampler_impl=plan_impls[0],
               attention_impl=plan_impls[1], programs=len(programs), kernel_mentions=kernels,
               triton_custom_calls=triton_calls, first_call_s=first, median_s=median, tokens_per_s=rows * new_tokens / median,
               step_ms=step_s * 1e3, weight_bytes=weights, kv_bytes_mean=kv_bytes, achieved_bytes_per_s=achieved,
               roofline_fraction=achieved / peak if peak else None)
    assert len(programs) == 1, programs  # one engine program per call
    if smoke:
        assert kernels["fused_sampler"] and kernels["decode_attention_split_k"], kernels
    if _on_gpu():
        assert plan_impls == ("pallas", "pallas"), plan_impls
        assert kernels["fused_sampler"] and kernels["decode_attention_split_k"] and triton_calls >= 2, (kernels, triton_calls)


def check_long_context(report: Report, smoke: bool, repeats: int) -> None:
    lengths = (256,) if smoke else (4096, 16384)
    impls = ("blocked", "xla") + (("cudnn",) if _on_gpu() else ())
    for seq_len in lengths:
        for impl in impls:
            if impl == "xla" and seq_len > 8192:
                continue  # dense scores [S, S] per head: the case blocked attention exists for
            cfg = ModelConfig(**{**NARROW, "dtype": "bfloat16"}, attention_impl=impl)
            prompt = seq_len // 8
            params = init_params(cfg, jax.random.key(0))
            rng = np.random.default_rng(0)
            tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, seq_len)), jnp.int32)
            mask = jnp.ones((1, seq_len), bool).at[:, : prompt // 4].set(False)
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
            args = (params, tokens, mask, positions, tokens[:, prompt:])
            compiled = loss_and_grad_fn(cfg, prompt, 512).lower(*args).compile()
            _, step_s = time_calls(lambda: compiled(*args), repeats)
            report.add("long_context", impl=impl, seq_len=seq_len,
                       temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20, step_s=step_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="directory for gpu_checks.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU; checks that the script runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="selection,kernels,engine,long_context")
    args = parser.parse_args(argv)
    report = Report(args.out)
    wanted = args.only.split(",")
    head_dim = bench_model_config("1b").head_dim
    checks = {"selection": (check_selection, head_dim), "kernels": (check_kernels, args.smoke, args.repeats),
              "engine": (check_engine, args.smoke, args.repeats),
              "long_context": (check_long_context, args.smoke, args.repeats)}
    for name, (fn, *fn_args) in checks.items():
        if name in wanted:
            report.run(name, fn, *fn_args)
    print(f"failed: {report.failed}" if report.failed else "all checks passed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
