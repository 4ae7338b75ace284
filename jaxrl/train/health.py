"""Run health: is the model still usable after an update, and has the policy collapsed?

Two checks, both pure functions, run by the loop after every step:

* ``all_finite(state)``: every floating leaf of the ``TrainState`` (params and optimizer
  moments) is finite. One jitted reduction; the answer (a bool) is the only thing that
  crosses to the host. A non-finite learning rate, an overflow in the optimizer or a
  poisoned update all end here, even when the loss and gradient were finite.
* ``collapse_reasons(completions, metrics)``: the step's rollouts look like a ruined policy:
  every completion empty, every completion identical (across different prompts), or reward
  and rollout entropy both zero. A healthy run can hit one such step by chance, so the loop
  stops only after ``train.max_bad_steps`` collapsed steps in a row (``HealthTracker``).

Checkpoints written while the policy is collapsed are marked unhealthy in their metadata;
``checkpoint.Checkpointer`` never rotates a healthy checkpoint out for unhealthy ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

# Rollout entropy (nats per token) and reward below this count as "zero" for collapse.
ZERO_TOLERANCE = 1e-6


class RunUnhealthy(RuntimeError):
    """The model became unusable (non-finite weights) or the policy collapsed."""


@jax.jit
def _finite_flags(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of ``tree`` (any shapes) is finite."""
    return bool(_finite_flags(tree))


def collapse_reasons(completions: Sequence[str], metrics: Mapping[str, float]) -> list[str]:
    """Why this step's rollouts look collapsed ([] when they do not).

    completions: the decoded completions of one sampling round (all rows, several prompts).
    metrics: the step's host metrics; reads ``reward/mean`` and ``rollout/entropy_mean``.
    """
    reasons = []
    if completions and all(not c.strip() for c in completions):
        reasons.append("every completion is empty")
    elif len(completions) > 1 and len(set(completions)) == 1:
        reasons.append("every completion is identical")
    reward = metrics.get("reward/mean")
    entropy = metrics.get("rollout/entropy_mean")
    if entropy is not None and not math.isfinite(entropy):
        reasons.append("rollout entropy is not finite")
    elif reward is not None and entropy is not None and abs(reward) < ZERO_TOLERANCE and entropy < ZERO_TOLERANCE:
        reasons.append("reward and rollout entropy are zero")
    return reasons


@dataclasses.dataclass
class HealthTracker:
    """Counts consecutive collapsed steps; ``healthy`` is False while a collapse streak runs.

    limit: consecutive collapsed steps that end the run (``train.max_bad_steps``).
    """

    limit: int
    collapsed_steps: int = 0
    last_reasons: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.collapsed_steps == 0

    def observe(self, reasons: Sequence[str]) -> bool:
        """Record one step's collapse reasons; True when the streak reached ``limit``."""
        self.collapsed_steps = self.collapsed_steps + 1 if reasons else 0
        self.last_reasons = tuple(reasons)
        return self.collapsed_steps >= self.limit
