"""Forking-token masks against a sort-based float64 numpy reference and hand-worked cases."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxrl.rl.token_masks import forking_token_mask, selected_count


def np_top_mask(entropy, valid, rho, truncated=None, include_truncated=True):
    """Reference by sorting: (−entropy, flattened index) lexicographically."""
    entropy = entropy.astype(np.float64)
    population = valid.copy()
    if truncated is not None and not include_truncated:
        population &= ~truncated[:, None]
    flat_e, flat_pop = entropy.ravel(), population.ravel()
    n = int(flat_pop.sum())
    k = int(math.ceil(round(rho * n, 9)))
    idx = np.flatnonzero(flat_pop)
    order = idx[np.lexsort((idx, -flat_e[idx]))]
    select = np.zeros(flat_e.shape, bool)
    select[order[:k]] = True
    tau = flat_e[order[k - 1]] if k > 0 else np.inf
    select = select.reshape(entropy.shape)
    select |= valid & ~population & (entropy >= tau)
    return select, tau


def _random_case(seed, b, t, tie_heavy):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = t  # at least one full row
    valid = np.arange(t)[None, :] < lengths[:, None]
    if tie_heavy:  # most entropies ~0 with many exact ties, as in real CoT
        entropy = np.round(rng.exponential(0.3, size=(b, t)) * (rng.random((b, t)) < 0.4), 1)
    else:
        entropy = rng.exponential(0.5, size=(b, t))
    entropy = np.where(valid, entropy, rng.normal(size=(b, t)) * 10)  # junk in padding
    return entropy.astype(np.float32), valid


_CASES = [  # (b, t, rho, tie_heavy): shapes, fractions and tie patterns spread over cases
    (1, 1, 0.2, False), (3, 7, 0.05, True), (8, 33, 0.2, True), (8, 33, 1 / 3, False),
    (16, 64, 0.2, False), (16, 64, 0.5, True), (5, 12, 1.0, True), (4, 50, 0.2, True),
]


@pytest.mark.parametrize("b,t,rho,tie_heavy", _CASES)
def test_top_and_bottom_match_sort_reference(b, t, rho, tie_heavy):
    entropy, valid = _random_case(b * 1000 + t, b, t, tie_heavy)

    @jax.jit
    def all_modes(entropy, valid):
        return [forking_token_mask(entropy, valid, rho=rho, mode=m) for m in ("top", "bottom", "all")]

    (top, tau), (bottom, _), (everything, _) = all_modes(entropy, valid)
    want, want_tau = np_top_mask(entropy, valid, rho)
    np.testing.assert_array_equal(np.asarray(top), want)
    assert float(tau) == pytest.approx(want_tau, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(bottom), valid & ~want)
    np.testing.assert_array_equal(np.asarray(everything), valid)


@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_rows_excluded_from_threshold(seed):
    entropy, valid = _random_case(seed, 6, 20, tie_heavy=False)
    truncated = np.array([True, False, True, False, False, False])
    entropy[truncated] += 5.0  # truncated rows would dominate the quantile
    top, tau = forking_token_mask(
        entropy, valid, rho=0.2, truncated=truncated, include_truncated=False)
    want, want_tau = np_top_mask(entropy, valid, 0.2, truncated, include_truncated=False)
    np.testing.assert_array_equal(np.asarray(top), want)
    assert float(tau) == pytest.approx(want_tau, abs=1e-6)
    top_incl, tau_incl = forking_token_mask(entropy, valid, rho=0.2, truncated=truncated)
    want_incl, want_tau_incl = np_top_mask(entropy, valid, 0.2)
    np.testing.assert_array_equal(np.asarray(top_incl), want_incl)
    assert float(tau_incl) > float(tau)


def test_hand_worked_example():
    # Valid tokens (row-major): 0.1 0.9 0.5 | 0.9 0.0 ; padding: 7.0 (must be ignored).
    entropy = np.array([[0.1, 0.9, 0.5], [0.9, 0.0, 7.0]], np.float32)
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    # N = 5, ρ = 0.2 → k = 1: the two 0.9s tie; the smaller flattened index (0,1) wins.
    top, tau = forking_token_mask(entropy, valid, rho=0.2)
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 0], [0, 0, 0]])
    assert float(tau) == pytest.approx(0.9)
    # ρ = 0.5 → k = ⌈2.5⌉ = 3: both 0.9s and the 0.5; τ = 0.5.
    top, tau = forking_token_mask(entropy, valid, rho=0.5)
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 1], [1, 0, 0]])
    assert float(tau) == pytest.approx(0.5)
    bottom, _ = forking_token_mask(entropy, valid, rho=0.5, mode="bottom")
    np.testing.assert_array_equal(np.asarray(bottom), [[1, 0, 0], [0, 1, 0]])


def test_edge_cases_and_key_order():
    # Empty population: nothing selected, τ = +inf.
    top, tau = forking_token_mask(np.ones((2, 3), np.float32), np.zeros((2, 3), bool))
    assert not np.asarray(top).any() and np.isinf(float(tau)) and float(tau) > 0
    # Negative values, signed zeros and NaN order correctly (NaN lowest).
    entropy = np.array([[-2.0, -0.0, 0.0, np.nan, -1.0, 3.0, 1e-30]], np.float32)
    valid = np.ones_like(entropy, bool)
    top, tau = forking_token_mask(entropy, valid, rho=4 / 7)
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 1, 0, 0, 1, 1]])
    assert float(tau) == 0.0
    top, _ = forking_token_mask(entropy, valid, rho=6 / 7)
    np.testing.assert_array_equal(np.asarray(top), [[1, 1, 1, 0, 1, 1, 1]])


def test_selected_count_is_exact():
    assert int(selected_count(10, 0.2)) == 2
    assert int(selected_count(10, 0.3)) == 3
    assert int(selected_count(11, 0.2)) == 3
    assert int(selected_count(0, 0.2)) == 0
    assert int(selected_count(7, 1.0)) == 7
    assert int(selected_count(200_000_000, 0.2)) == 40_000_000  # no int32 overflow


def test_rejects_bad_arguments():
    e, v = np.zeros((1, 2), np.float32), np.ones((1, 2), bool)
    with pytest.raises(ValueError, match="rho"):
        forking_token_mask(e, v, rho=0.0)
    with pytest.raises(ValueError, match="rho"):
        forking_token_mask(e, v, rho=1.5)
    with pytest.raises(ValueError, match="mode"):
        forking_token_mask(e, v, mode="middle")


_SHARDING_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxrl.rl.token_masks import forking_token_mask
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    entropy = np.round(rng.exponential(0.3, (16, 48)), 1).astype(np.float32)
    valid = np.arange(48)[None] < rng.integers(1, 49, 16)[:, None]
    fn = jax.jit(lambda e, v: forking_token_mask(e, v, rho=0.2))
    want = jax.device_get(fn(entropy, valid))
    devices = np.array(jax.devices())
    for shape, spec in [((8, 1), P("a", None)), ((1, 8), P(None, "b")), ((2, 4), P("a", "b"))]:
        mesh = Mesh(devices.reshape(shape), ("a", "b"))
        sharding = NamedSharding(mesh, spec)
        got = jax.device_get(fn(jax.device_put(entropy, sharding), jax.device_put(valid, sharding)))
        assert (got[0] == want[0]).all() and got[1] == want[1], spec
    print("OK", int(want[0].sum()), int(valid.sum()))
    """
)


@pytest.mark.multidevice
def test_threshold_is_identical_under_any_sharding():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
