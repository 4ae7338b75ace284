"""Token-budget micro-batches: which rows go together, and how wide each micro-batch is.

With ``rl.micro_batch_tokens`` = N > 0 the trainer does not cut a mini-batch into fixed
micro-batches of ``rl.micro_batch_rows`` full-width rows. A few fixed response widths w
(``bucket_widths``) each get one micro-batch shape: ``rows(w)`` rows of P + w positions with
rows(w)·(P + w) ≤ N (``bucket_shapes``). Rows are sorted by their extent (last valid response
position + 1), longest first; each micro-batch takes the next rows(w) rows, w the narrowest
width that holds the first (longest) of them. A batch of mostly short responses then pays
for short micro-batches, not for its longest row times the row count. The shapes depend only
on (N, P, T, row multiple, batch rows), so one compiled program serves every step; which
shape each micro-batch uses and how many there are depend on the data. Only the last
micro-batch has filler slots (loss-free copies of a real row); rows with extent 0 (padding
rows, filtered rows) are not run.

Pure functions: ``bucket_shapes`` and ``padded_tokens`` on the host (Python ints / NumPy),
``response_extent``, ``sort_rows``, ``width_index`` and ``micro_rows`` traceable under ``jit``.
Shapes: M rows, P prompt positions (left-padded), T response positions, K widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Widths T and the largest powers of two below it, none under MIN_WIDTH (T = 960: 960, 512,
# 256, 128, 64): a row wastes < half its micro-batch width (except below the narrowest), and
# the update compiles one micro-batch body per width, so few widths keep compile time down.
NUM_WIDTHS = 5
MIN_WIDTH = 16


def bucket_widths(response_len: int, num_widths: int = NUM_WIDTHS) -> tuple[int, ...]:
    """Response widths, ascending: T and the largest ``num_widths`` − 1 powers of two in
    [MIN_WIDTH, T)."""
    powers = [1 << j for j in range(response_len.bit_length()) if MIN_WIDTH <= 1 << j < response_len]
    return tuple(powers[max(len(powers) - num_widths + 1, 0):] if num_widths > 1 else []) + (response_len,)


def bucket_shapes(budget: int, prompt_len: int, response_len: int, *, row_multiple: int = 1,
                  max_rows: int | None = None, num_widths: int = NUM_WIDTHS) -> tuple[tuple[int, int], ...]:
    """((w, rows), ...) ascending in w: the micro-batch shapes of a token budget.

    budget: tokens (rows × (P + w)) per micro-batch. rows = ⌊budget / (P + w)⌋ rounded down to
    a multiple of ``row_multiple`` (the data × fsdp row shards), at most ``max_rows`` rounded up
    to that multiple (a micro-batch never needs more rows than the batch has). ValueError when
    not even ``row_multiple`` full-width rows fit.
    """
    full = prompt_len + response_len
    if budget < row_multiple * full:
        raise ValueError(
            f"rl.micro_batch_tokens={budget} is below {row_multiple} full-width row(s) of P + T = "
            f"{prompt_len} + {response_len} = {full} tokens (one per data x fsdp row shard)")
    cap = None if max_rows is None else -(-max_rows // row_multiple) * row_multiple
    shapes = []
    for width in bucket_widths(response_len, num_widths):
        rows = budget // (prompt_len + width) // row_multiple * row_multiple
        shapes.append((width, rows if cap is None else min(rows, cap)))
    return tuple(shapes)


def response_extent(response_mask: jax.Array) -> jax.Array:
    """int32 [M]: 1 + the last response position that is set in ``response_mask`` [M, T]
    (0 for a row with none). Any position at or beyond it may be cut off."""
    t = response_mask.shape[1]
    steps = jnp.arange(1, t + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(response_mask, steps[None, :], 0), axis=1).astype(jnp.int32)


def sort_rows(extent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order int32 [M]: row indices by extent, longest first, ties by row index; live int32
    scalar: rows with extent > 0, which come first in ``order``; the others are not run)."""
    order = jnp.argsort(-extent, stable=True).astype(jnp.int32)
    return order, jnp.sum(extent > 0, dtype=jnp.int32)


def width_index(extent: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """int32: index of the narrowest width ≥ ``extent`` (widths ascending, the last ≥ it)."""
    return jnp.searchsorted(jnp.asarray(widths, jnp.int32), extent, side="left").astype(jnp.int32)


def micro_rows(order: jax.Array, live: jax.Array, start: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """The micro-batch that starts at ``order[start]``: (row indices int32 [rows], valid bool
    [rows]). Slots at or past ``live`` are not valid (filler); their index is a row at least
    as short as every valid one (harmless inputs; the caller zeroes their loss mask)."""
    slot = start + jnp.arange(rows, dtype=jnp.int32)
    return order[jnp.minimum(slot, order.shape[0] - 1)], slot < live


def padded_tokens(extents: np.ndarray, shapes: tuple[tuple[int, int], ...], prompt_len: int) -> int:
    """Host cost model: positions the token-budget micro-batches of rows with these response
    extents run, filler rows included (the same walk as the trainer's loop)."""
    widths = np.asarray([w for w, _ in shapes])
    ordered = np.sort(np.asarray(extents)[np.asarray(extents) > 0])[::-1]
    total, start = 0, 0
    while start < len(ordered):
        width, rows = shapes[int(np.searchsorted(widths, ordered[start], side="left"))]
        total += rows * (prompt_len + width)
        start += rows
    return total
