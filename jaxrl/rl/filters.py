"""DAPO batch filters: dynamic sampling (drop groups with no spread in a metric) and overlong filtering.

``reward_variance_keep_mask`` and ``overlong_filter`` are pure and jittable.
``DynamicSamplingAccumulator`` is the host-side bookkeeping the RL loop uses to refill a
train batch across sampling rounds (shapes change between rounds, so it is numpy, not jit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.types import FINISH_LENGTH


def reward_variance_keep_mask(
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: int | None = None,
    atol: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dynamic-sampling filter: keep the rows of groups whose values are not all equal.

    rewards: float [B], the filter metric (total reward, or correctness for DAPO's ``acc``); group_ids: int [B] in [0, num_groups) (num_groups static, default B).
    A group is dropped when max − min of its rewards ≤ ``atol`` (singleton groups included:
    their advantage is 0 under every group baseline).
    Returns (keep bool [B], num_kept_groups int32, num_dropped_groups int32), counting only
    group ids that occur.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    num_groups = rewards.shape[0] if num_groups is None else num_groups
    group_max = jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)
    group_min = jax.ops.segment_min(rewards, group_ids, num_segments=num_groups)
    present = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=num_groups) > 0
    varied = present & (group_max - group_min > atol)
    num_kept = jnp.sum(varied, dtype=jnp.int32)
    num_dropped = jnp.sum(present, dtype=jnp.int32) - num_kept
    return varied[group_ids], num_kept, num_dropped


def overlong_filter(loss_mask: jax.Array, finish_reason: jax.Array) -> jax.Array:
    """DAPO overlong filtering: remove truncated completions from the loss.

    loss_mask: [B, T] (bool or float); finish_reason: int [B] (``jaxrl.types.FINISH_*``).
    Returns float32 [B, T]: ``loss_mask`` with rows whose finish reason is FINISH_LENGTH
    zeroed. Such rows then count neither as tokens nor as sequences in ``policy_loss``.
    """
    keep_row = jnp.asarray(finish_reason) != FINISH_LENGTH
    return jnp.asarray(loss_mask, jnp.float32) * keep_row[:, None].astype(jnp.float32)


def _take_rows(rows: Any, index: np.ndarray) -> Any:
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[index], rows)


@dataclasses.dataclass
class DynamicSamplingAccumulator:
    """Collects whole groups with spread in the filter metric across sampling rounds (DAPO).

    Usage in the loop::

        acc = DynamicSamplingAccumulator(target_groups=512, max_rounds=3)
        while not acc.is_full and not acc.out_of_rounds:
            scored = sample_and_reward(...)
            acc.add(rows, scored.rewards, scored.rollout.group_ids)
        rows, rewards, group_ids = acc.result()

    ``rows`` is any pytree whose leaves have leading dimension B (e.g. a ``Rollout``); leaves
    are converted to numpy. Groups are kept whole and in arrival order; groups beyond the
    target are discarded (counted in ``stats``). ``result`` returns group ids renumbered
    0..G−1 — use them instead of any group-id leaf inside ``rows``, which is left as given.
    """

    target_groups: int
    max_rounds: int | None = None
    atol: float = 0.0
    _chunks: list = dataclasses.field(default_factory=list, repr=False)
    rounds: int = 0
    groups_seen: int = 0
    groups_dropped: int = 0
    groups_kept: int = 0
    groups_surplus: int = 0

    def __post_init__(self):
        if self.target_groups <= 0:
            raise ValueError(f"target_groups must be > 0, got {self.target_groups}")
        if self.max_rounds is not None and self.max_rounds <= 0:
            raise ValueError(f"max_rounds must be > 0 or None, got {self.max_rounds}")

    @property
    def is_full(self) -> bool:
        return self.groups_kept >= self.target_groups

    @property
    def out_of_rounds(self) -> bool:
        return self.max_rounds is not None and self.rounds >= self.max_rounds

    def add(self, rows: Any, rewards: np.ndarray, group_ids: np.ndarray,
            filter_values: np.ndarray | None = None) -> int:
        """Filter one round (rewards float [B], group_ids int [B]); returns groups kept now.

        filter_values: float [B], the per-row metric whose spread decides which groups are
        kept (DAPO: the correctness 0/1); None filters on ``rewards``. The kept rows'
        ``rewards`` are what ``result`` returns either way.
        """
        rewards = np.asarray(rewards, np.float32)
        metric = rewards if filter_values is None else np.asarray(filter_values, np.float32)
        # Arbitrary ids (e.g. global prompt indices) → 0..n−1 for the jittable filter.
        unique_ids, dense_ids = np.unique(np.asarray(group_ids), return_inverse=True)
        keep, num_kept, num_dropped = reward_variance_keep_mask(
            metric, dense_ids, num_groups=len(unique_ids), atol=self.atol
        )
        keep = np.asarray(keep)
        self.rounds += 1
        self.groups_seen += len(unique_ids)
        self.groups_dropped += int(num_dropped)

        # Kept groups in order of first appearance, truncated to the room left.
        _, first_row = np.unique(dense_ids, return_index=True)
        kept_groups = [g for g in np.argsort(first_row, kind="stable") if keep[first_row[g]]]
        room = max(self.target_groups - self.groups_kept, 0)
        self.groups_surplus += max(len(kept_groups) - room, 0)
        kept_groups = kept_groups[:room]
        if not kept_groups:
            return 0
        new_id = {g: self.groups_kept + i for i, g in enumerate(kept_groups)}
        index = np.concatenate([np.flatnonzero(dense_ids == g) for g in kept_groups])
        self._chunks.append(
            (_take_rows(rows, index), rewards[index],
             np.array([new_id[g] for g in dense_ids[index]], np.int32))
        )
        self.groups_kept += len(kept_groups)
        return len(kept_groups)

    def result(self, *, allow_partial: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
        """(rows, rewards float32 [B'], group_ids int32 [B'] in 0..G−1) of the kept groups.

        Raises unless full, or ``allow_partial`` (e.g. after ``max_rounds``) and non-empty.
        """
        if not self.is_full and not allow_partial:
            raise ValueError(
                f"only {self.groups_kept}/{self.target_groups} groups after {self.rounds} rounds"
            )
        if not self._chunks:
            raise ValueError(f"no group with reward variance after {self.rounds} rounds")
        parts, rewards, group_ids = zip(*self._chunks)
        rows = jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *parts)
        return rows, np.concatenate(rewards), np.concatenate(group_ids)

    @property
    def stats(self) -> dict[str, float]:
        """Host floats for logging: rounds, groups seen/dropped/kept/surplus."""
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups_seen": float(self.groups_seen),
            "dynamic_sampling/groups_dropped": float(self.groups_dropped),
            "dynamic_sampling/groups_kept": float(self.groups_kept),
            "dynamic_sampling/groups_surplus": float(self.groups_surplus),
        }
