"""Token-budget micro-batches inside the jitted update and log-prob pass (``rl.micro_batch_tokens``).

The grouping is ``jaxrl.data.token_budget``: rows sorted longest first; each micro-batch is
the next ``rows(w)`` rows trimmed to P + w positions, w the narrowest of K fixed widths that
holds its first row. One ``lax.while_loop`` walks the sorted rows and a ``lax.switch`` picks
the shape, so the compiled program has K static micro-batch shapes and no shape depends on
the data. Causal attention makes positions < P + w independent of the positions cut off, so
trimming changes no kept value; the gradient is still the sum of the micro-batch gradients
with the normalisers of the whole mini-batch (``jaxrl.train.step``).

Shapes: M rows, P prompt positions, T response positions, w a bucket width, r its rows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl.data.token_budget import bucket_shapes, micro_rows, response_extent, sort_rows, width_index
from jaxrl.train import micro_metrics
from jaxrl.types import TrainBatch


def _rows(x: jax.Array, index: jax.Array, width: int | None) -> jax.Array:
    out = jnp.take(x, index, axis=0)
    return out if width is None or out.ndim == 1 else out[:, :width]


def logprobs_by_budget(forward: Callable, input_tokens: jax.Array, attention_mask: jax.Array,
                       positions: jax.Array, targets: jax.Array, *, budget: int,
                       row_multiple: int) -> tuple[jax.Array, jax.Array]:
    """Forward-only log-probs in token-budget micro-batches → (logp, entropy) float32 [M, T].

    forward(input_tokens, attention_mask, positions, targets) → (logp, entropy) on one trimmed
    micro-batch ([r, P + w] inputs, [r, w] targets → [r, w] outputs). Positions at or past a
    row's response length (``attention_mask[:, P:]``) come back as 0, where the fixed path has
    the model's values at padding; every consumer masks them.
    """
    rows, t = targets.shape
    p = input_tokens.shape[1] - t

    def run(width, index, valid, out):
        wide = p + width
        logp, entropy = forward(_rows(input_tokens, index, wide), _rows(attention_mask, index, wide),
                                _rows(positions, index, wide), _rows(targets, index, width))
        dest = jnp.where(valid, index, rows)  # filler slots: out of range, dropped
        return (out[0].at[dest, :width].set(logp, mode="drop"), out[1].at[dest, :width].set(entropy, mode="drop"))

    out = (jnp.zeros((rows, t), jnp.float32), jnp.zeros((rows, t), jnp.float32))
    response = attention_mask[:, p:]
    out = walk(run, response_extent(response), out, budget=budget, prompt_len=p, response_len=t,
               row_multiple=row_multiple)
    # a row narrower than its micro-batch got values past its end: one defined answer, 0
    return tuple(jnp.where(response, x, 0.0) for x in out)


def walk(run: Callable, extent: jax.Array, carry: Any, *, budget: int, prompt_len: int, response_len: int,
         row_multiple: int) -> Any:
    """Folds ``run(width, index, valid, carry) -> carry`` over the token-budget micro-batches
    of rows with these extents (int32 [M], response positions ≤ T); ``index`` int32
    [rows(width)] rows of the batch, ``valid`` bool [rows(width)], False on filler slots.
    Static shapes: one ``lax.switch`` branch per width, inside one ``lax.while_loop``."""
    shapes = bucket_shapes(budget, prompt_len, response_len, row_multiple=row_multiple, max_rows=extent.shape[0])
    widths = tuple(w for w, _ in shapes)
    order, live = sort_rows(extent)
    steps = jnp.asarray([rows for _, rows in shapes], jnp.int32)

    def branch(width, rows):
        def one(start, inner):
            index, valid = micro_rows(order, live, start, rows)
            return run(width, index, valid, inner)
        return one

    branches = [branch(width, rows) for width, rows in shapes]

    def body(state):
        start, inner = state
        k = width_index(extent[order[start]], widths)
        return start + steps[k], jax.lax.switch(k, branches, start, inner)

    _, carry = jax.lax.while_loop(lambda state: state[0] < live, body, (jnp.zeros((), jnp.int32), carry))
    return carry


def _micro_batch(batch: TrainBatch, select: jax.Array, index: jax.Array, valid: jax.Array,
                 prompt_len: int, width: int) -> tuple[TrainBatch, jax.Array]:
    """Rows ``index`` of the mini-batch trimmed to P + width (response: width); filler rows
    (``valid`` False) get an all-zero loss mask and selection."""
    wide = prompt_len + width
    keep = valid[:, None]
    micro = TrainBatch(
        input_tokens=_rows(batch.input_tokens, index, wide),
        attention_mask=_rows(batch.attention_mask, index, wide),
        positions=_rows(batch.positions, index, wide),
        targets=_rows(batch.targets, index, width),
        loss_mask=_rows(batch.loss_mask, index, width) * keep,
        advantages=_rows(batch.advantages, index, width),
        old_logp=_rows(batch.old_logp, index, width),
        rollout_entropy=_rows(batch.rollout_entropy, index, width),
        group_ids=_rows(batch.group_ids, index, None),
        ref_logp=None if batch.ref_logp is None else _rows(batch.ref_logp, index, width),
    )
    return micro, _rows(select, index, width) & keep


def grads_by_budget(grad_fn: Callable, params: Any, batch: TrainBatch, select: jax.Array,
                    totals: dict[str, jax.Array], *, budget: int, row_multiple: int
                    ) -> tuple[Any, dict[str, jax.Array], jax.Array]:
    """Summed gradients of token-budget micro-batches → (grads, metric sums, token weight).

    grad_fn(params, micro, select, totals) → ((loss, metrics), grads), the update's
    ``value_and_grad`` of one micro-batch. Rows with no valid loss token (``batch.loss_mask``)
    are not run at all: they add nothing to the loss, the gradient or any token-weighted metric.
    Metric sums: :func:`jaxrl.train.micro_metrics.fold`'s (finish them with
    :func:`~jaxrl.train.micro_metrics.finish` and the returned weight).
    """
    rows, t = batch.targets.shape
    p = batch.input_tokens.shape[1] - t
    width, micro = bucket_shapes(budget, p, t, row_multiple=row_multiple, max_rows=rows)[0]
    example = _micro_batch(batch, select, jnp.zeros(micro, jnp.int32), jnp.ones(micro, bool), p, width)
    (_, metric_shapes), _ = jax.eval_shape(grad_fn, params, *example, totals)

    def run(width, index, valid, carry):
        grads_sum, sums, weight_sum = carry
        micro_batch, micro_select = _micro_batch(batch, select, index, valid, p, width)
        (_, metrics), grads = grad_fn(params, micro_batch, micro_select, totals)
        weight = jnp.sum(micro_batch.loss_mask > 0, dtype=jnp.float32)
        return (jax.tree.map(jnp.add, grads_sum, grads), micro_metrics.fold(sums, metrics, weight),
                weight_sum + weight)

    carry = (jax.tree.map(jnp.zeros_like, params), {name: jnp.zeros((), jnp.float32) for name in metric_shapes},
             jnp.zeros((), jnp.float32))
    return walk(run, response_extent(batch.loss_mask > 0), carry, budget=budget, prompt_len=p, response_len=t,
                row_multiple=row_multiple)
