"""Fused token sampler: logits -> (token, log-prob, entropy), one streaming kernel per row.

Semantics (shared by the Pallas kernel and the pure-jnp reference, which use the same noise;
tokens agree bitwise in interpret mode. The only summation-order-dependent input to the token
is the top-p mass comparison, so a top-p boundary within float32 rounding of ``p`` could pick a
different threshold; on GPU, exp/log/div may also differ from XLA's by an ulp):

* ``z`` = logits in float32, ``x = z * (1/T)`` per row (the reciprocal is computed once per row
  outside the kernel, so kernel and reference scale identically). ``T == 0`` means greedy
  (then ``x = z``).
* Entropy ``H = -sum_v p_v log p_v`` with ``p = softmax(x)`` over the FULL vocabulary (no
  top-k/top-p). Greedy rows report the entropy at T = 1.
* Kept set ``K = {v : key(z_v) >= threshold}`` where ``key`` is a monotone int32 map of the
  float bit pattern (:func:`jaxrl.kernels.float_keys.float_key`). Top-k (``0 < k < V``)
  first: the threshold is the k-th largest logit; then top-p (``p < 1``) on the
  top-k-renormalised distribution: the largest logit value ``u`` such that the probability
  mass of ``{z >= u}`` (within the top-k set) is at least ``p`` times the top-k mass.
  Thresholds are found by a binary search over the 2^32 key values (32 counting /
  mass-summing passes, :func:`jaxrl.kernels.float_keys.largest_key_where`), never by
  sorting. **Ties**: every token whose logit equals the threshold is kept, so top-k may keep
  more than k tokens when logits tie.
* Token: Gumbel-max, ``argmax_{v in K} x_v + g_v`` (lowest index wins exact ties), with
  ``g_v = -log(-log(u_v))`` and ``u_v`` from a counter-based integer hash of
  (key words, row, v) — see :func:`jaxrl.kernels.noise.gumbel_noise`. Greedy rows use
  ``g = 0`` (argmax of z).
* Log-prob of the chosen token under the distribution actually sampled:
  ``x_c - logsumexp_{v in K} x_v``, evaluated as ``(z_c - max_K z)/T - log sum_K e^{(z - max_K z)/T}``
  (shifting in logit units keeps the max entry at exactly 0 even when T is tiny). Greedy rows report 0 (the degenerate distribution).
* A row with no finite logit returns token 0, log-prob 0, entropy 0.

Noise/key contract: ``key_data`` is uint32 ``[2]`` (shared by all rows; the row index is hashed
in) or uint32 ``[B, 2]`` (one pair per row, the row index is still hashed in). Build it with
:func:`make_key_data` from a jax PRNG key and the decode step. When calling under
``shard_map`` with per-shard row indices, pass per-row ``[B, 2]`` words derived from global
row ids, otherwise shards draw identical noise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxrl.kernels.backend import resolve_impl
from jaxrl.kernels.float_keys import KEY_NEG_INF, float_key, largest_key_where
from jaxrl.kernels.noise import gumbel_from_seeds, gumbel_noise, make_key_data, per_row_key_words, row_seeds
from jaxrl.kernels.sampling_controls import controls_may_truncate, row_controls

__all__ = ["controls_may_truncate", "gumbel_noise", "make_key_data", "sample_tokens", "sample_tokens_reference"]

_NEG_INF = float("-inf")


def _finish(greedy, inv_temperature, s, t, kept_max, kept_sum, chosen_z):
    """(log-prob, entropy); guards rows with nothing finite.

    s, t: full-vocab sum e^d and sum e^d d with d = (z - max z) / T (t None: no entropy, 0 is
    returned); kept_max: max logit of the kept set (0 if none), kept_sum: sum over the kept set
    of e^{(z - kept_max)/T}; chosen_z: logit of the sampled token.
    """
    has_mass = s > 0.0
    s_safe = jnp.where(has_mass, s, 1.0)
    entropy = jnp.zeros_like(s) if t is None else jnp.where(has_mass, jnp.log(s_safe) - t / s_safe, 0.0)
    kept_ok = (kept_sum > 0.0) & (~greedy)
    chosen_shift = jnp.where(kept_ok, (chosen_z - kept_max) * inv_temperature, 0.0)
    logprob = jnp.where(kept_ok, chosen_shift - jnp.log(jnp.where(kept_ok, kept_sum, 1.0)), 0.0)
    return logprob, entropy


def top_p_threshold(mass_above, thr_k, top_p, active):
    """Top-p key threshold per row: the largest key u whose mass ``mass_above(u)`` (within the
    top-k set, floor ``thr_k``) is >= top_p times the top-k mass and > 0. Shapes follow
    ``thr_k`` / ``top_p`` / ``active`` ([B] in the reference, [R, 1] in the kernel)."""
    mass_k = mass_above(thr_k)

    def enough_mass(u):
        mass = mass_above(u)
        return (mass >= top_p * mass_k) & (mass > 0.0)

    return largest_key_where(enough_mass, active)


# ----------------------------------------------------------------------------------------------
# Reference (pure jnp, whole rows at once)
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("compute_entropy", "may_truncate"))
def sample_tokens_reference(logits, key_data, temperature, top_k, top_p, *, compute_entropy=True,
                            may_truncate=True):
    """Pure-jnp sampler with the kernel's semantics and noise (see module docstring).

    logits: float32/bf16 [B, V]; key_data: uint32 [2] or [B, 2]; temperature: float32 [B]
    (0 = greedy); top_k: int32 [B] (0 or >= V = off); top_p: float32 [B] (1 = off).
    compute_entropy: False skips the entropy sum (entropies are then zeros).
    may_truncate: False promises that no row has top-k or top-p on (the caller checked the
    concrete controls): the threshold searches are then not compiled at all.
    Returns tokens int32 [B], logprobs float32 [B] (nats), entropies float32 [B] (nats).
    Work skipped at run time (``lax.cond``): the threshold searches when no row truncates, the
    noise when every row is greedy, and the kept-set pass when nothing is cut (it equals the
    full-vocabulary sums then, bit for bit).
    """
    num_rows, vocab_size = logits.shape
    z = logits.astype(jnp.float32)
    greedy, inv_temperature, use_top_k, use_top_p = row_controls(
        temperature[:, None], top_k[:, None], top_p[:, None], vocab_size
    )
    # Shifted in logit units before scaling, so the max entry has d = 0 exactly (no rounding
    # residue from z/T that fused multiply-adds would turn into a spurious entropy).
    m = jnp.max(z, axis=1, keepdims=True)
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    d = (z - m_safe) * inv_temperature
    e = jnp.exp(d)
    s = jnp.sum(e, axis=1, keepdims=True)
    t = jnp.sum(jnp.where(z > _NEG_INF, e * d, 0.0), axis=1, keepdims=True) if compute_entropy else None

    keys = float_key(z)
    k_active = use_top_k[:, 0]
    no_threshold = lambda: jnp.full((num_rows,), KEY_NEG_INF, jnp.int32)
    # Without truncation the conds below would always take their second branch: static here.
    cond = lax.cond if may_truncate else (lambda _, on, off: off())
    thr_k = cond(
        jnp.any(k_active),
        lambda: largest_key_where(
            lambda u: jnp.sum(keys >= u[:, None], axis=1) >= top_k, k_active
        ),
        no_threshold,
    )

    def mass_above(u):
        kept = keys >= jnp.maximum(u, thr_k)[:, None]
        return jnp.sum(jnp.where(kept, e, 0.0), axis=1)

    p_active = use_top_p[:, 0]
    thr_p = cond(
        jnp.any(p_active),
        lambda: top_p_threshold(mass_above, thr_k, top_p, p_active),
        no_threshold,
    )
    threshold = jnp.maximum(thr_k, thr_p)[:, None]

    kept = keys >= threshold
    noise = lax.cond(
        jnp.all(greedy),
        lambda: jnp.zeros(z.shape, jnp.float32),
        lambda: jnp.where(greedy, 0.0, gumbel_noise(key_data, num_rows, vocab_size)),
    )
    score = jnp.where(kept, z * inv_temperature + noise, _NEG_INF)
    # argmax as max + lowest index at the max (the kernel's rule): two plain reductions, ~30x
    # faster than XLA CPU's variadic (value, index) reduce at [64, 4096]; same result (no NaN).
    best = jnp.max(score, axis=1, keepdims=True)
    tokens = jnp.min(jnp.where(score == best, jnp.arange(vocab_size, dtype=jnp.int32), vocab_size), axis=1)

    def kept_stats():
        kept_z = jnp.where(kept, z, _NEG_INF)
        kept_max = jnp.max(kept_z, axis=1, keepdims=True)
        kept_max_safe = jnp.where(kept_max > _NEG_INF, kept_max, 0.0)
        return kept_max_safe, jnp.sum(jnp.exp((kept_z - kept_max_safe) * inv_temperature), axis=1, keepdims=True)

    # Nothing cut: the kept set is the whole vocabulary, whose max and sum are m and s.
    kept_max_safe, kept_sum = cond(
        jnp.any(use_top_k | use_top_p), kept_stats, lambda: (m_safe, s)
    )
    chosen_z = jnp.take_along_axis(z, tokens[:, None], axis=1)
    logprob, entropy = _finish(greedy, inv_temperature, s, t, kept_max_safe, kept_sum, chosen_z)
    return tokens, logprob[:, 0], entropy[:, 0]


# ----------------------------------------------------------------------------------------------
# Pallas kernel: one program per block of rows, streaming vocabulary tiles
# ----------------------------------------------------------------------------------------------


def _sampling_kernel(
    logits_ref,  # [R, V_in] logits (V_in = V, or V rounded up to block_v when padded)
    row_ints_ref,  # [R, 4] int32: seed0, seed1, top_k, flags (1 greedy, 2 top-k on, 4 top-p on)
    row_floats_ref,  # [R, 2] float32: 1/temperature (1 when greedy), top_p
    token_ref,  # [R, 1] int32
    logprob_ref,  # [R, 1] float32
    entropy_ref,  # [R, 1] float32
    *,
    vocab_size: int,
    block_v: int,
    num_tiles: int,
    masked_tail: bool,
    compute_entropy: bool,
    may_truncate: bool,
):
    rows_per_block = token_ref.shape[0]
    shape = (rows_per_block, 1)
    row = pl.program_id(0) * rows_per_block + lax.broadcasted_iota(jnp.int32, shape, 0)
    seed0 = row_ints_ref[:, 0:1]
    seed1 = row_ints_ref[:, 1:2]
    top_k = row_ints_ref[:, 2:3]
    flags = row_ints_ref[:, 3:4]
    greedy = (flags & 1) != 0
    use_top_k = (flags & 2) != 0
    use_top_p = (flags & 4) != 0
    inv_temperature = row_floats_ref[:, 0:1]
    top_p = row_floats_ref[:, 1:2]
    first, second = row_seeds(seed0, seed1, row)
    lane = lax.broadcasted_iota(jnp.int32, (1, block_v), 1)

    def load_tile(j):
        """(vocab index [1, block_v], z [R, block_v] f32 with -inf beyond the vocab)."""
        start = j * block_v
        index = start + lane
        in_vocab = index < vocab_size
        window = logits_ref.at[:, pl.ds(pl.multiple_of(start, block_v), block_v)]
        if masked_tail:
            mask = jnp.broadcast_to(in_vocab, (rows_per_block, block_v))
            raw = plgpu.load(window, mask=mask, other=_NEG_INF)
        else:
            raw = window[...]
        z = jnp.where(in_vocab, raw.astype(jnp.float32), _NEG_INF)
        return index, z

    zeros_f = jnp.zeros(shape, jnp.float32)
    neg_inf = jnp.full(shape, _NEG_INF, jnp.float32)

    # Pass 1 (full vocabulary): online m = max z, s = sum e^d, t = sum e^d d, d = (z - m) / T.
    # Rescaling when m grows to m': s' = e^c s, t' = e^c (t + c s), c = (m - m') / T.
    def stats_body(j, carry):
        m, s, t = carry
        _, z = load_tile(j)
        m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
        m_safe = jnp.where(m_new > _NEG_INF, m_new, 0.0)
        shift = (m - m_safe) * inv_temperature
        scale = jnp.exp(shift)
        d = (z - m_safe) * inv_temperature
        e = jnp.exp(d)
        if compute_entropy:
            t = scale * (t + jnp.where(s > 0.0, shift, 0.0) * s) + jnp.sum(
                jnp.where(z > _NEG_INF, e * d, 0.0), axis=1, keepdims=True
            )
        s = scale * s + jnp.sum(e, axis=1, keepdims=True)
        return m_new, s, t

    m, s, t = lax.fori_loop(0, num_tiles, stats_body, (neg_inf, zeros_f, zeros_f))
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)

    def reduce_tiles(tile_fn, init):
        return lax.fori_loop(0, num_tiles, lambda j, acc: acc + tile_fn(*load_tile(j)), init)

    def any_row(flags):
        return jnp.max(flags.astype(jnp.int32)) > 0

    no_threshold = jnp.full(shape, KEY_NEG_INF, jnp.int32)
    cond = lax.cond if may_truncate else (lambda _, on, off: off())  # see the reference

    def count_at_least(u):
        def tile_count(_, z):
            return jnp.sum((float_key(z) >= u).astype(jnp.int32), axis=1, keepdims=True)

        return reduce_tiles(tile_count, jnp.zeros(shape, jnp.int32))

    thr_k = cond(
        any_row(use_top_k),
        lambda: largest_key_where(lambda u: count_at_least(u) >= top_k, use_top_k),
        lambda: no_threshold,
    )

    def mass_above(u):
        floor = jnp.maximum(u, thr_k)

        def tile_mass(_, z):
            e = jnp.exp((z - m_safe) * inv_temperature)
            return jnp.sum(jnp.where(float_key(z) >= floor, e, 0.0), axis=1, keepdims=True)

        return reduce_tiles(tile_mass, zeros_f)

    thr_p = cond(
        any_row(use_top_p), lambda: top_p_threshold(mass_above, thr_k, top_p, use_top_p), lambda: no_threshold
    )
    threshold = jnp.maximum(thr_k, thr_p)

    # Final pass: Gumbel-max over the kept set, kept-set log-sum-exp, logit of the winner.
    def choose_body(j, carry):
        best_score, best_index, best_z, kept_max, kept_sum = carry
        index, z = load_tile(j)
        kept = float_key(z) >= threshold
        noise = jnp.where(greedy, 0.0, gumbel_from_seeds(first, second, index))
        score = jnp.where(kept, z * inv_temperature + noise, _NEG_INF)
        tile_best = jnp.max(score, axis=1, keepdims=True)
        tile_index = jnp.min(
            jnp.where(score == tile_best, index, jnp.int32(2**31 - 1)), axis=1, keepdims=True
        )
        tile_z = jnp.max(jnp.where(index == tile_index, z, _NEG_INF), axis=1, keepdims=True)
        better = tile_best > best_score
        kept_z = jnp.where(kept, z, _NEG_INF)
        new_max = jnp.maximum(kept_max, jnp.max(kept_z, axis=1, keepdims=True))
        new_max_safe = jnp.where(new_max > _NEG_INF, new_max, 0.0)
        kept_sum = kept_sum * jnp.exp((kept_max - new_max_safe) * inv_temperature) + jnp.sum(
            jnp.exp((kept_z - new_max_safe) * inv_temperature), axis=1, keepdims=True
        )
        return (
            jnp.where(better, tile_best, best_score),
            jnp.where(better, tile_index, best_index),
            jnp.where(better, tile_z, best_z),
            new_max,
            kept_sum,
        )

    init = (neg_inf, jnp.zeros(shape, jnp.int32), neg_inf, neg_inf, zeros_f)
    _, token, chosen_z, kept_max, kept_sum = lax.fori_loop(0, num_tiles, choose_body, init)
    kept_max_safe = jnp.where(kept_max > _NEG_INF, kept_max, 0.0)
    logprob, entropy = _finish(greedy, inv_temperature, s, t if compute_entropy else None,
                               kept_max_safe, kept_sum, chosen_z)
    token_ref[...] = token
    logprob_ref[...] = logprob
    entropy_ref[...] = entropy


def _sample_tokens_pallas(logits, key_data, temperature, top_k, top_p, *, block_v, block_rows, pad_vocab, interpret,
                          compute_entropy=True, may_truncate=True):
    """pallas_call wrapper; shapes as in :func:`sample_tokens`."""
    num_rows, vocab_size = logits.shape
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if block_rows <= 0 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    block_v = min(block_v, pl.next_power_of_2(vocab_size))
    num_tiles = pl.cdiv(vocab_size, block_v)
    seed0, seed1 = per_row_key_words(key_data, num_rows)
    greedy, inv_temperature, use_top_k, use_top_p = row_controls(
        temperature, top_k, top_p, vocab_size
    )
    flags = greedy.astype(jnp.int32) + 2 * use_top_k.astype(jnp.int32) + 4 * use_top_p.astype(jnp.int32)
    row_ints = jnp.stack([seed0, seed1, top_k, flags], axis=1)
    row_floats = jnp.stack([inv_temperature, top_p], axis=1)

    padded_rows = pl.cdiv(num_rows, block_rows) * block_rows
    if padded_rows != num_rows:  # extra rows are sampled from zeros and dropped
        extra = padded_rows - num_rows
        logits = jnp.pad(logits, ((0, extra), (0, 0)))
        row_ints = jnp.pad(row_ints, ((0, extra), (0, 0)))
        row_floats = jnp.pad(row_floats, ((0, extra), (0, 0)), constant_values=1.0)
    if pad_vocab and num_tiles * block_v != vocab_size:
        logits = jnp.pad(
            logits, ((0, 0), (0, num_tiles * block_v - vocab_size)), constant_values=_NEG_INF
        )
    vocab_in = logits.shape[1]

    kernel = functools.partial(
        _sampling_kernel,
        vocab_size=vocab_size,
        block_v=block_v,
        num_tiles=num_tiles,
        masked_tail=not pad_vocab,
        compute_entropy=compute_entropy,
        may_truncate=may_truncate,
    )
    row_block = lambda width: pl.BlockSpec((block_rows, width), lambda i: (i, 0))
    tokens, logprobs, entropies = pl.pallas_call(
        kernel,
        grid=(padded_rows // block_rows,),
        in_specs=[row_block(vocab_in), row_block(4), row_block(2)],
        out_specs=[row_block(1), row_block(1), row_block(1)],
        out_shape=[
            jax.ShapeDtypeStruct((padded_rows, 1), jnp.int32),
            jax.ShapeDtypeStruct((padded_rows, 1), jnp.float32),
            jax.ShapeDtypeStruct((padded_rows, 1), jnp.float32),
        ],
        interpret=interpret,
        # The masked-tail path is the GPU path: select the Triton backend explicitly (jax may
        # default to Mosaic GPU, which this row-streaming kernel is not written for).
        compiler_params=None if pad_vocab else plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="fused_sampler",
    )(logits, row_ints, row_floats)
    return tokens[:num_rows, 0], logprobs[:num_rows, 0], entropies[:num_rows, 0]


@functools.partial(
    jax.jit, static_argnames=("impl", "block_v", "interpret", "block_rows", "pad_vocab", "compute_entropy",
                              "may_truncate")
)
def sample_tokens(
    logits,
    key_data,
    temperature,
    top_k,
    top_p,
    *,
    impl="auto",
    block_v=2048,
    interpret=None,
    block_rows=None,
    pad_vocab=None,
    compute_entropy=True,
    may_truncate=True,
):
    """Sample one token per row; semantics in the module docstring.

    logits: float32 or bfloat16 [B, V] (any V; -inf entries allowed, +inf/NaN are not).
    key_data: uint32 [2] or [B, 2] (see :func:`make_key_data`).
    temperature: float32 [B] (0 = greedy); top_k: int32 [B] (0 or >= V = off);
    top_p: float32 [B] (1.0 = off). Per-row arrays, so new values do not recompile.
    impl: "auto" (Pallas on GPU/TPU, reference elsewhere), "pallas" or "reference".
    block_v: vocab tile (power of two); block_rows: rows per program (power of two; default 8
    on TPU, else 1); pad_vocab: pad V to a tile multiple with -inf
    instead of masked loads (default: True on TPU, which has no masked loads).
    interpret: run the Pallas kernel in interpret mode (default: when the backend is CPU).
    compute_entropy: False skips the entropy sum (entropies are zeros; log-probs unchanged).
    may_truncate: False promises that no row has top-k (0 < k < V) or top-p (< 1) on, e.g.
    after :func:`controls_may_truncate` on concrete controls; the threshold searches are then
    not compiled (compile time; results identical). Rows that do truncate are then sampled
    untruncated, so never pass False without checking.
    Returns (tokens int32 [B], logprobs float32 [B], entropies float32 [B]).
    """
    num_rows = logits.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (num_rows,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (num_rows,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (num_rows,))
    if resolve_impl(impl) == "reference":
        return sample_tokens_reference(logits, key_data, temperature, top_k, top_p,
                                       compute_entropy=compute_entropy, may_truncate=may_truncate)
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if block_rows is None:
        block_rows = 8 if backend == "tpu" else 1
    if pad_vocab is None:
        pad_vocab = backend == "tpu"
    return _sample_tokens_pallas(
        logits,
        key_data,
        temperature,
        top_k,
        top_p,
        block_v=block_v,
        block_rows=block_rows,
        pad_vocab=pad_vocab,
        interpret=interpret,
        compute_entropy=compute_entropy,
        may_truncate=may_truncate,
    )
