"""Logical axis names -> mesh axes -> NamedSharding, for parameters, activations and caches.

Every parameter carries logical axis names (``jaxrl.models.transformer.param_logical_axes``);
activations, the KV cache and batches use the names in ``ACTIVATION_AXES``. One rule table
maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated):

* FSDP shards the weights' ``embed`` axis over ``fsdp`` (gathered per layer inside the scan
  by the compiler); activations are never sharded over ``embed``.
* Tensor parallelism shards heads / MLP / vocab over ``tensor``, for weights and activations.
* The batch (training rows, sampler rows, KV-cache rows) goes over ``data`` and ``fsdp``.

The rules are applied only through ``jit`` in/out shardings (and ``device_put`` /
``make_array_from_callback`` at load time); model code never mentions devices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # the model imports ``constrain`` from here; no import cycle at run time
    from jaxrl.models.config import ModelConfig

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

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

# Logical axes of the arrays that cross jit boundaries besides the parameters.
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "rows": ("batch",),                                   # [B] advantages, lengths, ...
    "tokens": ("batch", "length"),                        # [B, T] ids, masks, logp, entropy
    "hidden": ("batch", "length", "act_embed"),           # [B, T, D]
    "logits": ("batch", "length", "act_vocab"),           # [B, T, V]
    "heads": ("batch", "length", "act_heads", "head_dim"),  # [B, T, H, hd]
    "mlp": ("batch", "length", "act_mlp"),                # [B, T, F]
    "kv_cache": ("layers", "batch", "cache_length", "act_kv_heads", "head_dim"),  # [L,B,S,K,hd]
}


def _mesh_sizes(mesh: Mesh | Mapping[str, int]) -> Mapping[str, int]:
    return mesh.shape if isinstance(mesh, Mesh) else mesh


def _axis_names(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: tuple[str | None, ...], shape: tuple[int, ...] | None,
                    mesh: Mesh | Mapping[str, int],
                    rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes (one name or None per dim).

    ``mesh`` may be a Mesh or just its {axis name: size} (the planner uses the latter).
    A mesh axis already used by an earlier dimension, or of size 1, is dropped. When the
    dimension's size is known and the mesh axes do not divide it, the longest leading run of
    them that does is used (e.g. a batch of 2 on data=2, fsdp=2 goes over data only), and
    none at all if even the first does not divide (e.g. 2 KV heads on a tensor axis of 4).
    """
    rules = DEFAULT_RULES if rules is None else rules
    sizes = _mesh_sizes(mesh)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical):
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        names = tuple(n for n in _axis_names(None if name is None else rules[name])
                      if n not in used and sizes.get(n, 1) > 1)
        if shape is not None:
            while names and shape[i] % math.prod(sizes[n] for n in names):
                names = names[:-1]
        used.update(names)
        spec.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*spec)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec,
                mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of ``shape`` laid out as ``spec`` on ``mesh``."""
    sizes = _mesh_sizes(mesh)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(
        dim // math.prod(sizes[n] for n in _axis_names(axes)) for dim, axes in zip(shape, entries)
    )


def named_sharding(logical: tuple[str | None, ...] | str, mesh: Mesh,
                   shape: tuple[int, ...] | None = None,
                   rules: Rules | None = None) -> NamedSharding:
    """NamedSharding from logical axes, or from a key of ``ACTIVATION_AXES`` ("tokens", ...)."""
    if isinstance(logical, str):
        logical = ACTIVATION_AXES[logical]
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules | None = None):
    """Nested dict of NamedSharding for every parameter (same structure as ``params``)."""
    from jaxrl.models.transformer import param_logical_axes, param_shapes

    axes = param_logical_axes(cfg)
    shapes = param_shapes(cfg)
    return jax.tree_util.tree_map(
        lambda logical, shape: NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules)),
        axes, shapes, is_leaf=lambda x: isinstance(x, tuple),
    )


def kv_cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, max_length: int,
                       rules: Rules | None = None):
    """``KVCache`` of NamedSharding for a cache of ``batch`` rows x ``max_length`` slots.

    Rows follow the ``batch`` rule (like the sampler's batch), KV heads the tensor axis.
    """
    from jaxrl.models.transformer import KVCache

    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    sharding = named_sharding("kv_cache", mesh, shape, rules)
    return KVCache(k=sharding, v=sharding)


def rules_without_fsdp(rules: Rules | None = None) -> dict[str, MeshAxes]:
    """Rules for a sampling mesh that keeps whole weights per tensor shard (no FSDP gathers).

    Weights' ``embed`` axis is replicated; the ``fsdp`` axis, if the sampling mesh has one,
    carries only batch rows.
    """
    out = dict(DEFAULT_RULES if rules is None else rules)
    out["embed"] = None
    return out


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules | None = None):
    """NamedSharding per leaf for parallel pytrees of logical-axis tuples and shapes."""
    return jax.tree_util.tree_map(
        lambda logical, shape: named_sharding(logical, mesh, shape, rules),
        logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple),
    )


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


def constrain(x: jax.Array, kind: str | tuple[str | None, ...], rules: Rules | None = None) -> jax.Array:
    """Pin an activation's layout by logical axes under the mesh set with ``jax.set_mesh``.

    kind: a key of ``ACTIVATION_AXES`` ("hidden", "tokens", ...) or a logical-axes tuple.
    Without a mesh in context (single-device code, tests) it returns ``x`` unchanged. Meant for
    the residual stream inside the layer scan: without it, on an fsdp mesh XLA may keep the
    batch whole and shard the hidden dimension instead (activations replicated over fsdp).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    logical = ACTIVATION_AXES[kind] if isinstance(kind, str) else kind
    spec = logical_to_spec(logical, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)
