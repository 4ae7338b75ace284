"""Typed data passed between the stages of one RL step (docs/design.md).

All arrays are pytrees (``flax.struct.dataclass``) so they cross ``jit`` boundaries.
Shapes: B = rows (prompts x samples), P = padded prompt length, T = padded response length.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from flax import struct

FINISH_STOP = 0  # the row emitted one of the stop token ids
FINISH_LENGTH = 1  # the row hit max_new_tokens without a stop token


@struct.dataclass
class Rollout:
    """What the sampler returns.

    prompt_tokens: int32 [B, P], left-padded with the pad id.
    prompt_lengths: int32 [B], number of real prompt tokens per row.
    tokens: int32 [B, T], completion tokens, right-padded with the pad id after ``lengths``.
    logprobs: float32 [B, T], log-prob of each sampled token under the distribution actually
        sampled (after temperature and top-k/top-p); 0 beyond ``lengths``.
    entropies: float32 [B, T], entropy (nats) of softmax(z / T) over the full vocabulary; 0
        beyond ``lengths``.
    lengths: int32 [B], completion length in tokens (the stop token included).
    finish_reason: int32 [B], FINISH_STOP or FINISH_LENGTH.
    group_ids: int32 [B], index of the prompt each row was sampled from (GRPO group).
    """

    prompt_tokens: jax.Array
    prompt_lengths: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    entropies: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    group_ids: jax.Array

    @property
    def response_mask(self) -> jax.Array:
        """bool [B, T]: True on real completion tokens."""
        t = self.tokens.shape[1]
        return jax.numpy.arange(t)[None, :] < self.lengths[:, None]


@dataclasses.dataclass(frozen=True)
class Scored:
    """A rollout (rows on device) with its host-side scores (host numpy, one value per row).

    rewards: float32 [B], total (weighted) reward. correct: float32 [B], 1 where the
    correctness rewarder scored >= ``rewards.correct_threshold``. components: name -> float32
    [B], each rewarder's own score. lengths, finish_reason, group_ids: host copies of the
    rollout's per-row ints (all the host needs besides the completion text).
    """

    rollout: Rollout
    rewards: np.ndarray
    correct: np.ndarray
    components: Mapping[str, np.ndarray]
    lengths: np.ndarray
    finish_reason: np.ndarray
    group_ids: np.ndarray


@struct.dataclass
class TrainBatch:
    """Everything the jitted update needs, already on device.

    input_tokens: int32 [B, P + T], prompt (left-padded) followed by the completion.
    attention_mask: bool [B, P + T], False on padding.
    positions: int32 [B, P + T], position ids (0 at the first real prompt token).
    targets: int32 [B, T], completion tokens (targets of positions P-1 .. P+T-2).
    loss_mask: float32 [B, T], 1 on completion tokens that enter the loss.
    advantages: float32 [B], one scalar advantage per row (broadcast over tokens), or
        [B, T] when per-token weights (truncated importance sampling) are folded in.
    old_logp: float32 [B, T], log-probs of the policy that sampled (or the recomputed ones).
    rollout_entropy: float32 [B, T], the sampler's entropies.
    group_ids: int32 [B].
    ref_logp: optional float32 [B, T], frozen reference-policy log-probs (KL only).
    """

    input_tokens: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    rollout_entropy: jax.Array
    group_ids: jax.Array
    ref_logp: jax.Array | None = None


@dataclasses.dataclass
class StepMetrics:
    """Scalars logged once per RL step (host floats), keyed by metric name."""

    step: int
    values: dict[str, float] = dataclasses.field(default_factory=dict)
