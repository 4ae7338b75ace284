"""One decoder-only transformer for Llama 3.x, Qwen2/2.5 and Qwen3.

GQA attention with RoPE (incl. llama3 frequency scaling), RMSNorm, SwiGLU MLP, optional q/k/v
bias (qwen2), q/k RMSNorm (qwen3), tied or untied embeddings. The layers' weights are stacked
along a leading ``layers`` axis and run with ``lax.scan``, so compile time does not grow with
depth.

The core is functional: every function takes ``params``, a plain nested dict of arrays

    {"embed": [V, D],
     "blocks": {"attn_norm": [L, D], "q_proj": [L, D, H*hd], "k_proj": [L, D, K*hd],
                "v_proj": [L, D, K*hd], "o_proj": [L, H*hd, D], ("q_bias" ... optional),
                ("q_norm", "k_norm": [L, hd]), "mlp_norm": [L, D],
                "gate_proj": [L, D, F], "up_proj": [L, D, F], "down_proj": [L, F, D]},
     "final_norm": [D],
     ("lm_head": [D, V] when embeddings are untied)}

and the static ``ModelConfig``. ``Transformer`` is the Flax NNX container holding those arrays
as ``nnx.Param``; jitted code receives the split state (``model_params``), never the module.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.kernels.flash_attention import blocked_attention, resolve_impl, self_attention
from jaxrl.models.config import ModelConfig
from jaxrl.models.sharding import KVCache, Params, constrain, gather_layer, kv_cache_shape, param_shapes

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows give no NaN

def init_params(cfg: ModelConfig, key: jax.Array, *, std: float = 0.02) -> Params:
    """Random parameters: normal(0, std) matrices, ones for norm weights, zeros for biases."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    keys = jax.random.split(key, len(flat))
    dtype = jnp.dtype(cfg.param_dtype)
    leaves = []
    for k, (path, shape) in zip(keys, flat):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype (HF order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """float64 [head_dim / 2] rotary inverse frequencies, with llama3 scaling if configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, N, hd] by positions [B, T] (HF rotate-half convention)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """int32 [B, T] position ids for a left-padded batch: 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q [B, T, H, hd], k/v [B, S, K, hd] (H a multiple of K), mask bool [B, T, S] (True = may
    attend). Scores and softmax in float32. Returns [B, T, H, hd] in q's dtype.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, hd).astype(q.dtype)


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def init_kv_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
    """Zero cache for ``batch`` rows and ``max_length`` slots (dtype defaults to cfg.dtype)."""
    shape = kv_cache_shape(cfg, batch, max_length)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# Signature of a pluggable single-token attention over the cache (see kernels/attention.py):
# (q [B, H, hd], k_cache [B, S, K, hd], v_cache [B, S, K, hd], valid bool [B, S]) -> [B, H, hd]
DecodeAttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _block(cfg: ModelConfig, inv_freq: np.ndarray, x: jax.Array, p: Params, positions,
           attend: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]):
    """One decoder layer. ``attend(q, k, v)`` does attention and returns (out, side output)."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = _linear(h, p["q_proj"], p.get("q_bias")).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _linear(h, p["k_proj"], p.get("k_bias")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(h, p["v_proj"], p.get("v_bias")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    attn, side = attend(q, k, v)
    x = x + _linear(attn.reshape(b, t, -1), p["o_proj"], p.get("o_bias"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = _linear(h, p["gate_proj"], p.get("gate_bias"))
    up = _linear(h, p["up_proj"], p.get("up_bias"))
    x = x + _linear(jax.nn.silu(gate) * up, p["down_proj"], p.get("down_bias"))
    return x, side


def _maybe_remat(cfg: ModelConfig, fn):
    if cfg.remat == "none":
        return fn
    # "dots" saves the matmuls without batch dimensions (projections, MLP), not the attention
    # score/value einsums (batched over rows and heads): saving those would keep T x S scores,
    # for the blocked kernel every block's (a remat policy sees inside its forward scan).
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return jax.checkpoint(fn, policy=policy)


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] in the compute dtype."""
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.dtype)


