"""Order-preserving integer keys of float32 values, and a binary search over them.

``float_key`` maps float32 to int32 so that integer order is float order; a threshold on
floats then becomes a threshold on keys, and "the largest threshold with property X" is a
32-step binary search over the key range instead of a sort. The fused sampler uses it for its
top-k / top-p cut-offs (inside a Pallas kernel and in the jnp reference), the forking-token
mask (``jaxrl.rl.token_masks``) for its entropy quantile.

Keys are int32 (not uint32) because the Pallas lowerings compare signed integers natively.
The map is an involution on bit patterns, so :func:`key_to_float` inverts it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# float_key(-inf) and float_key(+inf): every non-NaN float32 has a key in this closed range.
KEY_NEG_INF = -2139095041
KEY_POS_INF = 2139095040
_SEARCH_STEPS = 32  # enough to shrink the interval [KEY_NEG_INF, KEY_POS_INF + 1] to width 1


def float_key(values: jax.Array) -> jax.Array:
    """int32 keys with key(a) < key(b) iff a < b, for non-NaN float32 values of any shape.

    -0.0 and +0.0 get the same key (that of +0.0). NaN has no place in the order: callers map
    it to a float first (e.g. ``jnp.where(jnp.isnan(x), -jnp.inf, x)``).
    """
    values = jnp.where(values == 0.0, 0.0, values)
    bits = lax.bitcast_convert_type(values, jnp.int32)
    return bits ^ (lax.shift_right_arithmetic(bits, 31) & 0x7FFFFFFF)


def key_to_float(keys: jax.Array) -> jax.Array:
    """float32 values of int32 keys: the exact inverse of :func:`float_key` (same shape)."""
    bits = keys ^ (lax.shift_right_arithmetic(keys, 31) & 0x7FFFFFFF)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """floor((lo + hi) / 2) for int32 without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def largest_key_where(predicate, active: jax.Array) -> jax.Array:
    """Largest int32 key u in [KEY_NEG_INF, KEY_POS_INF] with ``predicate(u)``, per element.

    predicate: maps int32 keys of ``active``'s shape to bools of that shape; it must be
    monotone (true up to some key, false above) and true at KEY_NEG_INF. active: bool array
    (any shape, a scalar included); elements that are not active get KEY_NEG_INF.
    Runs ``predicate`` exactly 32 times (a ``lax.fori_loop``, usable inside Pallas kernels).
    """
    lo0 = jnp.full(active.shape, KEY_NEG_INF, jnp.int32)
    hi0 = jnp.full(active.shape, KEY_POS_INF + 1, jnp.int32)

    def step(_, bounds):
        lo, hi = bounds
        mid = _midpoint(lo, hi)
        ok = predicate(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, _SEARCH_STEPS, step, (lo0, hi0))
    return jnp.where(active, lo, KEY_NEG_INF)
