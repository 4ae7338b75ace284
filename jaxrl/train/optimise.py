"""The update phase of one RL step: trainer log-prob pass, token selection, mini-batch updates.

1. Trainer log-prob pass (forward only) at the rollout temperature: old log-probs (or the
   sampler's with ``rl.old_logp_source='sampler'``), the sampler–trainer gap, optional
   truncated-IS weights, step-start entropies for the forking-token threshold; reference
   log-probs only when ``rl.loss.kl_coef > 0``.
2. μ epochs over mini-batches, each one jitted update with micro-batch accumulation.
Every per-token array stays on device; only scalar metrics come back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from jaxrl.rl.losses import LossConfig, select_tokens
from jaxrl.train import step as train_step
from jaxrl.types import TrainBatch


@jax.jit
def logprob_gap_metrics(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sampler–trainer log-prob gap over valid tokens (float32 scalars); inputs [B, T] (nats).

    With Δ = trainer − sampler log-prob of the sampled token: abs_mean, abs_max, mean of Δ,
    and kl_k3 = mean(e^Δ − 1 − Δ), the unbiased, non-negative k3 estimate of
    KL(sampler ‖ trainer) from tokens sampled by the sampler (r = π_trainer/π_sampler,
    E_sampler[r − 1 − log r] = KL(sampler ‖ trainer)).
    """
    weights = (mask > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    delta = jnp.where(weights > 0, trainer_logp - sampler_logp, 0.0)
    return {
        "logprob_gap/abs_mean": jnp.sum(jnp.abs(delta)) / count,
        "logprob_gap/abs_max": jnp.max(jnp.abs(delta)),
        "logprob_gap/mean": jnp.sum(delta) / count,
        "logprob_gap/kl_k3": jnp.sum(weights * (jnp.expm1(delta) - delta)) / count,
    }


def tis_weights(trainer_logp: jax.Array, sampler_logp: jax.Array, cap: float) -> jax.Array:
    """Truncated importance weights min(π_trainer / π_sampler, cap), float32 [B, T]; inputs
    [B, T] log-probs, the log-ratio clamped to ±20 before exp."""
    return jnp.minimum(jnp.exp(jnp.clip(trainer_logp - sampler_logp, -20.0, 20.0)), cap)


def row_shards(row_sharding: NamedSharding) -> int:
    """How many shards the batch rows are split into (the product of the mesh axes named in
    the row sharding's first dimension; 1 unsharded)."""
    axes = row_sharding.spec[0] if len(row_sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([row_sharding.mesh.shape[a] for a in axes], dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Updater:
    """The jitted functions of the update phase and the static settings they share."""

    cfg: ml_collections.ConfigDict
    loss_cfg: LossConfig
    update_fn: Callable
    logprob_fn: Callable
    select_fn: Callable
    take_minibatch: Callable
    batch_rows: int
    mini_rows: int


def make_updater(cfg: ml_collections.ConfigDict, model_cfg, loss_cfg: LossConfig, optimizer, state_sharding,
                 row_sharding: NamedSharding, replicated: NamedSharding) -> Updater:
    """Builds (without compiling) the update, log-prob, token-selection and mini-batch-slice
    functions; the update's in/out shardings are pinned so step 2 never recompiles."""
    common = dict(temperature=cfg.sampling.temperature, chunk_size=cfg.rl.logprob_chunk_size,
                  micro_batch_rows=cfg.rl.micro_batch_rows, micro_batch_tokens=cfg.rl.micro_batch_tokens,
                  row_multiple=row_shards(row_sharding))
    mini_rows = cfg.rl.mini_batch_prompts * cfg.rl.samples_per_prompt

    @jax.jit
    def select(mask, train_entropy, rollout_entropy, truncated):
        return select_tokens(loss_cfg, mask, train_entropy=train_entropy, rollout_entropy=rollout_entropy,
                             truncated=truncated)

    def take(tree, index):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index * mini_rows, mini_rows, axis=0), tree)

    return Updater(
        cfg=cfg, loss_cfg=loss_cfg,
        update_fn=train_step.make_update_fn(model_cfg, loss_cfg, optimizer, **common,
                                            in_shardings=(state_sharding, row_sharding, row_sharding),
                                            out_shardings=(state_sharding, replicated)),
        logprob_fn=train_step.make_logprob_fn(model_cfg, **common),
        select_fn=select,
        take_minibatch=jax.jit(take, out_shardings=row_sharding),
        batch_rows=cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt,
        mini_rows=mini_rows,
    )


def _trainer_entropy_needed(cfg: ml_collections.ConfigDict, loss_cfg: LossConfig) -> bool:
    return (cfg.rl.old_logp_source == "trainer" or cfg.rl.measure_logprob_gap
            or (loss_cfg.token_mask != "all" and loss_cfg.entropy_source == "step_start"))


def optimise(updater: Updater, state: train_step.TrainState, batch: TrainBatch, truncated: jax.Array,
             ref_params=None) -> tuple[train_step.TrainState, dict[str, float]]:
    """Trainer log-prob pass, token selection, μ epochs of mini-batch updates → (state, metrics).

    Forking-token entropies (``rl.loss.entropy_source``): "step_start" = this step's trainer
    pass (params before any update); "current" = recomputed with the params of each update
    (the values that update's training forward computes); "rollout" = the sampler's. Under
    ``mask_scope`` "batch" the threshold population is the whole step batch (for "current"
    that is one extra forward over the step batch per update), under "minibatch" the update's
    own rows. Metrics are means over the updates that had tokens (ratio_max: max;
    update_skipped / update_empty: counts).
    """
    cfg, loss_cfg = updater.cfg, updater.loss_cfg
    device_metrics: dict[str, Any] = {}
    trainer_logp = trainer_entropy = None
    sampler_logp = batch.old_logp
    inputs = lambda b: (b.input_tokens, b.attention_mask, b.positions, b.targets)  # noqa: E731
    started = time.monotonic()
    if _trainer_entropy_needed(cfg, loss_cfg):
        trainer_logp, trainer_entropy = updater.logprob_fn(state.params, *inputs(batch))
        device_metrics.update(logprob_gap_metrics(trainer_logp, sampler_logp, batch.loss_mask))
    old_logp = trainer_logp if cfg.rl.old_logp_source == "trainer" else sampler_logp
    advantages = batch.advantages
    if cfg.rl.tis_cap:
        advantages = advantages[:, None] * tis_weights(trainer_logp, sampler_logp, cfg.rl.tis_cap)
    ref_logp = None if ref_params is None else updater.logprob_fn(ref_params, *inputs(batch))[0]
    batch = batch.replace(old_logp=old_logp, advantages=advantages, ref_logp=ref_logp)
    per_update = loss_cfg.token_mask != "all" and (loss_cfg.entropy_source == "current"
                                                   or loss_cfg.mask_scope == "minibatch")
    batch_select = batch.loss_mask > 0
    if not per_update and loss_cfg.token_mask != "all":  # one selection for the step batch
        batch_select, threshold = updater.select_fn(batch.loss_mask, trainer_entropy, batch.rollout_entropy,
                                                    truncated)
        device_metrics["entropy_threshold"] = threshold
    logprob_time = time.monotonic() - started

    started = time.monotonic()
    update_metrics, thresholds = [], []
    step_start = (batch, (trainer_entropy, truncated))
    for _ in range(cfg.rl.epochs):
        for index in range(updater.batch_rows // updater.mini_rows):
            mini, (select, _) = updater.take_minibatch((batch, (batch_select, truncated)), index)
            if per_update:
                select, threshold = _select_for_update(updater, state, step_start, mini, index)
                thresholds.append(threshold)
            state, metrics = updater.update_fn(state, mini, select)
            update_metrics.append(metrics)
    host_updates, host_extra, thresholds = jax.device_get((update_metrics, device_metrics, thresholds))
    live = [m for m in host_updates if m["tokens"] > 0] or host_updates
    out = {key: float(np.mean([m[key] for m in live])) for key in host_updates[0]}
    out["ratio_max"] = float(np.max([m["ratio_max"] for m in host_updates]))
    out["update_skipped"] = float(np.sum([m["update_skipped"] for m in host_updates]))
    out["update_empty"] = float(np.sum([m["update_empty"] for m in host_updates]))
    out.update({k: float(v) for k, v in host_extra.items()})
    finite = [float(t) for t in thresholds if np.isfinite(t)]
    if thresholds:
        out["entropy_threshold"] = float(np.mean(finite)) if finite else float("inf")
    out["time/logprobs"] = logprob_time
    out["time/update"] = time.monotonic() - started
    return state, out


def _select_for_update(updater: Updater, state, step_start, mini: TrainBatch, index: int):
    """(select bool [M, T], threshold) for one update when the selection is not the step's:
    entropy_source "current" and/or mask_scope "minibatch" (see ``optimise``)."""
    loss_cfg = updater.loss_cfg
    batch, (trainer_entropy, truncated) = step_start
    inputs = lambda b: (b.input_tokens, b.attention_mask, b.positions, b.targets)  # noqa: E731
    if loss_cfg.mask_scope == "minibatch":
        population = mini
        entropy = updater.take_minibatch(trainer_entropy, index) if trainer_entropy is not None else None
        if loss_cfg.entropy_source == "current":
            entropy = updater.logprob_fn(state.params, *inputs(mini))[1]
        mini_truncated = updater.take_minibatch(truncated, index)
        return updater.select_fn(population.loss_mask, entropy, population.rollout_entropy, mini_truncated)
    # batch scope with current entropies: the step batch under this update's params.
    entropy = updater.logprob_fn(state.params, *inputs(batch))[1]
    select, threshold = updater.select_fn(batch.loss_mask, entropy, batch.rollout_entropy, truncated)
    return updater.take_minibatch(select, index), threshold