def decoder_hidden(params: Params, cfg: ModelConfig, tokens: jax.Array,
                   positions: jax.Array | None = None,
                   attention_mask: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] (compute dtype) for a full sequence, no cache.

    tokens int32 [B, T]; attention_mask bool [B, T] (False on padding, default all True);
    positions int32 [B, T] (default derived from the mask, 0 at the first real token).
    """
    b, t = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    impl = resolve_impl(cfg.attention_impl, t, cfg.dtype)
    if impl == "xla":  # dense: [B, T, T] mask and [B, H, T, T] float32 scores
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :]

        def attend(q, k, v):
            return attention(q, k, v, mask), None
    else:  # blocked / cuDNN / TPU flash: no T x T buffer
        def attend(q, k, v):
            return self_attention(impl, q, k, v, attention_mask), None
    inv_freq = rope_inverse_frequencies(cfg)

    def layer(x, p):
        x = constrain(x, "hidden")  # keep rows sharded over data/fsdp under a mesh (no-op without)
        out, _ = _block(cfg, inv_freq, x, gather_layer(p), positions, attend)
        return out, None

    x, _ = jax.lax.scan(_maybe_remat(cfg, layer), embed(params, cfg, tokens), params["blocks"])
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def decoder_hidden_with_cache(params: Params, cfg: ModelConfig, tokens: jax.Array,
                              positions: jax.Array, cache: KVCache, write_index: jax.Array,
                              valid: jax.Array,
                              decode_attention: DecodeAttentionFn | None = None
                              ) -> tuple[jax.Array, KVCache]:
    """Run T new tokens per row through the decoder, reading and extending the KV cache.

    tokens, positions int32 [B, T]; the new keys/values go to cache slots
    ``write_index .. write_index + T - 1`` (write_index an int32 scalar). valid bool [B, S]
    marks the slots holding real tokens, the new ones included; new token t attends to valid
    slots ``<= write_index + t``. With T == 1 and ``decode_attention`` given, that function
    does the single-token attention (e.g. a Pallas kernel). Returns final-normed hidden states
    [B, T, D] and the updated cache.
    """
    t = tokens.shape[1]
    s = cache.max_length
    slot = jnp.arange(s)
    query_slot = write_index + jnp.arange(t)
    # prefill (t > 1) over a long cache: blocked attention, no [B, H, T, S] scores
    blocked = t > 1 and resolve_impl(cfg.attention_impl, s, cfg.dtype) != "xla"
    mask = None if blocked else valid[:, None, :] & (slot[None, None, :] <= query_slot[None, :, None])
    inv_freq = rope_inverse_frequencies(cfg)

    def layer(x, xs):
        p, k_cache, v_cache = xs
        x = constrain(x, "hidden")

        def attend(q, k, v):
            k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), write_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), write_index, axis=1)
            if t == 1 and decode_attention is not None:
                out = decode_attention(q[:, 0], k_all, v_all, mask[:, 0])[:, None]
            elif blocked:
                out = blocked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), valid,
                                        q_pos=query_slot.astype(jnp.int32))
            else:
                out = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
            return out, (k_all, v_all)

        out, (k_all, v_all) = _block(cfg, inv_freq, x, gather_layer(p), positions, attend)
        return out, (k_all, v_all)

    x, (k_new, v_new) = jax.lax.scan(layer, embed(params, cfg, tokens), (params["blocks"], cache.k, cache.v))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return hidden, KVCache(k=k_new, v=v_new)


def unembedding(params: Params, cfg: ModelConfig) -> jax.Array:
    """Output projection [D, V] (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] from hidden states [..., D] (matmul in the compute dtype)."""
    w = unembedding(params, cfg).astype(cfg.dtype)
    return jnp.einsum("...d,dv->...v", hidden.astype(cfg.dtype), w, preferred_element_type=jnp.float32)


def forward_params(params: Params, cfg: ModelConfig, tokens: jax.Array,
                   positions: jax.Array | None = None,
                   attention_mask: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, V]; the functional form of ``forward`` (jit with cfg static)."""
    hidden = decoder_hidden(params, cfg, tokens, positions, attention_mask)
    return logits_from_hidden(params, cfg, hidden)


# --------------------------------------------------------------------------- NNX container
class _ParamGroup(nnx.Module):
    def __init__(self, arrays: Params):
        for name, value in arrays.items():
            setattr(self, name, _ParamGroup(value) if isinstance(value, dict) else nnx.Param(value))


class Transformer(nnx.Module):
    """Flax NNX module holding the decoder's parameters.

    ``config`` is static. ``hf_metadata`` is a JSON string with the original HF config.json
    and the directory it came from (for save_pretrained to keep extra keys and copy the
    tokenizer). Use ``model_params(model)`` to get the pure parameter dict for jitted code.
    """

    def __init__(self, config: ModelConfig, *, params: Params | None = None,
                 rngs: nnx.Rngs | None = None, hf_metadata: str = "{}"):
        if params is None:
            rngs = rngs or nnx.Rngs(0)
            params = init_params(config, rngs.params())
        self.config = config
        self.hf_metadata = hf_metadata
        self.embed = nnx.Param(params["embed"])
        self.blocks = _ParamGroup(params["blocks"])
        self.final_norm = nnx.Param(params["final_norm"])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self.hf_metadata)


def model_params(model: Transformer) -> Params:
    """The model's parameters as a plain nested dict of arrays (no copy)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model: Transformer, params: Params) -> Transformer:
    """A new Transformer with the same config/metadata and the given parameter dict."""
    return Transformer(model.config, params=params, hf_metadata=model.hf_metadata)


@functools.partial(jax.jit, static_argnums=(1,))
def _forward_jit(params, cfg, tokens, positions, attention_mask):
    return forward_params(params, cfg, tokens, positions, attention_mask)


def forward(model: Transformer, tokens, positions=None, attention_mask=None) -> jax.Array:
    """float32 logits [B, T, V] for int tokens [B, T].

    attention_mask bool/int [B, T] (False/0 on padding; left-padded batches are handled);
    positions int [B, T] default to 0 at each row's first real token.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask).astype(bool)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
    return _forward_jit(model_params(model), model.config, tokens, positions, attention_mask)
