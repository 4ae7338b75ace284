"""Forking-token masks against float64 numpy references (numpy.quantile for the default rule,
a sort for the count rule) and hand-worked cases."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxrl.rl.token_masks import forking_token_mask, selected_count


def np_quantile_mask(entropy, valid, rho, truncated=None, include_truncated=True):
    """The paper's / TRL's rule in float64 NumPy: τ = numpy.quantile(population, 1 − ρ) with
    linear interpolation (= torch.quantile's default, TRL ``get_high_entropy_mask``), keep every
    valid token with H ≥ τ."""
    entropy = entropy.astype(np.float64)
    population = valid.copy()
    if truncated is not None and not include_truncated:
        population &= ~truncated[:, None]
    if not population.any():
        return np.zeros_like(valid), np.inf
    tau = np.quantile(entropy[population], 1.0 - rho, method="linear")
    return valid & (entropy >= tau), tau


def np_count_mask(entropy, valid, rho, truncated=None, include_truncated=True):
    """The "count" rule by sorting: ⌈ρN⌉ tokens in (−entropy, flattened index) order."""
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


_REFERENCES = {"quantile": np_quantile_mask, "count": np_count_mask}


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


@pytest.mark.parametrize("rule", ["quantile", "count"])
@pytest.mark.parametrize("b,t,rho,tie_heavy", _CASES)
def test_top_and_bottom_match_reference(b, t, rho, tie_heavy, rule):
    entropy, valid = _random_case(b * 1000 + t, b, t, tie_heavy)

    @jax.jit
    def all_modes(entropy, valid):
        return [forking_token_mask(entropy, valid, rho=rho, mode=m, rule=rule) for m in ("top", "bottom", "all")]

    (top, tau), (bottom, _), (everything, _) = all_modes(entropy, valid)
    want, want_tau = _REFERENCES[rule](entropy, valid, rho)
    np.testing.assert_array_equal(np.asarray(top), want)
    # τ interpolates float32 order statistics in float32: within a few ulps of the float64 τ.
    assert float(tau) == pytest.approx(want_tau, rel=1e-6, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(bottom), valid & ~want)
    np.testing.assert_array_equal(np.asarray(everything), valid)


@pytest.mark.parametrize("rule", ["quantile", "count"])
@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_rows_excluded_from_threshold(seed, rule):
    entropy, valid = _random_case(seed, 6, 20, tie_heavy=False)
    truncated = np.array([True, False, True, False, False, False])
    entropy[truncated] += 5.0  # truncated rows would dominate the quantile
    top, tau = forking_token_mask(
        entropy, valid, rho=0.2, truncated=truncated, include_truncated=False, rule=rule)
    want, want_tau = _REFERENCES[rule](entropy, valid, 0.2, truncated, include_truncated=False)
    np.testing.assert_array_equal(np.asarray(top), want)
    assert float(tau) == pytest.approx(want_tau, rel=1e-6, abs=1e-6)
    top_incl, tau_incl = forking_token_mask(entropy, valid, rho=0.2, truncated=truncated, rule=rule)
    want_incl, _ = _REFERENCES[rule](entropy, valid, 0.2)
    np.testing.assert_array_equal(np.asarray(top_incl), want_incl)
    assert float(tau_incl) > float(tau)


def test_quantile_rule_for_every_population_size_up_to_400():
    """Distinct entropies, N = 1..400, ρ = 0.3: the default rule keeps exactly the tokens with
    H ≥ numpy.quantile(H, 0.7) (TRL); the count rule keeps ⌈0.3N⌉, which differs for some N."""
    rng = np.random.default_rng(3)
    entropy = rng.permutation(np.arange(1, 401)).astype(np.float32)[None] / 37.0
    fn = jax.jit(lambda v: forking_token_mask(entropy, v, rho=0.3)[0])
    differ = 0
    for n in range(1, 401):
        valid = np.arange(400)[None] < n
        want, _ = np_quantile_mask(entropy, valid, 0.3)
        got = np.asarray(fn(valid))
        np.testing.assert_array_equal(got, want, err_msg=f"N={n}")
        differ += int(got.sum()) != math.ceil(round(0.3 * n, 9))
    assert differ > 0  # the two rules really are different rules


def test_quantile_hand_worked_ties_and_edges():
    # Population 0.9 0.9 0.5 0.1 0.0 (N = 5). ρ = 0.2: position 0.8·4 = 3.2 of the sorted
    # [0, 0.1, 0.5, 0.9, 0.9] → τ = 0.9, and both tied 0.9s are kept (count would keep one).
    entropy = np.array([[0.9, 0.1, 0.9], [0.5, 0.0, 7.0]], np.float32)
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    top, tau = forking_token_mask(entropy, valid, rho=0.2)
    np.testing.assert_array_equal(np.asarray(top), [[1, 0, 1], [0, 0, 0]])
    assert float(tau) == pytest.approx(0.9)
    top, _ = forking_token_mask(entropy, valid, rho=0.2, rule="count")
    np.testing.assert_array_equal(np.asarray(top), [[1, 0, 0], [0, 0, 0]])
    # ρ = 0.5: position 2 → τ = 0.5 exactly: 0.9, 0.9, 0.5 kept.
    top, tau = forking_token_mask(entropy, valid, rho=0.5)
    np.testing.assert_array_equal(np.asarray(top), [[1, 0, 1], [1, 0, 0]])
    assert float(tau) == pytest.approx(0.5)
    # ρ = 0.3: position 2.8 → τ = 0.5 + 0.8·0.4 = 0.82: only the 0.9s.
    top, tau = forking_token_mask(entropy, valid, rho=0.3)
    np.testing.assert_array_equal(np.asarray(top), [[1, 0, 1], [0, 0, 0]])
    assert float(tau) == pytest.approx(0.82, abs=1e-6)
    # TRL edge cases: ρ = 1 keeps every valid token (τ = min); ρ → 0 keeps the maximum
    # (with its ties: τ = max).
    top, tau = forking_token_mask(entropy, valid, rho=1.0)
    np.testing.assert_array_equal(np.asarray(top), valid)
    assert float(tau) == 0.0
    top, tau = forking_token_mask(entropy, valid, rho=1e-4)
    np.testing.assert_array_equal(np.asarray(top), [[1, 0, 1], [0, 0, 0]])
    assert float(tau) == pytest.approx(0.9)


def test_count_rule_hand_worked_example():
    # Valid tokens (row-major): 0.1 0.9 0.5 | 0.9 0.0 ; padding: 7.0 (must be ignored).
    entropy = np.array([[0.1, 0.9, 0.5], [0.9, 0.0, 7.0]], np.float32)
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    # N = 5, ρ = 0.2 → k = 1: the two 0.9s tie; the smaller flattened index (0,1) wins.
    top, tau = forking_token_mask(entropy, valid, rho=0.2, rule="count")
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 0], [0, 0, 0]])
    assert float(tau) == pytest.approx(0.9)
    # ρ = 0.5 → k = ⌈2.5⌉ = 3: both 0.9s and the 0.5; τ = 0.5.
    top, tau = forking_token_mask(entropy, valid, rho=0.5, rule="count")
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 1], [1, 0, 0]])
    assert float(tau) == pytest.approx(0.5)
    bottom, _ = forking_token_mask(entropy, valid, rho=0.5, mode="bottom", rule="count")
    np.testing.assert_array_equal(np.asarray(bottom), [[1, 0, 0], [0, 1, 0]])


def test_edge_cases_and_key_order():
    # Empty population: nothing selected, τ = +inf.
    top, tau = forking_token_mask(np.ones((2, 3), np.float32), np.zeros((2, 3), bool))
    assert not np.asarray(top).any() and np.isinf(float(tau)) and float(tau) > 0
    # Negative values, signed zeros and NaN order correctly (NaN lowest).
    entropy = np.array([[-2.0, -0.0, 0.0, np.nan, -1.0, 3.0, 1e-30]], np.float32)
    valid = np.ones_like(entropy, bool)
    top, tau = forking_token_mask(entropy, valid, rho=4 / 7, rule="count")
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 1, 0, 0, 1, 1]])
    assert float(tau) == 0.0
    top, _ = forking_token_mask(entropy, valid, rho=6 / 7, rule="count")
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
    with pytest.raises(ValueError, match="rule"):
        forking_token_mask(e, v, rule="sort")


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
