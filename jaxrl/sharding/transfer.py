"""Host <-> device transfer for arrays laid out on the mesh (one process or many).

Only completions, rewards and group ids cross to the host each step (docs/design.md); these
two helpers are the only places that do it.
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
