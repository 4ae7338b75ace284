"""Layout of the model's arrays and how it maps onto a device mesh.

Every parameter carries logical axis names (``param_logical_axes``); activations, the KV cache
and batches use the names in ``ACTIVATION_AXES``. One rule table maps each logical name to a
mesh axis, a tuple of mesh axes, or None (replicated):

* FSDP shards the weights' ``embed`` axis over ``fsdp``; ``gather_layer`` gathers one layer's
  weights inside the layer scan (pinned there, so no backend may gather every layer up
  front); activations are never sharded over ``embed``.
* Tensor parallelism shards heads / MLP / vocab over ``tensor``, for weights and activations.
* The batch (training rows, sampler rows, KV-cache rows) goes over ``data`` and ``fsdp``.

The rules are applied only through ``jit`` in/out shardings (and ``device_put`` /
``make_array_from_callback`` at load time) and, inside the layer scan, through ``constrain``;
model code never mentions devices. This module sits below ``jaxrl.models.transformer`` (which
uses ``constrain``, ``param_shapes`` and ``KVCache``); ``jaxrl.sharding.rules`` re-exports it
and adds the mesh-level helpers (sampling rules, optimizer-state shardings).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.models.config import ModelConfig

Params = dict[str, Any]
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


# --------------------------------------------------------------------------- parameters
# Logical axis names of every parameter (leading "layers" for stacked block weights); the
# sharding rules map them to mesh axes.
_BLOCK_AXES = {
    "attn_norm": ("layers", "embed_norm"),
    "q_proj": ("layers", "embed", "q_heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "q_heads", "embed"),
    "q_bias": ("layers", "q_heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "o_bias": ("layers", "embed_norm"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "mlp_norm": ("layers", "embed_norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "gate_bias": ("layers", "mlp"),
    "up_bias": ("layers", "mlp"),
    "down_bias": ("layers", "embed_norm"),
}


def param_shapes(cfg: ModelConfig) -> Params:
    """Nested dict of the shape of every parameter (same structure as ``params``)."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    blocks = {
        "attn_norm": (L, D),
        "q_proj": (L, D, q),
        "k_proj": (L, D, kv),
        "v_proj": (L, D, kv),
        "o_proj": (L, q, D),
        "mlp_norm": (L, D),
        "gate_proj": (L, D, F),
        "up_proj": (L, D, F),
        "down_proj": (L, F, D),
    }
    if cfg.qkv_bias:
        blocks.update(q_bias=(L, q), k_bias=(L, kv), v_bias=(L, kv))
    if cfg.o_bias:
        blocks["o_bias"] = (L, D)
    if cfg.mlp_bias:
        blocks.update(gate_bias=(L, F), up_bias=(L, F), down_bias=(L, D))
    if cfg.qk_norm:
        blocks.update(q_norm=(L, hd), k_norm=(L, hd))
    shapes: Params = {"embed": (V, D), "blocks": blocks, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Nested dict of logical axis names per parameter (same structure as ``params``)."""
    blocks = {name: _BLOCK_AXES[name] for name in param_shapes(cfg)["blocks"]}
    axes: Params = {"embed": ("vocab", "embed"), "blocks": blocks, "final_norm": ("embed_norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules | None = None):
    """Nested dict of NamedSharding for every parameter (same structure as ``params``)."""
    axes = param_logical_axes(cfg)
    shapes = param_shapes(cfg)
    return jax.tree_util.tree_map(
        lambda logical, shape: NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules)),
        axes, shapes, is_leaf=lambda x: isinstance(x, tuple),
    )


# --------------------------------------------------------------------------- KV cache
@struct.dataclass
class KVCache:
    """Per-layer keys/values: k, v [L, B, S, K, hd] (rotary already applied to k)."""

    k: jax.Array
    v: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def kv_cache_shape(cfg: ModelConfig, batch: int, max_length: int) -> tuple[int, ...]:
    """[L, B, S, K, hd] shape of the cache's k and v for ``batch`` rows x ``max_length`` slots."""
    return (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)


def kv_cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, max_length: int,
                       rules: Rules | None = None):
    """``KVCache`` of NamedSharding for a cache of ``batch`` rows x ``max_length`` slots.

    Rows follow the ``batch`` rule (like the sampler's batch), KV heads the tensor axis.
    """
    shape = kv_cache_shape(cfg, batch, max_length)
    sharding = named_sharding("kv_cache", mesh, shape, rules)
    return KVCache(k=sharding, v=sharding)


# --------------------------------------------------------------------------- activations
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


def gather_layer(p: Params, rules: Rules | None = None) -> Params:
    """One layer's weights (the layer scan's slice of ``params["blocks"]``) gathered over fsdp.

    p: {name: array without the leading ``layers`` axis}. Under a mesh with fsdp > 1 each
    weight is pinned twice: first to its stored layout (fsdp-sharded), then to the same layout
    without fsdp. The first pin stops sharding propagation from pulling the gather back onto
    the stacked [L, ...] operand in front of the scan, so exactly one layer is gathered at a
    time (its cotangent is reduce-scattered inside the backward scan). Without a mesh in
    context, or with fsdp = 1, ``p`` is returned unchanged. Bytes: one layer's weights / tensor.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return p
    sizes = dict(mesh.shape)
    rules = DEFAULT_RULES if rules is None else rules
    gathered = {k: tuple(a for a in _axis_names(v) if a != "fsdp") or None for k, v in rules.items()}
    out = {}
    for name, w in p.items():
        logical = _BLOCK_AXES[name][1:]
        w = jax.lax.with_sharding_constraint(w, logical_to_spec(logical, w.shape, sizes, rules))
        out[name] = jax.lax.with_sharding_constraint(w, logical_to_spec(logical, w.shape, sizes, gathered))
    return out
