"""Fused sampler: Pallas kernel (interpret mode) vs jnp reference vs float64 numpy, and the
sampled distribution vs softmax(z/T) (plain, top-k, top-p) by chi-square tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrl.kernels.sampling import (
    gumbel_noise,
    make_key_data,
    sample_tokens,
    sample_tokens_reference,
)

NEG_INF = -np.inf


def expected_numpy(z, temperature, top_k, top_p):
    """float64 (full-vocab probabilities, kept mask, entropy) for one row, by sorting."""
    z = np.asarray(z, np.float64)
    vocab = z.shape[0]
    greedy = temperature <= 0
    x = z / (1.0 if greedy else temperature)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(vocab), np.ones(vocab, bool), 0.0
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    probs = e / e.sum()
    nonzero = probs > 0
    entropy = -np.sum(probs[nonzero] * np.log(probs[nonzero]))
    kept = np.ones(vocab, bool)
    if not greedy and 0 < top_k < vocab:
        kth_largest = np.sort(z)[::-1][top_k - 1]
        kept &= z >= kth_largest
    if not greedy and top_p < 1.0:
        kept_mass = probs[kept].sum()
        for value in np.unique(z[kept])[::-1]:  # descending tie groups
            if probs[kept & (z >= value)].sum() >= top_p * kept_mass:
                kept &= z >= value
                break
    return probs, kept, entropy


def logprob_numpy(z, temperature, kept, token):
    """float64 log-prob of ``token`` under softmax(z/T) renormalised over ``kept``."""
    if temperature <= 0:
        return 0.0
    x = np.asarray(z, np.float64) / temperature
    kept_x = x[kept & np.isfinite(x)]
    top = kept_x.max()
    return x[token] - (top + np.log(np.sum(np.exp(kept_x - top))))


def mixed_rows(rng, vocab, num_rows):
    """Random logits plus per-row controls covering every sampling mode."""
    z = rng.normal(size=(num_rows, vocab)).astype(np.float32) * 3.0
    z[2] = np.round(z[2])  # many exact ties (top-k/top-p thresholds land inside tie groups)
    z[3, rng.choice(vocab, vocab // 3, replace=False)] = NEG_INF
    z[5, 1:] = NEG_INF  # a single finite entry
    z[7, :] = NEG_INF  # nothing to sample
    settings = [  # (temperature, top_k, top_p)
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (1.3, 7, 0.8),
        (1.0, 0, 0.6),
        (0.9, 1, 1.0),
        (1.0, 20, 0.9),
        (1e-4, 0, 1.0),
        (0.0, 5, 0.5),
    ]
    settings = (settings * (num_rows // len(settings) + 1))[:num_rows]
    temperature, top_k, top_p = (np.array(col) for col in zip(*settings))
    return (
        z,
        temperature.astype(np.float32),
        top_k.astype(np.int32),
        top_p.astype(np.float32),
    )


def run_both(z, key_data, temperature, top_k, top_p, **kernel_options):
    ref = jax.block_until_ready(
        sample_tokens(z, key_data, temperature, top_k, top_p, impl="reference")
    )
    ker = jax.block_until_ready(
        sample_tokens(z, key_data, temperature, top_k, top_p, impl="pallas", **kernel_options)
    )
    return [np.asarray(a) for a in ref], [np.asarray(a) for a in ker]


def check_against_numpy(z, temperature, top_k, top_p, tokens, logprobs, entropies, atol):
    for row in range(z.shape[0]):
        zr = np.asarray(z[row], np.float64)
        _, kept, entropy = expected_numpy(zr, temperature[row], top_k[row], top_p[row])
        np.testing.assert_allclose(entropies[row], entropy, rtol=1e-5, atol=atol)
        if not np.isfinite(zr).any():
            assert (tokens[row], logprobs[row]) == (0, 0.0)
            continue
        token = tokens[row]
        assert kept[token], f"row {row}: token {token} outside the kept set"
        if temperature[row] <= 0:
            assert token == np.argmax(zr)
        expected = logprob_numpy(zr, temperature[row], kept, token)
        np.testing.assert_allclose(logprobs[row], expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    "kernel_options",
    [dict(block_v=256), dict(block_v=256, block_rows=4), dict(block_v=128, pad_vocab=True)],
    ids=["masked-tail", "4-rows-per-program", "padded-vocab"],
)
def test_kernel_matches_reference_mixed_rows(kernel_options):
    rng = np.random.default_rng(0)
    z, temperature, top_k, top_p = mixed_rows(rng, vocab=1000, num_rows=10)
    key_data = make_key_data(jax.random.key(3), 17)
    (rt, rl, re), (kt, kl, ke) = run_both(z, key_data, temperature, top_k, top_p, **kernel_options)
    np.testing.assert_array_equal(kt, rt)
    np.testing.assert_allclose(kl, rl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ke, re, rtol=1e-5, atol=1e-5)
    assert np.isfinite(kl).all() and np.isfinite(ke).all()
    check_against_numpy(z, temperature, top_k, top_p, kt, kl, ke, atol=1e-5)


def test_kernel_matches_reference_full_qwen_vocab():
    vocab = 151_936  # not a multiple of the 2048 tile
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, vocab)).astype(np.float32) * 4.0
    z[1, ::7] = NEG_INF
    temperature = np.array([1.0, 0.6, 0.0], np.float32)
    top_k = np.array([0, 40, 0], np.int32)
    top_p = np.array([0.95, 0.9, 1.0], np.float32)
    key_data = make_key_data(jax.random.key(0), 3)
    (rt, rl, re), (kt, kl, ke) = run_both(z, key_data, temperature, top_k, top_p)
    np.testing.assert_array_equal(kt, rt)
    np.testing.assert_allclose(kl, rl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ke, re, rtol=1e-5, atol=1e-5)
    check_against_numpy(z, temperature, top_k, top_p, kt, kl, ke, atol=1e-4)


def test_kernel_matches_reference_bf16():
    rng = np.random.default_rng(2)
    z, temperature, top_k, top_p = mixed_rows(rng, vocab=700, num_rows=8)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    key_data = make_key_data(jax.random.key(5), 0)
    (rt, rl, re), (kt, kl, ke) = run_both(z_bf16, key_data, temperature, top_k, top_p, block_v=128)
    np.testing.assert_array_equal(kt, rt)
    np.testing.assert_allclose(kl, rl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ke, re, rtol=1e-5, atol=1e-5)
    z_exact = np.asarray(z_bf16.astype(jnp.float32))
    check_against_numpy(z_exact, temperature, top_k, top_p, kt, kl, ke, atol=1e-5)


def test_greedy_and_near_zero_temperature():
    z = np.array([[0.5, 2.0, 2.0, -1.0, NEG_INF, 1.9]] * 3, np.float32)
    temperature = np.array([0.0, 1e-4, 0.0], np.float32)
    top_k = np.array([0, 0, 1], np.int32)
    top_p = np.array([1.0, 1.0, 0.1], np.float32)
    key_data = make_key_data(jax.random.key(9), 0)
    for impl in ("reference", "pallas"):
        tokens, logprobs, entropies = (
            np.asarray(a) for a in sample_tokens(z, key_data, temperature, top_k, top_p, impl=impl)
        )
        np.testing.assert_array_equal(tokens[[0, 2]], [1, 1])  # lowest index of the tied maxima
        assert tokens[1] in (1, 2)  # T = 1e-4 samples between the two tied maxima
        np.testing.assert_array_equal(logprobs[[0, 2]], [0.0, 0.0])
        # T = 1e-4: two tied maxima share the mass -> log(1/2).
        np.testing.assert_allclose(logprobs[1], np.log(0.5), atol=1e-6)
        _, _, entropy_t1 = expected_numpy(z[0], 1.0, 0, 1.0)
        np.testing.assert_allclose(entropies[[0, 2]], [entropy_t1] * 2, rtol=1e-6)
        np.testing.assert_allclose(entropies[1], np.log(2.0), atol=1e-6)


def test_same_key_same_tokens_different_key_different_tokens():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(64, 500)).astype(np.float32)
    ones, zeros_k = np.ones(64, np.float32), np.zeros(64, np.int32)
    key = jax.random.key(11)

    def draw(key_data):
        return np.asarray(sample_tokens(z, key_data, ones, zeros_k, ones, impl="reference")[0])

    first = draw(make_key_data(key, 0))
    np.testing.assert_array_equal(first, draw(make_key_data(key, 0)))
    other_step = draw(make_key_data(key, 1))
    other_key = draw(make_key_data(jax.random.key(12), 0))
    # With ~500 near-uniform choices, two independent draws agree on a row ~0.3% of the time.
    assert np.mean(first != other_step) > 0.9
    assert np.mean(first != other_key) > 0.9
    # Rows with identical logits still draw independently (the row index is hashed in).
    same_rows = np.broadcast_to(z[:1], z.shape)
    tokens = np.asarray(
        sample_tokens(same_rows, make_key_data(key, 0), ones, zeros_k, ones, impl="reference")[0]
    )
    assert len(np.unique(tokens)) > 40


def test_key_data_shapes_and_noise_range():
    key_data = make_key_data(jax.random.key(0), 5)
    assert key_data.shape == (2,) and key_data.dtype == jnp.uint32
    raw_key = jax.random.PRNGKey(0)  # legacy uint32 [2] key
    np.testing.assert_array_equal(make_key_data(raw_key, 5), key_data)
    noise = np.asarray(gumbel_noise(key_data, 4, 4096))
    assert np.isfinite(noise).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(noise.mean() - 0.5772) < 0.03 and abs(noise.var() - np.pi**2 / 6) < 0.08
    per_row = jnp.broadcast_to(key_data, (4, 2))
    np.testing.assert_array_equal(gumbel_noise(per_row, 4, 64), noise[:, :64])
    with pytest.raises(ValueError):
        gumbel_noise(jnp.zeros((3, 2), jnp.uint32), 4, 8)


def test_shifted_key_data_draws_the_later_rows_noise():
    """shift_rows(key data, 3) makes rows 0..1 draw rows 3..4 of the unshifted noise (shared
    and per-row key data, scalar and per-row offsets)."""
    from jaxrl.kernels.noise import shift_rows

    key_data = make_key_data(jax.random.key(1), 7)
    whole = np.asarray(gumbel_noise(key_data, 6, 64))
    np.testing.assert_array_equal(gumbel_noise(shift_rows(key_data, 3), 2, 64), whole[3:5])
    per_row = jax.random.bits(jax.random.key(2), (6, 2), jnp.uint32)
    whole = np.asarray(gumbel_noise(per_row, 6, 64))
    moved = shift_rows(per_row[jnp.array([4, 1])], jnp.array([4, 0]))
    np.testing.assert_array_equal(gumbel_noise(moved, 2, 64), whole[jnp.array([4, 1])])


CHI_SQUARE_LOGITS = np.log(
    np.array([0.22, 0.16, 0.13, 0.11, 0.09, 0.08, 0.07, 0.05, 0.04, 0.03, 0.015, 0.005])
).astype(np.float32)


def sampled_counts(temperature, top_k, top_p, draws=40_000, seed=0):
    """Token counts from ``draws`` rows of the same logits, each row with its own key words."""
    vocab = CHI_SQUARE_LOGITS.shape[0]
    z = np.broadcast_to(CHI_SQUARE_LOGITS, (draws, vocab))
    key_data = jax.random.bits(jax.random.key(seed), (draws, 2), jnp.uint32)
    tokens, logprobs, _ = sample_tokens_reference(
        jnp.asarray(z),
        key_data,
        jnp.full((draws,), temperature, jnp.float32),
        jnp.full((draws,), top_k, jnp.int32),
        jnp.full((draws,), top_p, jnp.float32),
    )
    return np.bincount(np.asarray(tokens), minlength=vocab), np.asarray(tokens), np.asarray(logprobs)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept_tokens",
    [(0.8, 0, 1.0, 12), (1.0, 4, 1.0, 4), (1.0, 0, 0.7, 5), (1.5, 6, 0.8, 5)],
    ids=["softmax-T0.8", "top-k4", "top-p0.7", "top-k6-then-top-p0.8"],
)
def test_sampled_frequencies_match_distribution(temperature, top_k, top_p, kept_tokens):
    probs, kept, _ = expected_numpy(CHI_SQUARE_LOGITS, temperature, top_k, top_p)
    assert kept.sum() == kept_tokens  # the numpy oracle agrees with the hand-computed support
    counts, tokens, logprobs = sampled_counts(temperature, top_k, top_p)
    assert counts[~kept].sum() == 0, "sampled a token outside the top-k/top-p set"
    target = probs[kept] / probs[kept].sum()
    observed = counts[kept]
    result = stats.chisquare(observed, target * observed.sum())
    assert result.pvalue > 1e-3, (observed, target * observed.sum(), result)
    # The reported log-prob is that of the renormalised distribution actually sampled.
    renormalised = np.where(kept, probs / probs[kept].sum(), 0.0)
    np.testing.assert_allclose(logprobs, np.log(renormalised[tokens]), atol=1e-5)


def test_chi_square_detects_a_wrong_distribution():
    """Guards the goodness-of-fit test itself: T=0.8 samples rejected against T=1."""
    counts, _, _ = sampled_counts(0.8, 0, 1.0)
    probs_t1, _, _ = expected_numpy(CHI_SQUARE_LOGITS, 1.0, 0, 1.0)
    assert stats.chisquare(counts, probs_t1 * counts.sum()).pvalue < 1e-6


def test_top_k_keeps_every_tie_at_the_threshold():
    z = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], np.float32)
    draws = 3000
    zs = np.broadcast_to(z, (draws, 6))
    key_data = jax.random.bits(jax.random.key(1), (draws, 2), jnp.uint32)
    tokens, logprobs, _ = sample_tokens_reference(
        jnp.asarray(zs),
        key_data,
        jnp.ones((draws,), jnp.float32),
        jnp.full((draws,), 2, jnp.int32),
        jnp.ones((draws,), jnp.float32),
    )
    assert set(np.unique(np.asarray(tokens))) == {0, 1, 2, 3}
    small = sample_tokens(
        z, make_key_data(jax.random.key(0), 0), np.ones(1, np.float32),
        np.full(1, 2, np.int32), np.ones(1, np.float32), impl="pallas", block_v=8,
    )
    assert int(small[0][0]) in (0, 1, 2, 3)
    kept_norm = np.log(np.exp(3.0) + 3 * np.exp(2.0))
    np.testing.assert_allclose(float(small[1][0]), z[0, int(small[0][0])] - kept_norm, atol=1e-6)


@pytest.mark.parametrize(
    "platform, pad_vocab, block_rows",
    [("cuda", False, 1), ("cuda", False, 2), ("tpu", True, 8)],
    ids=["triton-1-row", "triton-2-rows", "mosaic-tpu-8-rows"],
)
def test_kernel_lowers_for_gpu_and_tpu(platform, pad_vocab, block_rows):
    """Cross-lowers (no accelerator needed) through Pallas' Triton / Mosaic TPU lowering, which
    enforces their block-shape rules; compiling the lowered kernel needs the real device."""
    import functools

    from jaxrl.kernels.sampling import _sample_tokens_pallas

    rows, vocab = 8, 5000  # vocab not a multiple of the tile
    args = (
        jnp.zeros((rows, vocab), jnp.bfloat16),
        jnp.zeros((2,), jnp.uint32),
        jnp.ones(rows),
        jnp.zeros(rows, jnp.int32),
        jnp.ones(rows),
    )
    kernel = functools.partial(
        _sample_tokens_pallas, block_v=1024, block_rows=block_rows, pad_vocab=pad_vocab,
        interpret=False,
    )
    lowered = jax.jit(kernel).trace(*args).lower(lowering_platforms=(platform,))
    assert "fused_sampler" in lowered.as_text()
