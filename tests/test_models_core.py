"""Decoder internals: KV-cache path == full forward, scan compile time, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import (decoder_hidden, decoder_hidden_with_cache, init_kv_cache,
                                      init_params, logits_from_hidden, positions_from_mask)
from benchmarks.compile_time import compile_seconds, llvm_kernels, tiny_config


def test_cached_prefill_and_decode_equal_full_forward():
    cfg = ModelConfig(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0), std=0.1)
    prompt_len, new, slots = 6, 5, 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (3, prompt_len + new)).astype(np.int32)
    mask = np.ones((3, prompt_len + new), bool)
    mask[0, :3] = False  # left padding
    mask[2, :1] = False
    positions = positions_from_mask(jnp.asarray(mask))
    full = logits_from_hidden(params, cfg, decoder_hidden(params, cfg, tokens, positions, mask))

    cache = init_kv_cache(cfg, 3, slots)
    valid = np.zeros((3, slots), bool)
    valid[:, :prompt_len] = mask[:, :prompt_len]
    hidden, cache = decoder_hidden_with_cache(params, cfg, tokens[:, :prompt_len], positions[:, :prompt_len],
                                              cache, jnp.int32(0), jnp.asarray(valid))
    got = [logits_from_hidden(params, cfg, hidden)]
    for t in range(prompt_len, prompt_len + new):
        valid[:, t] = True
        hidden, cache = decoder_hidden_with_cache(params, cfg, tokens[:, t:t + 1], positions[:, t:t + 1],
                                                  cache, jnp.int32(t), jnp.asarray(valid))
        got.append(logits_from_hidden(params, cfg, hidden))
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    np.testing.assert_allclose(got[mask], np.asarray(full)[mask], atol=1e-5)


def test_remat_policies_give_the_same_gradients():
    base = ModelConfig(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=48,
                       num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 40, (2, 8)), jnp.int32)
    grads = []
    for remat in ("none", "full", "dots"):
        cfg = base.replace(remat=remat)
        params = init_params(cfg, jax.random.key(3))
        loss = lambda p: jnp.mean(logits_from_hidden(p, cfg, decoder_hidden(p, cfg, tokens)) ** 2)
        grads.append(jax.grad(loss)(params))
    for other in grads[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                               grads[0], other)


def test_compile_time_does_not_grow_with_depth():
    compile_seconds(1)
    shallow, deep = compile_seconds(2), compile_seconds(16)
    # Loose on purpose (shared CI cores); an unrolled 16-layer stack takes ~8x as long.
    assert deep < 2.0 * shallow + 1.0, f"2 layers: {shallow:.2f}s, 16 layers: {deep:.2f}s"


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
    ("model_type", "gpt2", "not supported"),
    ("dtype", "float8", "ModelConfig.dtype"),
    ("remat", "sometimes", "ModelConfig.remat"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(2).replace(**{field: value})


def test_from_hf_errors_name_the_key(tmp_path):
    with pytest.raises(KeyError, match="hidden_size"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 3})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ModelConfig.from_hf(str(tmp_path / "nowhere"))


def test_rolled_engine_emits_the_same_llvm_kernels_at_any_depth():
    """benchmarks/compile_time.py --count-kernels (the compile-time proxy in BENCHMARKS.md)
    counts the engine's XLA:CPU kernels: the rolled decode loop holds one layer body, so 2 and
    6 layers emit the same kernels, where the 6 unrolled layers emit more."""
    sizes = dict(new_tokens=8, prompts_n=1, samples=2)
    rolled = [llvm_kernels("small", layer_loop="rolled", num_layers=layers, **sizes) for layers in (2, 6)]
    unrolled = llvm_kernels("small", layer_loop="unrolled", num_layers=6, **sizes)
    assert rolled[0] == rolled[1] < unrolled, (rolled, unrolled)
