"""Order-preserving float32 keys and the shared binary search over them."""

import jax.numpy as jnp
import numpy as np

from jaxrl.kernels.float_keys import KEY_NEG_INF, KEY_POS_INF, float_key, key_to_float, largest_key_where


def _values():
    rng = np.random.default_rng(0)
    specials = [-np.inf, -3.4e38, -1.0, -1.2e-38, -0.0, 0.0, 1.2e-38, 1.0, 3.4e38, np.inf]
    scaled = rng.normal(size=200) * 10.0 ** rng.integers(-36, 37, size=200)  # no subnormals (XLA:CPU flushes them)
    return np.concatenate([specials, scaled]).astype(np.float32)


def test_keys_preserve_order_and_invert():
    values = _values()
    keys = np.asarray(float_key(jnp.asarray(values)))
    assert keys.dtype == np.int32
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order]) >= 0)
    np.testing.assert_array_equal(keys[:-1] < keys[1:], values[:-1] < values[1:])
    assert keys.min() == KEY_NEG_INF and keys.max() == KEY_POS_INF
    back = np.asarray(key_to_float(jnp.asarray(keys)))
    np.testing.assert_array_equal(back, np.where(values == 0, np.float32(0), values))
    assert float_key(jnp.float32(-0.0)) == float_key(jnp.float32(0.0))


def test_largest_key_where_finds_the_kth_largest():
    values = _values()
    keys = float_key(jnp.asarray(values))
    for k in (1, 7, values.size):
        found = largest_key_where(lambda u: jnp.sum(keys >= u) >= k, jnp.bool_(True))
        assert float(key_to_float(found)) == np.sort(values)[::-1][k - 1]
    inactive = largest_key_where(lambda u: u <= 0, jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(inactive), [0, KEY_NEG_INF])
