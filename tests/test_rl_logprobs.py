"""Chunked log-prob / entropy against float64 numpy and against the full-logits version."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.rl.logprobs import full_logits_logprobs_and_entropy, token_logprobs_and_entropy


def np_logprobs_entropy(hidden, unembed, targets, temperature):
    z = hidden.astype(np.float64) @ unembed.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
    logp = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(logq) * logq).sum(-1)
    return logp, entropy


def _inputs(seed, b, t, d, v, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hidden = (rng.normal(size=(b, t, d)) * 0.7).astype(dtype)
    unembed = (rng.normal(size=(d, v)) / np.sqrt(d) * 2.0).astype(dtype)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    return hidden, unembed, targets


@pytest.mark.parametrize(
    "b,t,d,v,chunk,temperature",
    [(2, 16, 8, 32, 4, 1.0), (3, 13, 16, 50, 5, 0.7), (1, 7, 4, 11, 64, 1.3), (4, 9, 8, 40, 1, 1.0)],
)
def test_values_match_float64_numpy(b, t, d, v, chunk, temperature):
    hidden, unembed, targets = _inputs(b * t + v, b, t, d, v)
    fn = jax.jit(functools.partial(
        token_logprobs_and_entropy, temperature=temperature, chunk_size=chunk))
    logp, entropy = fn(hidden, unembed, targets)
    assert logp.shape == (b, t) and logp.dtype == jnp.float32
    assert entropy.shape == (b, t) and entropy.dtype == jnp.float32
    want_logp, want_entropy = np_logprobs_entropy(hidden, unembed, targets, temperature)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-6, rtol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
    hidden, unembed, targets = _inputs(0, 2, 8, 16, 24)
    hidden_bf, unembed_bf = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    logp, entropy = token_logprobs_and_entropy(hidden_bf, unembed_bf, targets, chunk_size=3)
    assert logp.dtype == jnp.float32
    want_logp, want_entropy = np_logprobs_entropy(
        np.asarray(hidden_bf.astype(jnp.float32)), np.asarray(unembed_bf.astype(jnp.float32)),
        targets, 1.0)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-5)


@pytest.mark.parametrize("b,t,chunk", [(2, 12, 4), (3, 10, 3)])
def test_gradients_match_full_logits(b, t, chunk):
    d, v = 8, 30
    hidden, unembed, targets = _inputs(b + t, b, t, d, v)
    rng = np.random.default_rng(1)
    w_logp = rng.normal(size=(b, t)).astype(np.float32)
    w_ent = rng.normal(size=(b, t)).astype(np.float32)

    def objective(fn, hidden, unembed):
        logp, entropy = fn(hidden, unembed, targets)
        return jnp.sum(w_logp * logp) + jnp.sum(w_ent * entropy)

    chunked = functools.partial(token_logprobs_and_entropy, temperature=0.9, chunk_size=chunk)
    full = functools.partial(full_logits_logprobs_and_entropy, temperature=0.9)
    got = jax.jit(jax.grad(functools.partial(objective, chunked), argnums=(0, 1)))(hidden, unembed)
    want = jax.grad(functools.partial(objective, full), argnums=(0, 1))(hidden, unembed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def test_entropy_grad_switch_and_compute_entropy_off():
    hidden, unembed, targets = _inputs(3, 2, 6, 4, 9)

    def entropy_sum(h, entropy_grad):
        return token_logprobs_and_entropy(
            h, unembed, targets, chunk_size=4, entropy_grad=entropy_grad)[1].sum()

    assert np.abs(np.asarray(jax.grad(entropy_sum)(hidden, True))).max() > 1e-3
    assert np.abs(np.asarray(jax.grad(entropy_sum)(hidden, False))).max() == 0.0
    logp, entropy = token_logprobs_and_entropy(
        hidden, unembed, targets, chunk_size=4, compute_entropy=False)
    np.testing.assert_array_equal(np.asarray(entropy), 0.0)
    want_logp, _ = np_logprobs_entropy(hidden, unembed, targets, 1.0)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-6)


def _max_intermediate_size(jaxpr):
    """Largest array (in elements) produced anywhere in a jaxpr, sub-jaxprs included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            biggest = max(biggest, int(np.prod(shape)) if shape else 1)
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    biggest = max(biggest, _max_intermediate_size(inner))
    return biggest


def test_backward_never_materialises_full_logits():
    b, t, d, v, chunk = 2, 64, 4, 97, 8
    hidden, unembed, targets = _inputs(5, b, t, d, v)

    def loss(h, w):
        logp, entropy = token_logprobs_and_entropy(h, w, targets, chunk_size=chunk)
        return logp.sum() + entropy.sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, unembed).jaxpr
    biggest = _max_intermediate_size(jaxpr)
    assert biggest >= b * chunk * v  # the chunk's logits do appear ...
    assert biggest < b * t * v // 4  # ... but nothing near [B, T, V]


def test_rejects_bad_arguments():
    hidden, unembed, targets = _inputs(0, 1, 4, 4, 5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(hidden, unembed, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_and_entropy(hidden, unembed, targets, chunk_size=0)
