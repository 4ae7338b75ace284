"""Sampling engine: prefill each prompt once, fan out n samples, decode in one jitted loop.

The config is :class:`jaxrl.sampling.config.SamplingConfig`; the trainer and evaluator reach
this engine through the "static" rollout backend (:mod:`jaxrl.sampling.backend`).

Flow of :func:`generate_from_params` (device arrays in, :class:`~jaxrl.types.Rollout` out):

1. Bucket the shapes (see :func:`bucket_size`): prompt width, number of prompts and the
   decode budget are rounded up to powers of two, so calls inside one bucket reuse the
   compiled program. Extra prompt rows are one pad token long, start "done" and are dropped.
   Host inputs are padded with numpy; controls and the stop table are numpy too, so a call
   runs exactly one device program (``_generate``; the only eager ops are the final slices
   when the bucket is larger than the request).
2. ``_generate`` (jit): one forward over the left-padded prompts [N_b, P_b] fills a KV cache,
   which is then repeated to the ``n`` samples of each prompt (rows of one prompt contiguous),
   made head-major and grown to the first attention window
   (:func:`jaxrl.sampling.kv_cache.fan_out`); the decode loop splits it into one buffer per
   layer and grows those per phase.
3. In the same program, :func:`jaxrl.sampling.decode.decode_loop` runs ``lax.while_loop``
   phases whose every step samples a token from the carried logits (the prefill's for token 0)
   with the fused sampler (:func:`jaxrl.kernels.sampling.sample_tokens`), then feeds it (cache
   written in place) for the next logits; rows stop on a stop token id or ``max_new_tokens``,
   and the loop exits as soon as every row is done. Attention reads each row's live slot
   range only. (One sampler per phase and none outside the loop: fewer copies to compile.)

Cache slot layout per row: slots ``0..P_b-1`` hold the left-padded prompt (pads invalid),
completion token ``i`` lives in slot ``P_b + i``. Positions are real: 0 at the row's first
prompt token, so a teacher-forced ``forward`` over ``[prompt; completion]`` with default
positions sees the same inputs.

Sampling controls (temperature, top-k, top-p; T == 0 is greedy) are per-row device arrays,
so changing them never recompiles; noise is a pure function of (key, step, global row), so a
key reproduces a rollout exactly, and a batch decoded in chunks (``first_prompt``) draws the
noise of the whole batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.kernels.attention import pallas_supported
from jaxrl.kernels.backend import IMPLS, resolve_impl
from jaxrl.kernels.sampling_controls import controls_may_truncate
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (
    Params,
    decoder_hidden_with_cache,
    init_kv_cache,
    logits_from_hidden,
    model_params,
    positions_from_mask,
)
from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.decode import (  # bucket_size: re-exported
    attention_windows,
    bucket_size,
    choose_layer_loop,
    decode_loop,
)
from jaxrl.sampling.kv_cache import fan_out
from jaxrl.types import Rollout

# Number of times each jitted engine function was traced (a trace precedes every compile);
# tests read it through ``trace_count`` to prove that calls inside one bucket do not retrace.
_TRACE_COUNTS: collections.Counter = collections.Counter()


def trace_count() -> int:
    """Total number of traces of the engine's jitted prefill and decode functions so far."""
    return sum(_TRACE_COUNTS.values())


