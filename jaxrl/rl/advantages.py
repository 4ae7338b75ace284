"""Group-relative advantage estimators (docs/algorithms.md, "Advantage estimators").

Every function maps per-row scalar rewards float [B] (and, where a baseline is used, the
group id of each row, int [B]) to one float32 advantage per row [B]. They are pure and
jittable; ``num_groups`` must be static under ``jit``.

Group ids must lie in ``[0, num_groups)``; ``num_groups`` defaults to B, which is always
enough when ids are prompt indices within the batch. Empty group ids are allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

GRPO_SCALES = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Settings every registered estimator receives (config keys in parentheses).

    estimator: registered name (``rl.estimator``). grpo_scale: "group" | "batch" | "none"
    (``rl.grpo_scale``). eps: added to the GRPO std. positive_weight: W-REINFORCE λ
    (``rl.positive_weight``). correct_threshold: a reward ≥ this is correct, for the
    sign-based estimators (``rewards.correct_threshold``).
    """

    estimator: str = "grpo"
    grpo_scale: str = "group"
    eps: float = 1e-6
    positive_weight: float = 0.1
    correct_threshold: float = 0.5


EstimatorFn = Callable[[jax.Array, jax.Array, "int | None", AdvantageConfig], jax.Array]


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``fn(rewards [B], group_ids [B], num_groups, cfg) -> [B]``;
    ``needs_groups``: it compares rows within a group, so groups need ≥ 2 samples."""

    fn: EstimatorFn
    needs_groups: bool


_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, *, needs_groups: bool) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: registers ``fn(rewards, group_ids, num_groups, cfg: AdvantageConfig) ->
    float32 [B]`` as ``rl.estimator = name``."""

    def register(fn: EstimatorFn) -> EstimatorFn:
        if name in _ESTIMATORS and _ESTIMATORS[name].fn is not fn:
            raise ValueError(f"an advantage estimator named {name!r} is already registered")
        _ESTIMATORS[name] = Estimator(fn, needs_groups)
        return fn

    return register


def estimator_names() -> tuple[str, ...]:
    """Names of the registered estimators (valid ``rl.estimator`` values)."""
    return tuple(_ESTIMATORS)


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; ValueError naming the registered ones otherwise."""
    if name not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(_ESTIMATORS)}, got {name!r}")
    return _ESTIMATORS[name]


def _group_sums(values: jax.Array, group_ids: jax.Array, num_groups: int) -> jax.Array:
    """float [G]: per-group sum of ``values`` [B]."""
    return jax.ops.segment_sum(values, group_ids, num_segments=num_groups)


def _group_stats(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None):
    """Per-row group size, group mean, Bessel-corrected group std and "group has spread"
    (max > min), float32 [B] ×3 and bool [B].

    The spread flag is exact: a group of equal rewards (e.g. sixteen 0.7s, whose float32 mean
    is not exactly 0.7) has no spread even though ``rewards − mean`` is float32 noise.
    """
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
    group_max = jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)[group_ids]
    group_min = jax.ops.segment_min(rewards, group_ids, num_segments=num_groups)[group_ids]
    return counts, means, stds, group_max > group_min


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
      divide (Dr.GRPO). Rows of a group whose rewards are all equal (max = min, exactly)
      get advantage 0 in every mode, whatever float32 noise the group mean carries.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale must be one of {GRPO_SCALES}, got {scale!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    _, means, stds, spread = _group_stats(rewards, group_ids, num_groups)
    centred = jnp.where(spread, rewards - means, 0.0)
    if scale == "none":
        return centred
    if scale == "group":
        std = stds
    else:
        n = rewards.shape[0]
        std = jnp.sqrt(jnp.sum((rewards - rewards.mean()) ** 2) / max(n - 1, 1))
    # A group with spread has std > 0; the guard only keeps eps = 0 from dividing 0 by 0.
    return jnp.where(spread & (std > 0), centred / jnp.where(std > 0, std + eps, 1.0), 0.0)


def dr_grpo_advantages(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """Dr.GRPO: Â_i = R_i − mean_g R (mean-centred, no std) → float32 [B]."""
    return grpo_advantages(rewards, group_ids, num_groups=num_groups, scale="none")


def rloo_advantages(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """RLOO: Â_i = R_i − mean_{j≠i, j∈g} R_j → float32 [B]; 0 for singleton groups and for
    groups whose rewards are all equal."""
    rewards = jnp.asarray(rewards, jnp.float32)
    counts, means, _, spread = _group_stats(rewards, group_ids, num_groups)
    # R_i − (n·mean − R_i)/(n−1) = n/(n−1) · (R_i − mean)
    return jnp.where(spread, counts / jnp.maximum(counts - 1.0, 1.0) * (rewards - means), 0.0)


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
    """The registered ``estimator`` applied to rewards float [B] → float32 advantages [B]."""
    cfg = AdvantageConfig(estimator=estimator, grpo_scale=grpo_scale, eps=eps,
                          positive_weight=positive_weight, correct_threshold=correct_threshold)
    return get_estimator(estimator).fn(rewards, group_ids, num_groups, cfg)


@register_estimator("grpo", needs_groups=True)
def _grpo(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return grpo_advantages(rewards, group_ids, num_groups=num_groups, scale=cfg.grpo_scale, eps=cfg.eps)


@register_estimator("dr_grpo", needs_groups=True)
def _dr_grpo(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return dr_grpo_advantages(rewards, group_ids, num_groups=num_groups)


@register_estimator("rloo", needs_groups=True)
def _rloo(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return rloo_advantages(rewards, group_ids, num_groups=num_groups)


@register_estimator("nsr", needs_groups=False)
def _nsr(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return nsr_advantages(rewards, correct_threshold=cfg.correct_threshold)


@register_estimator("psr", needs_groups=False)
def _psr(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return psr_advantages(rewards, correct_threshold=cfg.correct_threshold)


@register_estimator("w_reinforce", needs_groups=False)
def _w_reinforce(rewards, group_ids, num_groups, cfg: AdvantageConfig):
    return w_reinforce_advantages(rewards, positive_weight=cfg.positive_weight,
                                  correct_threshold=cfg.correct_threshold)
