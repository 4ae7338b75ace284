"""Paged decode attention: the jnp reference and the Pallas kernel (interpret mode) against a
float64 NumPy attention over each row's logical slots, plus a Triton cross-lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.kernels.paged_attention import _paged_attention_pallas, paged_attention

PAGE, HEADS, KV_HEADS, HEAD_DIM, POOL = 16, 4, 2, 32, 12


def _numpy_attention(q, k_pages, v_pages, tables, starts, ends):
    """float64 attention, row by row, over logical slots [start, end) read through the table."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    out = np.zeros_like(q)
    group = HEADS // KV_HEADS
    for b in range(q.shape[0]):
        slots = np.arange(starts[b], ends[b])
        if slots.size == 0:
            continue
        k = k_pages[tables[b, slots // PAGE], slots % PAGE]  # [n, KVH, hd]
        v = v_pages[tables[b, slots // PAGE], slots % PAGE]
        for h in range(HEADS):
            scores = k[:, h // group] @ q[b, h] / np.sqrt(HEAD_DIM)
            p = np.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ v[:, h // group]
    return out


def _case(seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((5, HEADS, HEAD_DIM)).astype(np.float32)
    k_pages = rng.standard_normal((POOL, PAGE, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v_pages = rng.standard_normal((POOL, PAGE, KV_HEADS, HEAD_DIM)).astype(np.float32)
    # Rows share page 3 (a shared prompt page) and own others; row 3 is empty, row 4 starts
    # mid-page (a right-aligned prompt) and ends exactly on a page boundary.
    tables = np.array([[3, 5, 7, 0], [3, 6, 0, 0], [1, 2, 4, 8], [9, 9, 9, 9], [10, 11, 0, 0]], np.int32)
    starts = np.array([5, 5, 0, 0, 9], np.int32)
    ends = np.array([40, 17, 64, 0, 32], np.int32)
    return q, k_pages, v_pages, tables, starts, ends


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_paged_attention_matches_float64_numpy(impl):
    args = _case(0)
    want = _numpy_attention(*args)
    got = np.asarray(paged_attention(*map(jnp.asarray, args), impl=impl))
    # float32 scores over <= 64 slots of unit-normal dot products of length 32: ~1e-6 relative.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert np.all(got[3] == 0.0)  # a row with nothing to attend to gives zeros, not NaN


def test_pallas_ignores_pages_outside_the_range():
    """Pages past ``end`` (and garbage in them) never change the kernel's output."""
    q, k_pages, v_pages, tables, starts, ends = _case(1)
    base = paged_attention(*map(jnp.asarray, (q, k_pages, v_pages, tables, starts, ends)), impl="pallas")
    k_pages = k_pages.copy()
    k_pages[0] = np.nan  # page 0 only appears in table entries past the rows' ends
    again = paged_attention(*map(jnp.asarray, (q, k_pages, v_pages, tables, starts, ends)), impl="pallas")
    np.testing.assert_array_equal(np.asarray(base), np.asarray(again))


def test_paged_kernel_lowers_to_triton():
    """Cross-lowers for CUDA (no GPU needed); compiling it needs the real device."""
    args = tuple(jnp.asarray(x) for x in _case(2))
    kernel = functools.partial(_paged_attention_pallas, scale=0.1, interpret=False)
    lowered = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",))
    assert "paged_attention" in lowered.as_text()


def test_bad_shapes_name_the_argument():
    q, k_pages, v_pages, tables, starts, ends = map(jnp.asarray, _case(3))
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, k_pages, v_pages, tables[:2], starts, ends, impl="reference")
    with pytest.raises(ValueError, match="page size"):
        paged_attention(q, k_pages[:, :8], v_pages[:, :8], tables, starts, ends, impl="pallas")
