"""The jitted policy update: chunked log-probs → policy loss → accumulated grads → optax.

Pure functions around one state object, ``TrainState``. Nothing here knows about devices
or meshes: a caller that shards passes ``in_shardings``/``out_shardings`` through to
``jax.jit`` (the function never branches on the device count).

Shapes: M rows in one optimizer update (a mini-batch), split into M / m micro-batches of
m rows whose gradients are summed by a ``lax.scan``; L = P + T input positions (P prompt,
T response). Every loss normaliser (token count, selected-token count, sequence count) is
computed over the whole mini-batch first, so the summed micro-batch losses equal the loss
of the mini-batch seen at once (``jaxrl.rl.losses`` module docstring).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import decoder_hidden, unembedding
from jaxrl.rl.logprobs import token_logprobs_and_entropy
from jaxrl.rl.losses import LossConfig, policy_loss
from jaxrl.train import micro_metrics
from jaxrl.train.budget_step import grads_by_budget, logprobs_by_budget
from jaxrl.types import TrainBatch

Params = Any

# How many times each jitted function was traced (a trace = a new compilation). Tests and
# the loop's metrics use it to prove there is no recompilation after the first step.
TRACE_COUNTS: collections.Counter = collections.Counter()


@struct.dataclass
class TrainState:
    """Everything the optimisation owns; the only mutable state of a run.

    step: int32 scalar, RL steps completed.
    params: master weights (``model.param_dtype``, float32 recommended).
    opt_state: the optax state (AdamW moments in the params' dtype, counts).
    rng: uint32 [2] raw PRNG key; the loop splits it once per step.
    skipped_updates: int32 scalar, optimizer updates skipped for a non-finite loss/grad.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array
    skipped_updates: jax.Array


def updates_per_step(cfg: ml_collections.ConfigDict) -> int:
    """Optimizer updates per RL step: epochs × (prompts_per_step / mini_batch_prompts)."""
    return cfg.rl.epochs * (cfg.rl.prompts_per_step // cfg.rl.mini_batch_prompts)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the RL step (int, 0-based) → float32 scalar.

    Linear warm-up over ``optim.warmup_steps`` RL steps (step s gets lr·(s+1)/W), then
    constant, or cosine from lr down to lr·min_lr_ratio at ``train.num_steps``.
    """
    peak = float(cfg.rl.lr)
    warmup = int(cfg.optim.warmup_steps)
    total = int(cfg.train.num_steps)
    floor = peak * float(cfg.optim.min_lr_ratio)
    cosine = cfg.optim.schedule == "cosine"

    def schedule(rl_step):
        s = jnp.asarray(rl_step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (s + 1.0) / max(warmup, 1))
        if not cosine:
            return jnp.where(s < warmup, warm, peak)
        progress = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        decayed = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, decayed)

    return schedule


def _decay_mask(params: Params) -> Params:
    """True for weight matrices; norms and biases are not decayed."""

    def is_matrix(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (decoupled decay on matrices) after global-norm clipping, lr per RL step.

    optax counts optimizer updates; the schedule sees ``count // updates_per_step(cfg)``, so
    warm-up and decay are in RL steps whatever the number of mini-batches.
    """
    per_step = updates_per_step(cfg)
    rl_schedule = learning_rate_schedule(cfg)

    def schedule(count):
        return rl_schedule(count // per_step)

    parts = []
    if cfg.optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.optim.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(cfg.optim.b1),
            b2=float(cfg.optim.b2),
            eps=float(cfg.optim.eps),
            weight_decay=float(cfg.optim.weight_decay),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)


def init_train_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 state: the given master params, fresh optimizer moments, key from ``seed``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped_updates=jnp.zeros((), jnp.int32),
    )


def response_logprobs(
    params: Params,
    model_cfg: ModelConfig,
    input_tokens: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    targets: jax.Array,
    *,
    temperature: float,
    chunk_size: int,
    entropy_grad: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies of the response tokens under ``params``.

    input_tokens/attention_mask/positions [B, P + T]; targets int32 [B, T] (the response).
    Position P - 1 + t predicts ``targets[:, t]``. Logits are formed in chunks (never
    [B, T, V]) in float32 at ``temperature``. Returns (logp, entropy) float32 [B, T].
    """
    response_len = targets.shape[1]
    prompt_len = input_tokens.shape[1] - response_len
    hidden = decoder_hidden(params, model_cfg, input_tokens, positions, attention_mask)
    hidden = hidden[:, prompt_len - 1 : prompt_len - 1 + response_len]
    unembed = unembedding(params, model_cfg).astype(model_cfg.dtype)
    return token_logprobs_and_entropy(
        hidden, unembed, targets, temperature=temperature, chunk_size=chunk_size, entropy_grad=entropy_grad
    )


def _split_micro(tree, micro_rows: int):
    """Reshape every leaf [M, ...] → [M / m, m, ...] for a scan over micro-batches."""

    def split(x):
        if x.shape[0] % micro_rows:
            raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of micro_batch_rows={micro_rows}")
        return x.reshape(x.shape[0] // micro_rows, micro_rows, *x.shape[1:])

    return jax.tree.map(split, tree)


def make_logprob_fn(
    model_cfg: ModelConfig,
    *,
    micro_batch_rows: int,
    temperature: float,
    chunk_size: int,
    micro_batch_tokens: int = 0,
    row_multiple: int = 1,
    in_shardings=None,
    out_shardings=None,
) -> Callable:
    """Jitted ``(params, input_tokens, attention_mask, positions, targets) -> (logp, entropy)``.

    Forward only (no gradient), over B rows in micro-batches of ``micro_batch_rows``, or with
    ``micro_batch_tokens`` > 0 in token-budget micro-batches (``jaxrl.train.budget_step``;
    rows per micro-batch a multiple of ``row_multiple``, the data × fsdp row shards; outputs
    0 past each row's response). Shapes as in ``response_logprobs``; outputs float32 [B, T].
    Used for the trainer's old log-probs, the reference model and step-start entropies.
    """

    def forward(params, *xs):
        return response_logprobs(params, model_cfg, *xs, temperature=temperature, chunk_size=chunk_size)

    def logprobs(params, input_tokens, attention_mask, positions, targets):
        TRACE_COUNTS["logprobs"] += 1
        if micro_batch_tokens:
            return logprobs_by_budget(lambda *xs: forward(params, *xs), input_tokens, attention_mask, positions,
                                      targets, budget=micro_batch_tokens, row_multiple=row_multiple)
        micro = _split_micro((input_tokens, attention_mask, positions, targets), micro_batch_rows)

        def body(_, xs):
            return None, forward(params, *xs)

        _, (logp, entropy) = jax.lax.scan(body, None, micro)
        rows = targets.shape[0]
        return logp.reshape(rows, -1), entropy.reshape(rows, -1)

    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(logprobs, **kwargs)


def make_update_fn(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optimizer: optax.GradientTransformation,
    *,
    micro_batch_rows: int,
    temperature: float,
    chunk_size: int,
    micro_batch_tokens: int = 0,
    row_multiple: int = 1,
    in_shardings=None,
    out_shardings=None,
) -> Callable[[TrainState, TrainBatch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted ``update(state, batch, token_select) -> (state, metrics)``; ``state`` is donated.

    batch: a TrainBatch of M rows (one mini-batch), M a multiple of ``micro_batch_rows``.
    micro_batch_tokens: 0 = fixed micro-batches of ``micro_batch_rows`` full-width rows; N > 0
      = token-budget micro-batches of ≤ N positions each, trimmed to their rows' responses
      (``jaxrl.train.budget_step``; rows a multiple of ``row_multiple``, the data × fsdp row
      shards). Same loss and gradient up to float32 summation order.
    token_select: bool [M, T], the tokens whose policy-gradient term is kept (the forking
      mask of the step for ``token_mask`` top/bottom; the loss mask for "all").
    One optimizer update: micro-batch gradients are summed by a ``lax.scan`` (every loss
    normaliser is a mini-batch total), clipped and applied. If the loss or any gradient is
    non-finite, params and optimizer state are kept and ``skipped_updates`` is incremented.
    A mini-batch with no valid response token (all padding rows) makes no optimizer step at
    all: params and optimizer state (moments, count) are kept, so neither momentum nor
    weight decay moves the weights (``update_empty`` = 1; not counted as skipped).
    ``state.step`` is not changed (it counts RL steps; the loop advances it).
    Metrics (float32 scalars): the ``policy_loss`` metrics over the mini-batch (moments
    token-weighted, so ``cov_logp_adv`` is the mini-batch covariance), grad_norm,
    update_skipped (0/1), update_empty (0/1), tokens (valid response tokens in the mini-batch).
    ``in_shardings``/``out_shardings`` are passed to ``jax.jit`` when given.
    """
    sum_rows_norm = loss_cfg.aggregation == "seq-mean-token-sum-norm"

    def micro_loss(params, micro: TrainBatch, select, totals):
        logp, entropy = response_logprobs(
            params,
            model_cfg,
            micro.input_tokens,
            micro.attention_mask,
            micro.positions,
            micro.targets,
            temperature=temperature,
            chunk_size=chunk_size,
            entropy_grad=loss_cfg.entropy_coef != 0,
        )
        loss, metrics = policy_loss(
            logp,
            micro.old_logp,
            micro.advantages,
            micro.loss_mask,
            loss_cfg,
            ref_logp=micro.ref_logp,
            entropy=entropy,
            token_select=select,
            num_tokens=totals["tokens"],
            num_selected_tokens=totals["selected"],
            num_sequences=totals["sequences"],
        )
        return loss, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate_fixed(params, batch: TrainBatch, select, totals):
        """Fixed micro-batches of ``micro_batch_rows`` full-width rows → (grads, loss, metrics)."""
        micro_batches = _split_micro((batch, select), micro_batch_rows)

        def accumulate(grads_sum, xs):
            micro, micro_select = xs
            (loss, metrics), grads = grad_fn(params, micro, micro_select, totals)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            weight = jnp.sum(micro.loss_mask > 0, dtype=jnp.float32)
            return grads_sum, (loss, metrics, weight)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, stacked_metrics, weights) = jax.lax.scan(accumulate, zeros, micro_batches)

        return grads, jnp.sum(losses), micro_metrics.combine_stacked(stacked_metrics, weights)

    def update(state: TrainState, batch: TrainBatch, token_select: jax.Array):
        TRACE_COUNTS["update"] += 1
        valid = batch.loss_mask > 0
        select = jnp.asarray(token_select, bool) & valid
        rows = batch.loss_mask.shape[0]
        totals = {
            "tokens": jnp.sum(valid, dtype=jnp.float32),
            "selected": jnp.sum(select, dtype=jnp.float32),
            "sequences": (
                jnp.float32(rows) if sum_rows_norm else jnp.sum(jnp.any(valid, axis=-1), dtype=jnp.float32)
            ),
        }
        if micro_batch_tokens:
            grads, sums, weight_sum = grads_by_budget(
                grad_fn, state.params, batch, select, totals, budget=micro_batch_tokens,
                row_multiple=row_multiple)
            metrics = micro_metrics.finish(sums, weight_sum)
            loss = metrics["loss"]
        else:
            grads, loss, metrics = accumulate_fixed(state.params, batch, select, totals)
        if "cov_logp_adv" in metrics:
            metrics["cov_logp_adv"] = metrics["logp_adv_mean"] - metrics["logp_mean"] * metrics["adv_mean"]
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        empty = totals["tokens"] == 0

        def apply(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        def keep(_):
            return state.params, state.opt_state

        params, opt_state = jax.lax.cond(finite & ~empty, apply, keep, None)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            params=params, opt_state=opt_state, skipped_updates=state.skipped_updates + skipped
        )
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            update_skipped=skipped.astype(jnp.float32),
            update_empty=empty.astype(jnp.float32),
            tokens=totals["tokens"],
        )
        return new_state, metrics

    kwargs = {"donate_argnums": (0,)}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(update, **kwargs)
