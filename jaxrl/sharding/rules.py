"""Logical axis names -> mesh axes -> NamedSharding: the mesh-level side of the rules.

The model's own layout lives in ``jaxrl.models.sharding`` (the rule table ``DEFAULT_RULES``,
``ACTIVATION_AXES``, ``logical_to_spec``, parameter / KV-cache shardings and the activation
``constrain`` of the layer scan), so the model never imports this package. It is re-exported
here for the trainer, the sampler and the tests; this module adds the rules of a sampling mesh
without FSDP and the shardings of an optimizer state that follows the parameters.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.models.sharding import (  # re-exported, see __all__
    ACTIVATION_AXES, DEFAULT_RULES, MeshAxes, Rules, constrain, kv_cache_shardings,
    logical_to_spec, named_sharding, param_shardings, shard_shape,
)

__all__ = [
    "ACTIVATION_AXES", "DEFAULT_RULES", "MeshAxes", "Rules", "constrain", "kv_cache_shardings",
    "logical_to_spec", "named_sharding", "param_shardings", "rules_without_fsdp", "shard_shape",
    "shardings_like_params",
]


def rules_without_fsdp(rules: Rules | None = None) -> dict[str, MeshAxes]:
    """Rules for a sampling mesh that keeps whole weights per tensor shard (no FSDP gathers).

    Weights' ``embed`` axis is replicated; the ``fsdp`` axis, if the sampling mesh has one,
    carries only batch rows.
    """
    out = dict(DEFAULT_RULES if rules is None else rules)
    out["embed"] = None
    return out


def shardings_like_params(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs), e.g. an optax state.

    A leaf whose tree path ends with a parameter's path (as AdamW's mu / nu do) gets that
    parameter's sharding; every other leaf (step counts, scalars) is replicated.
    """
    by_path = {
        tuple(str(k) for k in path): sharding
        for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def choose(path, _leaf):
        keys = tuple(str(k) for k in path)
        for n in lengths:
            if len(keys) >= n and keys[-n:] in by_path:
                return by_path[keys[-n:]]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(choose, tree)
