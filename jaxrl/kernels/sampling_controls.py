"""The sampler's per-row controls rule, in one place: which rows are greedy and which cut the
vocabulary with top-k or top-p (used inside the sampler on device, and on the host to decide
whether a program needs the threshold searches at all)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def row_controls(temperature, top_k, top_p, vocab_size: int, xp=jnp):
    """Per-row (greedy, 1/T as float32, top-k active, top-p active); any matching shapes.
    Greedy: T <= 0 (then 1/T is 1); top-k is on for 0 < k < V and top-p for p < 1, on
    sampled rows only. ``xp``: jnp (traced) or np (host values, no device program)."""
    greedy = temperature <= 0.0
    inv_temperature = (1.0 / xp.where(greedy, 1.0, temperature)).astype(xp.float32)
    use_top_k = (~greedy) & (top_k > 0) & (top_k < vocab_size)
    use_top_p = (~greedy) & (top_p < 1.0)
    return greedy, inv_temperature, use_top_k, use_top_p


def controls_may_truncate(temperature, top_k, top_p, vocab_size: int) -> bool:
    """Whether any row of these host controls (numpy arrays [B] or scalars) has top-k or top-p
    on (:func:`row_controls`). A control passed as None (its values are not readable on this
    host, e.g. traced) counts as truncating."""
    controls = (temperature, top_k, top_p)
    if any(x is None for x in controls):
        return True
    _, _, use_top_k, use_top_p = row_controls(*(np.asarray(x) for x in controls), vocab_size, xp=np)
    return bool(np.any(use_top_k) or np.any(use_top_p))
