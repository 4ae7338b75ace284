"""How the update combines its micro-batches' metrics into the mini-batch's: one rule, used by
the fixed micro-batch scan (:mod:`jaxrl.train.step`) and the token-budget walk
(:mod:`jaxrl.train.budget_step`).

* Loss terms, already normalised by mini-batch totals (``ADDITIVE_METRICS``), add up.
* ``ratio_max`` is a max.
* Every other metric is a token mean within its micro-batch; the mini-batch value is their
  mean weighted by each micro-batch's valid loss tokens (so it is the mini-batch token mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADDITIVE_METRICS = ("loss", "pg_loss", "kl_loss", "entropy_bonus")
MAX_METRICS = ("ratio_max",)


def _weighted(name: str) -> bool:
    return name not in ADDITIVE_METRICS and name not in MAX_METRICS


def combine_stacked(stacked: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
    """Metrics of M micro-batches stacked on axis 0 ([M] each) and their token weights f32 [M]
    → the mini-batch's metrics (f32 scalars)."""
    weight_total = jnp.maximum(jnp.sum(weights), 1.0)
    combined = {}
    for name, values in stacked.items():
        if name in ADDITIVE_METRICS:
            combined[name] = jnp.sum(values)
        elif name in MAX_METRICS:
            combined[name] = jnp.max(values)
        else:
            combined[name] = jnp.sum(values * weights) / weight_total
    return combined


def fold(sums: dict[str, jax.Array], metrics: dict[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
    """Running form for a loop over micro-batches: ``sums`` (start from zeros) with one
    micro-batch's ``metrics`` of token weight ``weight`` folded in; :func:`finish` at the end."""
    folded = {}
    for name, value in metrics.items():
        if name in ADDITIVE_METRICS:
            folded[name] = sums[name] + value
        elif name in MAX_METRICS:
            folded[name] = jnp.maximum(sums[name], value)
        else:
            folded[name] = sums[name] + value * weight
    return folded


def finish(sums: dict[str, jax.Array], weight_sum: jax.Array) -> dict[str, jax.Array]:
    """The mini-batch's metrics from :func:`fold`'s sums and the total token weight."""
    weight_total = jnp.maximum(weight_sum, 1.0)
    return {name: value / weight_total if _weighted(name) else value for name, value in sums.items()}
