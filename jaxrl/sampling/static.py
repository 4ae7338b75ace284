"""Sampling engine: prefill each prompt once, fan out n samples, decode in one jitted loop.

The config is :class:`jaxrl.sampling.config.SamplingConfig`; the trainer and evaluator reach
this engine through the "static" rollout backend (:mod:`jaxrl.sampling.backend`).

Flow of :func:`generate_from_params` (device arrays in, :class:`~jaxrl.types.Rollout` out):

1. Bucket the shapes (see :func:`bucket_size`): prompt width, number of prompts and the
   decode budget are rounded up to powers of two, so calls inside one bucket reuse the
   compiled functions. Extra prompt rows are one pad token long, start "done" and are dropped.
2. ``_prefill`` (jit): one forward over the left-padded prompts [N_b, P_b] fills a KV cache,
   which is then repeated to the ``n`` samples of each prompt (rows of one prompt contiguous)
   and grown by ``new_tokens_bucket`` empty slots.
3. ``_decode`` (jit, cache donated): samples token 0 from the prefill logits, then a
   ``lax.while_loop`` feeds the last token, samples the next with the fused sampler
   (:func:`jaxrl.kernels.sampling.sample_tokens`) and stops per row on a stop token id or
   ``max_new_tokens``; the loop exits as soon as every row is done.

Cache slot layout per row: slots ``0..P_b-1`` hold the left-padded prompt (pads invalid),
completion token ``i`` lives in slot ``P_b + i``. Positions are real: 0 at the row's first
prompt token, so a teacher-forced ``forward`` over ``[prompt; completion]`` with default
positions sees the same inputs.

Sampling controls (temperature, top-k, top-p; T == 0 is greedy) are per-row device arrays,
so changing them never recompiles; noise is a pure function of (key, step, row), so a key
reproduces a rollout exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl.kernels.attention import decode_attention
from jaxrl.kernels.backend import IMPLS, resolve_impl
from jaxrl.kernels.noise import make_key_data
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (
    DecodeAttentionFn,
    KVCache,
    Params,
    decoder_hidden_with_cache,
    init_kv_cache,
    logits_from_hidden,
    model_params,
    positions_from_mask,
)
from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.kv_cache import fan_out
from jaxrl.types import FINISH_LENGTH, FINISH_STOP, Rollout

# Number of times each jitted engine function was traced (a trace precedes every compile);
# tests read it through ``trace_count`` to prove that calls inside one bucket do not retrace.
_TRACE_COUNTS: collections.Counter = collections.Counter()


def trace_count() -> int:
    """Total number of traces of the engine's jitted prefill and decode functions so far."""
    return sum(_TRACE_COUNTS.values())


