"""Logical axis names -> mesh axes -> NamedSharding.

Every parameter carries logical axis names (``jaxrl.models.transformer.param_logical_axes``);
a rule table maps each logical name to a mesh axis (or None = replicated). FSDP shards the
weights' ``embed`` axis over ``fsdp``; tensor parallelism shards heads / MLP / vocab over
``tensor``; the batch goes over ``data`` and ``fsdp``.
"""

from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.models.config import ModelConfig

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_norm": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def logical_to_spec(logical: tuple[str | None, ...], shape: tuple[int, ...] | None, mesh: Mesh,
                    rules: Mapping[str, MeshAxes] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes.

    A dimension whose size the mesh axes do not divide is replicated (e.g. 2 KV heads on a
    tensor axis of 4), as is any mesh axis already used by an earlier dimension.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical):
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = None if name is None else rules[name]
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        if shape is not None and names and shape[i] % _axis_size(mesh, names):
            names = ()
        used.update(names)
        spec.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None):
    """Nested dict of NamedSharding for every parameter (same structure as ``params``)."""
    from jaxrl.models.transformer import param_logical_axes, param_shapes

    axes = param_logical_axes(cfg)
    shapes = param_shapes(cfg)
    return jax.tree_util.tree_map(
        lambda logical, shape: NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules)),
        axes, shapes, is_leaf=lambda x: isinstance(x, tuple),
    )
