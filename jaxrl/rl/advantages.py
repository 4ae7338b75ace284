"""Group-relative advantage estimators (ALGORITHMS.md, "Advantages").

Every function maps per-row scalar rewards float [B] (and, where a baseline is used, the
group id of each row, int [B]) to one float32 advantage per row [B]. They are pure and
jittable; ``num_groups`` must be static under ``jit``.

Group ids must lie in ``[0, num_groups)``; ``num_groups`` defaults to B, which is always
enough when ids are prompt indices within the batch. Empty group ids are allowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRPO_SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "nsr", "psr", "w_reinforce")


def _group_sums(values: jax.Array, group_ids: jax.Array, num_groups: int) -> jax.Array:
    """float [G]: per-group sum of ``values`` [B]."""
    return jax.ops.segment_sum(values, group_ids, num_segments=num_groups)


def _group_stats(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None):
    """Per-row group size, group mean and Bessel-corrected group std, each float32 [B]."""
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    num_groups = rewards.shape[0] if num_groups is None else num_groups
    group_counts = _group_sums(jnp.ones_like(rewards), group_ids, num_groups)
    group_means = _group_sums(rewards, group_ids, num_groups) / jnp.maximum(group_counts, 1.0)
    counts, means = group_counts[group_ids], group_means[group_ids]
    centred = rewards - means
    sq = _group_sums(centred * centred, group_ids, num_groups)[group_ids]
    # A singleton group has no spread: its std is 0 (and its centred reward is 0 too).
    stds = jnp.sqrt(sq / jnp.maximum(counts - 1.0, 1.0))
    return counts, means, stds


def grpo_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: int | None = None,
    scale: str = "group",
    eps: float = 1e-6,
) -> jax.Array:
    """GRPO: Â_i = (R_i − mean_g R) / (std + eps) → float32 [B].

    rewards: float [B]; group_ids: int [B] in [0, num_groups).
    scale: "group" divides by the Bessel-corrected std of the row's group; "batch" divides
      by the Bessel-corrected std of all B rewards (group mean, batch std); "none" does not
      divide (Dr.GRPO). Rows whose std is exactly 0 get advantage 0.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale must be one of {GRPO_SCALES}, got {scale!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    _, means, stds = _group_stats(rewards, group_ids, num_groups)
    centred = rewards - means
    if scale == "none":
        return centred
    if scale == "group":
        std = stds
    else:
        n = rewards.shape[0]
        std = jnp.sqrt(jnp.sum((rewards - rewards.mean()) ** 2) / max(n - 1, 1))
    # A zero-spread group is exactly 0 (also with eps=0, and free of float32 noise in the mean).
    return jnp.where(std > 0, centred / (std + eps), 0.0)


def dr_grpo_advantages(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """Dr.GRPO: Â_i = R_i − mean_g R (mean-centred, no std) → float32 [B]."""
    return grpo_advantages(rewards, group_ids, num_groups=num_groups, scale="none")


def rloo_advantages(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """RLOO: Â_i = R_i − mean_{j≠i, j∈g} R_j → float32 [B]; 0 for singleton groups."""
    rewards = jnp.asarray(rewards, jnp.float32)
    counts, means, _ = _group_stats(rewards, group_ids, num_groups)
    # R_i − (n·mean − R_i)/(n−1) = n/(n−1) · (R_i − mean)
    return jnp.where(counts > 1, counts / jnp.maximum(counts - 1.0, 1.0) * (rewards - means), 0.0)


def _is_correct(rewards: jax.Array, correct_threshold: float) -> jax.Array:
    return jnp.asarray(rewards, jnp.float32) >= correct_threshold


def nsr_advantages(rewards: jax.Array, *, correct_threshold: float = 0.5) -> jax.Array:
    """Negative-sample reinforcement: incorrect rows −1, correct rows 0 → float32 [B].

    A row is correct when its reward ≥ ``correct_threshold`` (rewards are meant to be {0,1}).
    """
    return jnp.where(_is_correct(rewards, correct_threshold), 0.0, -1.0).astype(jnp.float32)


def psr_advantages(rewards: jax.Array, *, correct_threshold: float = 0.5) -> jax.Array:
    """Positive-sample reinforcement: correct rows +1, incorrect rows 0 → float32 [B]."""
    return jnp.where(_is_correct(rewards, correct_threshold), 1.0, 0.0).astype(jnp.float32)


def w_reinforce_advantages(
    rewards: jax.Array, *, positive_weight: float = 0.1, correct_threshold: float = 0.5
) -> jax.Array:
    """W-REINFORCE: correct rows +λ (``positive_weight``), incorrect −1 → float32 [B]."""
    return jnp.where(_is_correct(rewards, correct_threshold), positive_weight, -1.0).astype(
        jnp.float32
    )


def compute_advantages(
    estimator: str,
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: int | None = None,
    grpo_scale: str = "group",
    eps: float = 1e-6,
    positive_weight: float = 0.1,
    correct_threshold: float = 0.5,
) -> jax.Array:
    """Dispatch on ``estimator`` (one of ESTIMATORS) → float32 advantages [B]."""
    if estimator == "grpo":
        return grpo_advantages(rewards, group_ids, num_groups=num_groups, scale=grpo_scale, eps=eps)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids, num_groups=num_groups)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids, num_groups=num_groups)
    if estimator == "nsr":
        return nsr_advantages(rewards, correct_threshold=correct_threshold)
    if estimator == "psr":
        return psr_advantages(rewards, correct_threshold=correct_threshold)
    if estimator == "w_reinforce":
        return w_reinforce_advantages(
            rewards, positive_weight=positive_weight, correct_threshold=correct_threshold
        )
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
