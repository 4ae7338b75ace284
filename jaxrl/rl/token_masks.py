"""High-entropy "forking" token masks (Wang et al. 2025, "Beyond the 80/20 Rule").

Two selection rules over the N tokens of the population (valid response tokens, optionally
without truncated rows), chosen by ``rule``:

* ``"quantile"`` (default; the paper and TRL): τ = the (1 − ρ)-quantile of the population's
  entropies with linear interpolation (``torch.quantile`` / ``numpy.quantile`` "linear"),
  and every token with H ≥ τ is kept: ties at τ are all kept, so the count can differ from
  ρN.
* ``"count"``: exactly k = ⌈ρ·N⌉ tokens, the largest entropies, ties at the k-th value broken
  in favour of the smaller flattened index ``b * T + t``; τ is the entropy of the k-th.

Why no sort: an order statistic is found by a binary search over the 32-bit
order-preserving integer image of the float entropies (:mod:`jaxrl.kernels.float_keys`,
shared with the fused sampler), and the count rule's tie cut by a binary search over the
flattened index; every probe is an integer count over the whole array. Under ``jit`` those
counts are global reductions (an all-reduce when the array is sharded), so the result is
bit-identical under any sharding and nothing is gathered onto one device. Cost: ~32 passes
per order statistic (two for the quantile rule) + log2(B·T) for the count rule's tie cut.

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
MASK_RULES = ("quantile", "count")
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


def top_count_mask(values: jax.Array, population: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``k`` population elements with the largest ``values``, ties at the k-th value
    broken by the smaller flattened index → (bool, same shape; int32 key of the k-th value).

    values: float32 [...] (NaN ranks lowest); population: bool, same shape; k: int32 scalar
    (clipped to the population size by construction: at most the population is selected).
    """
    keys = _entropy_keys(values)
    tau = _kth_largest_key(keys, population, k)
    above = population & (keys > tau)
    at_threshold = population & (keys == tau)
    flat_index = jnp.arange(values.size, dtype=jnp.int32).reshape(values.shape)
    needed = k - jnp.sum(above, dtype=jnp.int32)
    return above | _first_indices(at_threshold, flat_index, needed), tau


def quantile_threshold(values: jax.Array, population: jax.Array, q: float) -> jax.Array:
    """float32 scalar: the q-quantile of ``values`` over ``population`` with linear
    interpolation, as ``torch.quantile(x, q)`` / ``numpy.quantile(x, q)`` (x sorted, position
    q·(n − 1) between order statistics); +inf for an empty population.

    values: float32 [...] (NaN ranks lowest); population: bool, same shape; q in [0, 1].
    The position is exact: q is rationalised to a/c (c ≤ 1e4) and q·(n − 1) split into
    integer and fractional parts in integers.
    """
    frac = Fraction(q).limit_denominator(_RHO_MAX_DENOMINATOR)
    a, c = frac.numerator, frac.denominator
    keys = _entropy_keys(values)
    n = jnp.sum(population, dtype=jnp.int32)
    m = jnp.maximum(n - 1, 0)
    # position = a·m / c = lo + rem / c, with a·(m mod c) < c·a ≤ 1e8 (no int32 overflow).
    lo = (m // c) * a + ((m % c) * a) // c
    rem = ((m % c) * a) % c
    hi = jnp.where(rem > 0, lo + 1, lo)
    # ascending rank j (0-based) = the (n − j)-th largest.
    x_lo = key_to_float(_kth_largest_key(keys, population, n - lo))
    x_hi = key_to_float(_kth_largest_key(keys, population, n - hi))
    weight = rem.astype(jnp.float32) / jnp.float32(c)
    tau = jnp.where(rem > 0, x_lo + weight * (x_hi - x_lo), x_lo)
    # In exact arithmetic τ > x_lo whenever the position is fractional and x_hi > x_lo;
    # keep float32 rounding from landing on x_lo (which would keep x_lo's ties).
    above_lo = jnp.maximum(tau, jnp.nextafter(x_lo, jnp.float32(jnp.inf)))
    tau = jnp.where((rem > 0) & (x_hi > x_lo), above_lo, tau)
    return jnp.where(n > 0, tau, jnp.float32(jnp.inf))


def forking_token_mask(
    entropy: jax.Array,
    valid: jax.Array,
    *,
    rho: float = 0.2,
    mode: str = "top",
    truncated: jax.Array | None = None,
    include_truncated: bool = True,
    rule: str = "quantile",
) -> tuple[jax.Array, jax.Array]:
    """Select the high-entropy (or, for ablations, the low-entropy) response tokens.

    entropy: float [B, T] entropies in nats (no gradient is taken through the mask).
    valid: bool/float [B, T], true (> 0) on response tokens; padding never counts.
    rho: fraction kept by ``mode="top"``, in (0, 1]. ρ = 1 keeps every valid token; a tiny ρ
      keeps the largest entropy (and, under "quantile", every token tied with it), as TRL.
    mode: "top" keeps the high-entropy tokens per ``rule``; "bottom" keeps the valid
      tokens "top" does not keep; "all" keeps every valid token.
    rule: "quantile" keeps every population token with H ≥ τ, τ the (1 − ρ)-quantile with
      linear interpolation; "count" keeps exactly ⌈ρ·N⌉, ties broken by flattened index.
    truncated: optional bool [B], rows that hit the length limit. With
      ``include_truncated=False`` their tokens are left out of the population that sets τ
      (they do not shape the quantile) and are then selected iff entropy ≥ τ.

    Returns (select bool [B, T], threshold float32 scalar): τ (for "count", the smallest
    entropy among the kept tokens); +inf when the population is empty; -inf for mode "all".
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if rule not in MASK_RULES:
        raise ValueError(f"rule must be one of {MASK_RULES}, got {rule!r}")
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
    if rule == "quantile":
        threshold = quantile_threshold(entropy, population, 1.0 - rho)
        top = valid & (keys >= float_key(threshold))
    else:
        k = selected_count(jnp.sum(population, dtype=jnp.int32), rho)
        top, tau = top_count_mask(entropy, population, k)
        # Rows outside the population (excluded truncated rows) are compared against τ.
        top = top | (valid & ~population & (keys >= tau) & (k > 0))
        threshold = jnp.where(k > 0, key_to_float(tau), jnp.float32(jnp.inf))
    if mode == "top":
        return top, threshold
    return valid & ~top, threshold
