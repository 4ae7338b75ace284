"""High-entropy "forking" token masks (Wang et al. 2025, "Beyond the 80/20 Rule").

The top-ρ mask keeps exactly k = ⌈ρ·N⌉ of the N tokens in the population (valid response
tokens, optionally without truncated rows): those with the largest entropy, ties broken in
favour of the smaller flattened index ``b * T + t``. The threshold τ is the entropy of the
k-th kept token.

Why no sort: τ is found by a binary search over the 32-bit order-preserving integer image of
the float entropies (:mod:`jaxrl.kernels.float_keys`, shared with the fused sampler), and
the tie cut by a binary search over the flattened index; every probe is an integer count
over the whole array. Under ``jit`` those counts are global
reductions (an all-reduce when the array is sharded), so the result is bit-identical under
any sharding and nothing is gathered onto one device. Cost: ~32 + log2(B·T) passes over
[B, T], negligible next to the model.

Which batch the population is (the *scope*) is the caller's choice: pass the whole step's
response tokens for the paper's ``batch`` scope, or one minibatch for ``minibatch`` scope.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from jaxrl.kernels.float_keys import float_key, key_to_float, largest_key_where

MASK_MODES = ("all", "top", "bottom")
_RHO_MAX_DENOMINATOR = 10_000


def selected_count(num_tokens: jax.Array, rho: float) -> jax.Array:
    """int32 scalar ⌈ρ·N⌉ computed exactly in integers (ρ rounded to a fraction p/q, q ≤ 1e4).

    Float products such as 0.2·10 = 2.0000000298 would otherwise round up to 3.
    """
    frac = Fraction(rho).limit_denominator(_RHO_MAX_DENOMINATOR)
    p, q = frac.numerator, frac.denominator
    n = jnp.asarray(num_tokens, jnp.int32)
    # ⌈n·p/q⌉ = (n // q)·p + ⌈(n mod q)·p / q⌉; (n mod q)·p < q·p ≤ 1e8 fits in int32.
    return (n // q) * p + ((n % q) * p + q - 1) // q


def _entropy_keys(values: jax.Array) -> jax.Array:
    """int32 order-preserving keys of float32 entropies (NaN ranks as -inf, -0 as +0)."""
    values = jnp.asarray(values, jnp.float32)
    return float_key(jnp.where(jnp.isnan(values), -jnp.inf, values))


def _kth_largest_key(keys: jax.Array, population: jax.Array, k: jax.Array) -> jax.Array:
    """Largest key τ with #{population, key ≥ τ} ≥ k (int32 scalar); any key if k = 0."""
    return largest_key_where(lambda u: jnp.sum(population & (keys >= u), dtype=jnp.int32) >= k,
                             jnp.bool_(True))


def _first_indices(candidates: jax.Array, flat_index: jax.Array, needed: jax.Array) -> jax.Array:
    """Keep the ``needed`` candidates with the smallest flattened index (bool, same shape)."""
    total = flat_index.size

    def count_below(cut):
        return jnp.sum(candidates & (flat_index < cut), dtype=jnp.int32)

    def probe(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        enough = count_below(mid) >= needed
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    steps = max(1, math.ceil(math.log2(total + 1)))
    cut, _ = jax.lax.fori_loop(0, steps, probe, (jnp.int32(0), jnp.int32(total)))
    return candidates & (flat_index < cut)


def forking_token_mask(
    entropy: jax.Array,
    valid: jax.Array,
    *,
    rho: float = 0.2,
    mode: str = "top",
    truncated: jax.Array | None = None,
    include_truncated: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Select the high-entropy (or, for ablations, the low-entropy) response tokens.

    entropy: float [B, T] entropies in nats (no gradient is taken through the mask).
    valid: bool/float [B, T], true (> 0) on response tokens; padding never counts.
    rho: fraction kept by ``mode="top"``, in (0, 1].
    mode: "top" keeps ⌈ρ·N⌉ tokens with the largest entropy; "bottom" keeps the valid
      tokens "top" does not keep; "all" keeps every valid token.
    truncated: optional bool [B], rows that hit the length limit. With
      ``include_truncated=False`` their tokens are left out of the population that sets τ
      (they do not shape the quantile) and are then selected iff entropy ≥ τ.

    Returns (select bool [B, T], threshold float32 scalar): τ = the smallest entropy among
    the population's top-ρ tokens; +inf when the population is empty; -inf for mode "all".
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    valid = jnp.asarray(valid) > 0
    if mode == "all":
        return valid, jnp.float32(-jnp.inf)

    entropy = jax.lax.stop_gradient(jnp.asarray(entropy, jnp.float32))
    population = valid
    if truncated is not None and not include_truncated:
        population = valid & ~jnp.asarray(truncated, bool)[:, None]
    keys = _entropy_keys(entropy)
    k = selected_count(jnp.sum(population, dtype=jnp.int32), rho)
    tau = _kth_largest_key(keys, population, k)

    above = population & (keys > tau)
    at_threshold = population & (keys == tau)
    flat_index = jnp.arange(entropy.size, dtype=jnp.int32).reshape(entropy.shape)
    needed = k - jnp.sum(above, dtype=jnp.int32)
    top = above | _first_indices(at_threshold, flat_index, needed)
    # Rows outside the population (excluded truncated rows) are compared against τ.
    top = top | (valid & ~population & (keys >= tau) & (k > 0))
    threshold = jnp.where(k > 0, key_to_float(tau), jnp.float32(jnp.inf))
    if mode == "top":
        return top, threshold
    return valid & ~top, threshold
