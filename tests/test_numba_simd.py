"""The vector-block row kernels of the Numba backend against plain scalar loops.

``gather_rows`` and ``scatter_rows`` promise the arithmetic order of the
loops they replace, so they are compared bitwise, over row widths that
exercise every block kind (32-wide pairs, 32, 16, the masked remainder of
a gather and the single columns of a scatter) and row lengths around the
groups of four.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba is not installed: pip install 'fastgrad[numba]'")

from fastgrad.backends.numba.simd import gather_rows, scatter_rows  # noqa: E402

pytestmark = pytest.mark.jit

HIDDEN_SIZES = [1, 2, 3, 7, 15, 31, 50, 63, 100]
DTYPES = [np.float32, np.float64]


def _plain_gather(W, row, cols, vals, first, last):
    """The scalar loop ``gather_rows`` replaces: groups of four summed in pairs, then singles."""
    k = first
    while k + 4 <= last:
        for j in range(W.shape[1]):
            pair_01 = vals[k] * W[cols[k], j] + vals[k + 1] * W[cols[k + 1], j]
            pair_23 = vals[k + 2] * W[cols[k + 2], j] + vals[k + 3] * W[cols[k + 3], j]
            row[j] += pair_01 + pair_23
        k += 4
    while k < last:
        for j in range(W.shape[1]):
            row[j] += vals[k] * W[cols[k], j]
        k += 1


def _plain_scatter(W, d, cols, vals, first, last, lr):
    rate = W.dtype.type(lr)
    for k in range(first, last):
        for j in range(W.shape[1]):
            W[cols[k], j] -= (rate * vals[k]) * d[j]


def _sparse_row(rng, features, count, dtype):
    cols = np.sort(rng.choice(features, size=count, replace=False)).astype(np.int32)
    return cols, rng.standard_normal(count).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("count", [0, 1, 4, 7, 30])
def test_gather_rows_is_bitwise_the_plain_loop(dtype, hidden, count):
    rng = np.random.default_rng(hidden * 100 + count)
    W = rng.standard_normal((40, hidden)).astype(dtype)
    cols, vals = _sparse_row(rng, 40, count, dtype)
    start = rng.standard_normal(hidden).astype(dtype)
    expected, got = start.copy(), start.copy()
    # a sub-range of the listed inputs, as the kernels pass one CSR row
    first, last = min(1, count), count
    _plain_gather(W, expected, cols, vals, first, last)
    gather_rows(W, got, cols, vals, first, last)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    dense = np.zeros(40, np.float64)
    dense[cols[first:last]] = vals[first:last]
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, start + dense @ W.astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_dense_gather_writes_only_its_row(dtype, hidden):
    # the row is a slice of a longer buffer and W's last row ends its own:
    # a block running past the end of a row must neither write nor add there
    rng = np.random.default_rng(hidden)
    W = rng.standard_normal((13, hidden)).astype(dtype)
    buffer = np.full(hidden + 40, 7.0, dtype)
    vals = rng.standard_normal(13).astype(dtype)
    expected = buffer[:hidden].copy()
    _plain_gather(W, expected, np.arange(13), vals, 0, 13)
    gather_rows(W, buffer[:hidden], None, vals, 0, 13)
    np.testing.assert_array_equal(buffer[:hidden], expected)
    np.testing.assert_array_equal(buffer[hidden:], 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("count", [0, 1, 5, 30])
def test_scatter_rows_is_bitwise_the_plain_loop(dtype, hidden, count):
    rng = np.random.default_rng(hidden * 100 + count + 1)
    W = rng.standard_normal((40, hidden)).astype(dtype)
    d = rng.standard_normal(hidden).astype(dtype)
    cols, vals = _sparse_row(rng, 40, count, dtype)
    expected, got = W.copy(), W.copy()
    _plain_scatter(expected, d, cols, vals, 0, count, 0.1)
    scatter_rows(got, d, cols, vals, 0, count, 0.1)
    np.testing.assert_array_equal(got, expected)
    untouched = np.setdiff1d(np.arange(40), cols)
    np.testing.assert_array_equal(got[untouched], W[untouched])


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="NUMBA_DISABLE_JIT=1: no typing")
def test_mixed_dtypes_are_refused_when_compiled():
    W = np.ones((3, 4))
    with pytest.raises(numba.core.errors.TypingError, match="share one float dtype"):
        gather_rows(W, np.zeros(4, np.float32), np.zeros(1, np.int32), np.ones(1), 0, 1)
    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous"):
        gather_rows(W, np.ones(8)[::2], np.zeros(1, np.int32), np.ones(1), 0, 1)
    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous"):
        scatter_rows(W, np.ones(8)[::2], np.zeros(1, np.int32), np.ones(1), 0, 1, 0.1)