def _attention_impl(impl: str, head_dim: int) -> str:
    """"pallas" or "reference" for the decode attention ("auto": the Pallas kernel on a GPU
    when it supports the head size, else the jnp path)."""
    if impl not in IMPLS:
        raise ValueError(f"SamplingConfig.attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if pallas_supported(head_dim) else "reference"
    return impl


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one compiled generate call (the jit cache key)."""

    model_cfg: ModelConfig
    samples_per_prompt: int
    prompt_width: int
    new_tokens_bucket: int
    pad_id: int
    sampler_impl: str
    attention_impl: str
    compute_entropy: bool
    may_truncate: bool  # False: no row has top-k/top-p on, the sampler is compiled without them
    windows: tuple[int, ...]
    layer_loop: str  # "rolled" | "unrolled" (jaxrl.sampling.decode.choose_layer_loop)


@functools.partial(jax.jit, static_argnames=("plan",))
def _generate(params: Params, prompt_tokens: jax.Array, prompt_lengths: jax.Array, row_active: jax.Array,
              key: jax.Array, is_stop_token: jax.Array, max_new_tokens: jax.Array, temperature: jax.Array,
              top_k: jax.Array, top_p: jax.Array, first_prompt: jax.Array, *, plan: _Plan):
    """The whole engine as one program: pad, prefill once, fan out, decode.

    prompt_tokens int32 [N_b, W] left-padded (W <= P_b; bucket-padding rows included),
    prompt_lengths int32 [N_b]; row-shaped inputs have B = N_b * n rows: row_active bool
    (False = bucket padding), temperature / top_p f32, top_k int32; is_stop_token bool [V];
    max_new_tokens int32 scalar (<= bucket); first_prompt int32 scalar: the global index of
    prompt 0 (noise of row first_prompt * n + r, group ids from first_prompt). Returns prompt_tokens [B, P_b], prompt lengths
    [B], tokens / logprobs / entropies [B, new_tokens_bucket], lengths, finish, group ids [B].
    """
    _TRACE_COUNTS["generate"] += 1
    cfg, n, width = plan.model_cfg, plan.samples_per_prompt, plan.prompt_width
    prompt_tokens = jnp.pad(prompt_tokens, ((0, 0), (width - prompt_tokens.shape[1], 0)),
                            constant_values=plan.pad_id)
    prompt_mask = jnp.arange(width)[None, :] >= (width - prompt_lengths)[:, None]
    prompt_tokens = jnp.where(prompt_mask, prompt_tokens, plan.pad_id)
    cache = init_kv_cache(cfg, prompt_tokens.shape[0], width)
    hidden, cache = decoder_hidden_with_cache(
        params, cfg, prompt_tokens, positions_from_mask(prompt_mask), cache, jnp.int32(0), prompt_mask
    )
    # Left padding puts every row's last real token in the last column.
    first_logits = jnp.repeat(logits_from_hidden(params, cfg, hidden[:, -1]), n, axis=0)
    k_cache, v_cache = fan_out(cache, n, plan.windows[0])  # decode grows it per phase
    row_lengths = jnp.repeat(prompt_lengths, n)
    outputs = decode_loop(
        params, cfg, k_cache, v_cache, first_logits, width - row_lengths, row_lengths, row_active, key,
        is_stop_token, jnp.minimum(max_new_tokens, plan.new_tokens_bucket), temperature, top_k, top_p,
        prompt_width=width, budget=plan.new_tokens_bucket, pad_id=plan.pad_id,
        sampler_impl=plan.sampler_impl, attention_impl=plan.attention_impl,
        compute_entropy=plan.compute_entropy, may_truncate=plan.may_truncate, windows=plan.windows,
        row_offset=first_prompt * n, layer_loop=plan.layer_loop,
    )
    group_ids = jnp.arange(row_active.shape[0], dtype=jnp.int32) // n + first_prompt
    return (jnp.repeat(prompt_tokens, n, axis=0), row_lengths) + tuple(outputs) + (group_ids,)


def _concrete(x) -> np.ndarray | None:
    """x as numpy when it is a concrete value, None under tracing or when it is a multi-host
    array whose values are partly on other processes' devices (not readable here)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if not getattr(x, "is_fully_addressable", True) and not getattr(x, "is_fully_replicated", False):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _row_control(name: str, value, default, dtype, num_rows: int, padded_rows: int, pad_value):
    """A per-row control as [padded_rows] (bucket-padding rows get ``pad_value``); numpy when
    the value is concrete (no device program), jnp under tracing."""
    value = default if value is None else value
    xp = np if _concrete(value) is not None else jnp
    value = xp.asarray(value, dtype)
    if value.ndim == 0:
        value = xp.broadcast_to(value, (num_rows,))
    if value.shape != (num_rows,):
        raise ValueError(f"{name} must be a scalar or have shape [{num_rows}] (prompts * n), got {value.shape}")
    return xp.concatenate([value, xp.full((padded_rows - num_rows,), pad_value, dtype)])


def _check_controls(temperature, top_k, top_p) -> None:
    """Range checks of per-row controls when they are concrete (skipped under tracing)."""
    checks = (("temperature", temperature, lambda v: v >= 0.0, ">= 0"),
              ("top_k", top_k, lambda v: v >= 0, ">= 0"),
              ("top_p", top_p, lambda v: (v > 0.0) & (v <= 1.0), "in (0, 1]"))
    for name, value, ok, rule in checks:
        if value is None:
            continue
        arr = _concrete(value)
        if arr is not None and not np.all(ok(arr)):
            raise ValueError(f"{name} must be {rule} on every row, got {arr}")


def _check_prompt_lengths(prompt_lengths, width: int, cfg: SamplingConfig) -> None:
    """Range checks of concrete prompt lengths (1..min(width, max_prompt_tokens))."""
    lengths_now = _concrete(prompt_lengths)
    if lengths_now is None:
        return
    if np.any(lengths_now < 1):
        raise ValueError(f"prompt_lengths must be >= 1 (empty prompt at rows {np.flatnonzero(lengths_now < 1).tolist()})")
    too_long = np.flatnonzero(lengths_now > min(width, cfg.max_prompt_tokens))
    if too_long.size:
        raise ValueError(
            f"prompt_lengths at rows {too_long.tolist()} exceed SamplingConfig.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} or the array width {width}"
        )


def generate_from_params(params: Params, model_cfg: ModelConfig, prompt_tokens: jax.Array,
                         prompt_lengths: jax.Array, n: int, cfg: SamplingConfig, key: jax.Array,
                         *, temperature=None, top_k=None, top_p=None, first_prompt: int = 0) -> Rollout:
    """Sample ``n`` completions per prompt; pure device-array entry point (jit-friendly).

    params: the model's parameter dict; model_cfg: its ModelConfig.
    prompt_tokens: int [N, P] left-padded prompts (P <= bucket_size(cfg.max_prompt_tokens));
    prompt_lengths: int [N], real tokens per prompt (1..cfg.max_prompt_tokens; checked when
    concrete). n: samples per prompt. key: a jax PRNG key (typed or raw uint32 [2]).
    temperature / top_p (float) and top_k (int): optional scalars or per-row [N * n] arrays
    overriding the config's defaults (row r belongs to prompt r // n).
    first_prompt: where these prompts start in a larger batch decoded in chunks: row r draws
    the noise of row first_prompt * n + r and group ids start at first_prompt, so the chunks
    together sample what one call over the batch would (up to float rounding of the
    batch-size-dependent matmuls). A traced value: chunks share one compiled program.
    Returns a Rollout with B = N * n rows: prompt_tokens [B, P_b] (P_b = bucketed width),
    tokens / logprobs / entropies [B, cfg.max_new_tokens], lengths, finish_reason, group_ids.
    One compiled program per bucket: numpy inputs are padded to the buckets on the host, device
    arrays inside the program (a new N or P there is a new trace).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    stop_ids = cfg.resolved_stop_token_ids(model_cfg)
    pad_id = cfg.resolved_pad_id(model_cfg)
    on_host = isinstance(prompt_tokens, np.ndarray) and isinstance(prompt_lengths, np.ndarray)
    xp = np if on_host else jnp
    prompt_tokens = xp.asarray(prompt_tokens, xp.int32)
    prompt_lengths = xp.asarray(prompt_lengths, xp.int32)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[0] == 0:
        raise ValueError(f"prompt_tokens must be a non-empty [N, P] array, got shape {prompt_tokens.shape}")
    num_prompts, width = prompt_tokens.shape
    if prompt_lengths.shape != (num_prompts,):
        raise ValueError(f"prompt_lengths must have shape [{num_prompts}], got {prompt_lengths.shape}")
    max_width = bucket_size(cfg.max_prompt_tokens, cfg.min_prompt_bucket)
    if width > max_width:
        raise ValueError(
            f"prompt_tokens is {width} wide, more than the bucket {max_width} of "
            f"SamplingConfig.max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    _check_prompt_lengths(prompt_lengths, width, cfg)
    _check_controls(temperature, top_k, top_p)

    prompt_width = bucket_size(width, cfg.min_prompt_bucket)
    padded_prompts = bucket_size(num_prompts, cfg.min_batch_bucket)
    # Bucket padding: extra one-token prompts that start done (more left pad columns: on the
    # host here, else inside the program).
    extra = padded_prompts - num_prompts
    if on_host or extra:
        columns = prompt_width - width if on_host else 0
        prompt_tokens = xp.pad(prompt_tokens, ((0, extra), (columns, 0)), constant_values=pad_id)
        prompt_lengths = xp.pad(prompt_lengths, (0, extra), constant_values=1)

    num_rows, padded_rows = num_prompts * n, padded_prompts * n
    controls = (_row_control("temperature", temperature, cfg.temperature, np.float32, num_rows, padded_rows, 0.0),
                _row_control("top_k", top_k, cfg.top_k, np.int32, num_rows, padded_rows, 0),
                _row_control("top_p", top_p, cfg.top_p, np.float32, num_rows, padded_rows, 1.0))
    budget = bucket_size(cfg.max_new_tokens, cfg.min_new_tokens_bucket)
    attention_impl = _attention_impl(cfg.attention_impl or cfg.impl, model_cfg.head_dim)
    plan = _Plan(
        model_cfg=model_cfg,
        samples_per_prompt=int(n),
        prompt_width=prompt_width,
        new_tokens_bucket=budget,
        pad_id=pad_id,
        sampler_impl=resolve_impl(cfg.sampler_impl or cfg.impl),
        attention_impl=attention_impl,
        compute_entropy=bool(cfg.compute_entropy),
        # Concrete controls without top-k/top-p compile a sampler without the threshold
        # searches (another program only when a later call turns truncation on).
        may_truncate=controls_may_truncate(*(_concrete(c) for c in controls), model_cfg.vocab_size),
        # Phases of live-length attention on the jnp path; the kernel bounds rows by itself.
        windows=attention_windows(prompt_width, prompt_width + budget, phased=attention_impl == "reference"),
        layer_loop=choose_layer_loop(cfg.layer_loop, attention_impl, prompt_width + budget, model_cfg.num_layers),
    )
    is_stop_token = np.zeros((model_cfg.vocab_size,), bool)
    is_stop_token[list(stop_ids)] = True
    outputs = _generate(
        params, prompt_tokens, prompt_lengths, np.arange(padded_rows) < num_rows, key, is_stop_token,
        np.int32(cfg.max_new_tokens), *controls, np.int32(first_prompt), plan=plan,
    )
    keep = cfg.max_new_tokens
    if num_rows != padded_rows or keep != plan.new_tokens_bucket:  # bucket padding to drop
        outputs = [x[:num_rows, :keep] if x.ndim == 2 and i >= 2 else x[:num_rows] for i, x in enumerate(outputs)]
    prompts, row_lengths, tokens, logprobs, entropies, lengths, finish, group_ids = outputs
    return Rollout(prompt_tokens=prompts, prompt_lengths=row_lengths, tokens=tokens, logprobs=logprobs,
                   entropies=entropies, lengths=lengths, finish_reason=finish, group_ids=group_ids)


def _host_prompts(prompts: Any, cfg: SamplingConfig, vocab_size: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Validate prompts (token lists, or (left-padded [N, P] array, lengths [N])) and return
    numpy int32 left-padded tokens [N, bucket_size(longest)] and lengths [N]."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        array, lengths = np.asarray(prompts[0]), np.asarray(prompts[1]).astype(np.int64)
        if lengths.shape != (array.shape[0],):
            raise ValueError(f"prompts lengths must have shape [{array.shape[0]}], got {lengths.shape}")
        if np.any(lengths > array.shape[1]):
            raise ValueError(f"prompts lengths {lengths.tolist()} exceed the array width {array.shape[1]}")
        rows = [array[i, array.shape[1] - int(length):] for i, length in enumerate(lengths)]
    else:
        rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: need at least one prompt")
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a flat sequence of token ids, got shape {row.shape}")
        if row.size == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if row.size > cfg.max_prompt_tokens:
            raise ValueError(
                f"prompts[{i}] has {row.size} tokens, more than SamplingConfig.max_prompt_tokens="
                f"{cfg.max_prompt_tokens}"
            )
        if not np.issubdtype(row.dtype, np.integer) or row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"prompts[{i}] must hold integer token ids in [0, {vocab_size})")
    lengths = np.array([row.size for row in rows], np.int32)
    width = bucket_size(int(lengths.max()), cfg.min_prompt_bucket)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - row.size:] = row
    return tokens, lengths


def generate(model, prompts: Sequence[Sequence[int]] | tuple[Any, Any], n: int,
             cfg: SamplingConfig, key: jax.Array, *, temperature=None, top_k=None,
             top_p=None) -> Rollout:
    """Sample ``n`` completions for each prompt with a ``Transformer`` (host-side wrapper).

    prompts: a list of token-id lists, or a tuple (left-padded int array [N, P], lengths [N]).
    n: samples per prompt (rows of one prompt are contiguous; group_ids = row // n).
    key: jax PRNG key; the same key, inputs and controls give the same rollout.
    temperature / top_k / top_p: optional scalars or per-row [N * n] overrides of ``cfg``.
    Returns a Rollout (see :func:`generate_from_params` and ``jaxrl.types.Rollout``).
    """
    model_cfg = model.config
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    cfg.resolved_stop_token_ids(model_cfg)
    pad_id = cfg.resolved_pad_id(model_cfg)
    tokens, lengths = _host_prompts(prompts, cfg, model_cfg.vocab_size, pad_id)
    return generate_from_params(
        model_params(model), model_cfg, tokens, lengths, n, cfg, key,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )
