"""Batch assembly: prompt padding (host) and train-row assembly (device, jitted).

Shapes: N prompts, P = data.max_prompt_tokens (left-padded), B rows, T = response width.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.types import FINISH_LENGTH, Rollout, TrainBatch


def left_pad_prompts(records: Sequence[dict], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt records (``record["prompt_tokens"]``: list of ids) → (int32 tokens [N, width]
    left-padded with ``pad_id``, int32 lengths [N])."""
    tokens = np.full((len(records), width), pad_id, np.int32)
    lengths = np.zeros(len(records), np.int32)
    for i, record in enumerate(records):
        ids = record["prompt_tokens"]
        tokens[i, width - len(ids):] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def padded_row_index(real_rows: int, num_rows: int) -> np.ndarray:
    """int64 [num_rows]: 0..real_rows-1, then row 0 repeated for the loss-free padding rows
    (harmless inputs: a copy of a real row). ValueError if ``real_rows > num_rows``."""
    if real_rows > num_rows:
        raise ValueError(f"{real_rows} rows exceed the train batch of {num_rows}")
    return np.concatenate([np.arange(real_rows), np.zeros(num_rows - real_rows, np.int64)])


def response_mask(tokens_width: int, lengths: jax.Array) -> jax.Array:
    """bool [B, T]: True on the first ``lengths[b]`` response positions of each row."""
    return jnp.arange(tokens_width)[None, :] < lengths[:, None]


def assemble_train_batch(rollout: Rollout, live: jax.Array, advantages: jax.Array, group_ids: jax.Array,
                         *, overlong_filter: bool) -> tuple[TrainBatch, jax.Array]:
    """Rows of a rollout → (TrainBatch with ``old_logp`` = the sampler's log-probs, truncated
    bool [B]). Pure; jit it with the row sharding as ``out_shardings``.

    live: bool [B], False on padding rows (no loss); advantages: float32 [B];
    group_ids: int32 [B]. The loss mask is the response mask of live rows, minus truncated
    rows when ``overlong_filter`` (DAPO overlong filtering).
    """
    prompt = rollout.prompt_tokens
    width = prompt.shape[1]
    prompt_mask = jnp.arange(width)[None, :] >= (width - rollout.prompt_lengths)[:, None]
    valid = response_mask(rollout.tokens.shape[1], rollout.lengths)
    attention_mask = jnp.concatenate([prompt_mask, valid], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    truncated = rollout.finish_reason == FINISH_LENGTH
    loss_mask = valid & live[:, None]
    if overlong_filter:
        loss_mask &= ~truncated[:, None]
    batch = TrainBatch(
        input_tokens=jnp.concatenate([prompt, rollout.tokens], axis=1).astype(jnp.int32),
        attention_mask=attention_mask,
        positions=positions,
        targets=rollout.tokens.astype(jnp.int32),
        loss_mask=loss_mask.astype(jnp.float32),
        advantages=advantages.astype(jnp.float32),
        old_logp=rollout.logprobs.astype(jnp.float32),
        rollout_entropy=rollout.entropies.astype(jnp.float32),
        group_ids=group_ids.astype(jnp.int32),
    )
    return batch, truncated