def bucket_size(length: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(length, minimum) (``minimum`` itself a power of two)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    target = max(int(length), int(minimum), 1)
    return 1 << (target - 1).bit_length()


def _decode_attention_fn(impl: str) -> DecodeAttentionFn | None:
    """The single-token attention for decode ("auto" | "pallas" | "reference").

    None means the model's own jnp attention over the cache (what "reference" and CPU "auto"
    use). On GPU/TPU "auto" defers to ``decode_attention(impl="auto")``, which picks the Pallas
    kernel where it supports the head size; "pallas" forces the kernel (interpret mode on CPU).
    """
    if impl == "reference" or (impl == "auto" and jax.default_backend() == "cpu"):
        return None
    if impl not in ("auto", "pallas"):
        raise ValueError(f"SamplingConfig.attention_impl must be one of {IMPLS}, got {impl!r}")
    return functools.partial(decode_attention, impl=impl)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one compiled generate call (the jit cache key)."""

    model_cfg: ModelConfig
    samples_per_prompt: int
    new_tokens_bucket: int
    pad_id: int
    sampler_impl: str
    attention_impl: str


@functools.partial(jax.jit, static_argnames=("plan",))
def _prefill(params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array, *, plan: _Plan
             ) -> tuple[KVCache, jax.Array]:
    """Prefill [N_b, P_b] left-padded prompts once and fan out to n samples each.

    Returns the cache (k, v [L, N_b * n, P_b + new_tokens_bucket, K, hd]) and the float32
    next-token logits [N_b * n, V] of each row.
    """
    _TRACE_COUNTS["prefill"] += 1
    cfg = plan.model_cfg
    num_prompts, prompt_width = prompt_tokens.shape
    cache = init_kv_cache(cfg, num_prompts, prompt_width)
    hidden, cache = decoder_hidden_with_cache(
        params, cfg, prompt_tokens, positions_from_mask(prompt_mask), cache, jnp.int32(0), prompt_mask
    )
    # Left padding puts every row's last real token in the last column.
    logits = logits_from_hidden(params, cfg, hidden[:, -1])
    n = plan.samples_per_prompt
    cache = fan_out(cache, n, prompt_width + plan.new_tokens_bucket)
    return cache, jnp.repeat(logits, n, axis=0)


@functools.partial(jax.jit, static_argnames=("plan",), donate_argnames=("cache",))
def _decode(params: Params, cache: KVCache, first_logits: jax.Array, prompt_mask: jax.Array,
            prompt_lengths: jax.Array, row_active: jax.Array, key: jax.Array,
            is_stop_token: jax.Array, max_new_tokens: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array, *, plan: _Plan):
    """Sample up to ``max_new_tokens`` tokens per row in one ``lax.while_loop``.

    Row-shaped inputs have B = N_b * n rows: prompt_mask bool [B, P_b], prompt_lengths int32
    [B], row_active bool [B] (False = bucket padding, done from the start), is_stop_token
    bool [V] (a traced table, so new stop ids do not recompile), per-row controls
    temperature/top_p float32 [B], top_k int32 [B]; max_new_tokens int32 scalar (<= bucket).
    Returns (tokens int32, logprobs float32, entropies float32) [B, new_tokens_bucket],
    lengths int32 [B], finish_reason int32 [B], and the final cache (aliases the donated one).
    """
    _TRACE_COUNTS["decode"] += 1
    cfg = plan.model_cfg
    num_rows, prompt_width = prompt_mask.shape
    budget = plan.new_tokens_bucket
    limit = jnp.minimum(max_new_tokens, budget)
    attend = _decode_attention_fn(plan.attention_impl)

    def sample(logits, step):
        return sample_tokens(logits, make_key_data(key, step), temperature, top_k, top_p,
                             impl=plan.sampler_impl)

    def record(state, step, token, logprob, entropy):
        active = ~state["done"]
        token = jnp.where(active, token, plan.pad_id)

        def put(buffer, column):
            return lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1)

        stopped = active & is_stop_token[token]
        return dict(
            state,
            last_token=token,
            tokens=put(state["tokens"], token),
            logprobs=put(state["logprobs"], jnp.where(active, logprob, 0.0)),
            entropies=put(state["entropies"], jnp.where(active, entropy, 0.0)),
            lengths=state["lengths"] + active.astype(jnp.int32),
            finish=jnp.where(stopped, FINISH_STOP, state["finish"]),
            done=state["done"] | stopped | (step + 1 >= limit),
        )

    state = dict(
        step=jnp.int32(1),
        cache=cache,
        last_token=jnp.zeros((num_rows,), jnp.int32),
        tokens=jnp.full((num_rows, budget), plan.pad_id, jnp.int32),
        logprobs=jnp.zeros((num_rows, budget), jnp.float32),
        entropies=jnp.zeros((num_rows, budget), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32),
        finish=jnp.full((num_rows,), FINISH_LENGTH, jnp.int32),
        done=~row_active,
    )
    state = record(state, 0, *sample(first_logits, 0))
    new_slot = jnp.arange(budget)[None, :]

    def keep_going(state):
        return (state["step"] < limit) & ~jnp.all(state["done"])

    def decode_step(state):
        step = state["step"]
        # Feed completion token step-1 into slot P_b + step - 1; it and all earlier ones are valid.
        valid = jnp.concatenate([prompt_mask, jnp.broadcast_to(new_slot < step, (num_rows, budget))], axis=1)
        positions = (prompt_lengths + step - 1)[:, None]
        hidden, cache = decoder_hidden_with_cache(
            params, cfg, state["last_token"][:, None], positions, state["cache"],
            prompt_width + step - 1, valid, decode_attention=attend,
        )
        logits = logits_from_hidden(params, cfg, hidden[:, 0])
        state = record(dict(state, cache=cache), step, *sample(logits, step))
        return dict(state, step=step + 1)

    state = lax.while_loop(keep_going, decode_step, state)
    return (state["tokens"], state["logprobs"], state["entropies"], state["lengths"],
            state["finish"], state["cache"])


def _concrete(x) -> np.ndarray | None:
    """x as numpy when it is a concrete value, None under tracing or when it is a multi-host
    array whose values are partly on other processes' devices (not readable here)."""
    if not getattr(x, "is_fully_addressable", True) and not getattr(x, "is_fully_replicated", False):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _row_control(name: str, value, default, dtype, num_rows: int, padded_rows: int,
                 pad_value) -> jax.Array:
    """A per-row control as [padded_rows] (bucket-padding rows get ``pad_value``)."""
    if value is None:
        value = jnp.full((num_rows,), default, dtype)
    value = jnp.asarray(value, dtype)
    if value.ndim == 0:
        value = jnp.broadcast_to(value, (num_rows,))
    if value.shape != (num_rows,):
        raise ValueError(f"{name} must be a scalar or have shape [{num_rows}] (prompts * n), got {value.shape}")
    return jnp.concatenate([value, jnp.full((padded_rows - num_rows,), pad_value, dtype)])


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


def generate_from_params(params: Params, model_cfg: ModelConfig, prompt_tokens: jax.Array,
                         prompt_lengths: jax.Array, n: int, cfg: SamplingConfig, key: jax.Array,
                         *, temperature=None, top_k=None, top_p=None) -> Rollout:
    """Sample ``n`` completions per prompt; pure device-array entry point (jit-friendly).

    params: the model's parameter dict; model_cfg: its ModelConfig.
    prompt_tokens: int [N, P] left-padded prompts (P <= bucket_size(cfg.max_prompt_tokens));
    prompt_lengths: int [N], real tokens per prompt (1..cfg.max_prompt_tokens; checked when
    concrete). n: samples per prompt. key: a jax PRNG key (typed or raw uint32 [2]).
    temperature / top_p (float) and top_k (int): optional scalars or per-row [N * n] arrays
    overriding the config's defaults (row r belongs to prompt r // n).
    Returns a Rollout with B = N * n rows: prompt_tokens [B, P_b] (P_b = bucketed width),
    tokens / logprobs / entropies [B, cfg.max_new_tokens], lengths, finish_reason, group_ids.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    stop_ids = cfg.resolved_stop_token_ids(model_cfg)
    pad_id = cfg.resolved_pad_id(model_cfg)
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
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
    lengths_now = _concrete(prompt_lengths)
    if lengths_now is not None:
        if np.any(lengths_now < 1):
            raise ValueError(f"prompt_lengths must be >= 1 (empty prompt at rows {np.flatnonzero(lengths_now < 1).tolist()})")
        too_long = np.flatnonzero(lengths_now > min(width, cfg.max_prompt_tokens))
        if too_long.size:
            raise ValueError(
                f"prompt_lengths at rows {too_long.tolist()} exceed SamplingConfig.max_prompt_tokens="
                f"{cfg.max_prompt_tokens} or the array width {width}"
            )
    _check_controls(temperature, top_k, top_p)

    prompt_width = bucket_size(width, cfg.min_prompt_bucket)
    padded_prompts = bucket_size(num_prompts, cfg.min_batch_bucket)
    # Bucket padding: more left pad columns, and extra one-token prompts that start done.
    prompt_tokens = jnp.pad(prompt_tokens, ((0, padded_prompts - num_prompts), (prompt_width - width, 0)),
                            constant_values=pad_id)
    prompt_lengths = jnp.pad(prompt_lengths, (0, padded_prompts - num_prompts), constant_values=1)
    prompt_mask = jnp.arange(prompt_width)[None, :] >= (prompt_width - prompt_lengths)[:, None]
    prompt_tokens = jnp.where(prompt_mask, prompt_tokens, pad_id)

    plan = _Plan(
        model_cfg=model_cfg,
        samples_per_prompt=int(n),
        new_tokens_bucket=bucket_size(cfg.max_new_tokens, cfg.min_new_tokens_bucket),
        pad_id=pad_id,
        sampler_impl=resolve_impl(cfg.sampler_impl or cfg.impl),
        attention_impl=cfg.attention_impl or cfg.impl,
    )
    num_rows, padded_rows = num_prompts * n, padded_prompts * n
    row_temperature = _row_control("temperature", temperature, cfg.temperature, jnp.float32, num_rows, padded_rows, 0.0)
    row_top_k = _row_control("top_k", top_k, cfg.top_k, jnp.int32, num_rows, padded_rows, 0)
    row_top_p = _row_control("top_p", top_p, cfg.top_p, jnp.float32, num_rows, padded_rows, 1.0)
    row_active = jnp.arange(padded_rows) < num_rows
    is_stop_token = jnp.zeros((model_cfg.vocab_size,), bool).at[jnp.asarray(stop_ids, jnp.int32)].set(True)

    cache, first_logits = _prefill(params, prompt_tokens, prompt_mask, plan=plan)
    row_mask = jnp.repeat(prompt_mask, n, axis=0)
    row_lengths = jnp.repeat(prompt_lengths, n, axis=0)
    tokens, logprobs, entropies, lengths, finish, _ = _decode(
        params, cache, first_logits, row_mask, row_lengths, row_active, key, is_stop_token,
        jnp.int32(cfg.max_new_tokens), row_temperature, row_top_k, row_top_p, plan=plan,
    )
    keep = cfg.max_new_tokens
    return Rollout(
        prompt_tokens=jnp.repeat(prompt_tokens[:num_prompts], n, axis=0),
        prompt_lengths=row_lengths[:num_rows],
        tokens=tokens[:num_rows, :keep],
        logprobs=logprobs[:num_rows, :keep],
        entropies=entropies[:num_rows, :keep],
        lengths=lengths[:num_rows],
        finish_reason=finish[:num_rows],
        group_ids=jnp.arange(num_rows, dtype=jnp.int32) // n,
    )


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
