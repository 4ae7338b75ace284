"""Host <-> device transfer for arrays laid out on the mesh (one process or many).

Only completions, rewards and group ids cross to the host each step (docs/design.md); these
helpers are the only places that do it. Multi-process runs split the host work by
``process_block``: process i handles a contiguous block of rows, reads those rows of a device
array from its own shards (``process_rows``) and shares its per-row results with every other
process (``gather_blocks``), so host-side decisions are taken on identical numbers everywhere.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_array(x: jax.Array) -> np.ndarray:
    """A device array as numpy on this host, gathered across processes when it is not
    fully addressable here (multi-host meshes). Shape and dtype unchanged."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_on_mesh(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (identical on every process) placed with ``sharding``; each device
    receives only its own shard."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def block_bounds(count: int, index: int, blocks: int) -> tuple[int, int]:
    """[start, stop) of block ``index`` when ``count`` items are cut into ``blocks`` contiguous
    blocks in order (sizes differ by at most one; a block may be empty when count < blocks)."""
    if blocks < 1 or not 0 <= index < blocks or count < 0:
        raise ValueError(f"need count >= 0 and 0 <= index < blocks, got {count=}, {index=}, {blocks=}")
    return index * count // blocks, (index + 1) * count // blocks


def process_block(count: int) -> tuple[int, int]:
    """[start, stop) of the items this process handles among ``count`` (``block_bounds`` by
    ``jax.process_index()`` of ``jax.process_count()``; all of them in a single process)."""
    return block_bounds(count, jax.process_index(), jax.process_count())


def process_rows(x: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of device array ``x`` (any shape [N, ...]) as numpy on this host.

    Copied from this process's own shards when together they hold those rows (the usual
    layout: rows over (data, fsdp), each process's devices holding one contiguous block), so
    nothing crosses hosts; otherwise (rows laid out across processes in another order) taken
    from ``x`` gathered across processes, which moves the whole array.
    """
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))[start:stop]
    out = np.zeros((stop - start,) + tuple(x.shape[1:]), x.dtype)
    covered = np.zeros(out.shape, bool)
    for shard in x.addressable_shards:
        first, last, _ = shard.index[0].indices(x.shape[0]) if shard.index else (0, x.shape[0], 1)
        lo, hi = max(first, start), min(last, stop)
        if lo >= hi:
            continue
        rest = tuple(shard.index[1:])
        out[(slice(lo - start, hi - start),) + rest] = np.asarray(shard.data)[lo - first:hi - first]
        covered[(slice(lo - start, hi - start),) + rest] = True
    if covered.all():
        return out
    return host_array(x)[start:stop]


def gather_blocks(local: np.ndarray, count: int) -> np.ndarray:
    """Every process's ``local`` rows (process i: rows ``block_bounds(count, i, P)``, shape
    [stop - start, ...]) concatenated in process order → [count, ...] on every process.

    Blocks may differ in size by one; they are padded to the largest for the all-gather and
    cut back after. Dtypes the device keeps exactly (int32, uint32, float32) cross unchanged;
    a single process returns ``local`` as is.
    """
    local = np.asarray(local)
    processes = jax.process_count()
    if processes == 1:
        return local
    bounds = [block_bounds(count, i, processes) for i in range(processes)]
    widest = max(stop - start for start, stop in bounds)
    mine = bounds[jax.process_index()]
    if local.shape[0] != mine[1] - mine[0]:
        raise ValueError(f"process {jax.process_index()} holds {local.shape[0]} rows, its block is {mine}")
    padded = np.zeros((widest,) + local.shape[1:], local.dtype)
    padded[: local.shape[0]] = local
    stacked = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [P, widest, ...]
    return np.concatenate([stacked[i, : stop - start] for i, (start, stop) in enumerate(bounds)])


def gather_scalars(values: np.ndarray) -> np.ndarray:
    """Every process's ``values`` (same shape everywhere, e.g. float32 [M] counters) stacked in
    process order → [P, ...] on every process ([1, ...] in a single process)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values, tiled=False))
