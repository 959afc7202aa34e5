"""The Numba backend's vectorisable ``exp`` and ``sigmoid``, float64 and float32, against libm."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba is not installed: pip install 'fastgrad[numba]'")

from fastgrad.backends.numba.vector_math import (  # noqa: E402
    exp_nonpositive,
    exp_nonpositive_32,
    sigmoid,
    sigmoid_32,
    sigmoid_in_own_precision,
)

pytestmark = pytest.mark.jit


def _over_array(scalar_function):
    """A compiled loop applying ``scalar_function`` to each element: ``apply(x, out)``."""

    @numba.njit(error_model="numpy")
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = scalar_function(x[i])

    return apply


_exp_all = _over_array(exp_nonpositive)
_sigmoid_all = _over_array(sigmoid)
_exp_32_all = _over_array(exp_nonpositive_32)
_sigmoid_32_all = _over_array(sigmoid_32)
_own_precision_all = _over_array(sigmoid_in_own_precision)


def _ulps(got, expected):
    return np.abs(got - expected) / np.spacing(np.abs(expected))


def test_exp_is_within_one_ulp_of_libm_over_the_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [-rng.random(200_000) * 746, -rng.random(100_000) * 2, np.linspace(-745.2, 0, 100_001)]
    )
    got = np.empty_like(x)
    _exp_all(x, got)
    expected = np.array([math.exp(v) for v in x])
    normal = expected >= np.finfo(np.float64).tiny
    assert _ulps(got[normal], expected[normal]).max() <= 1.0
    # gradual underflow: off by at most one denormal step
    assert np.abs(got[~normal] - expected[~normal]).max() <= 5e-324
    assert got[-1] == 1.0  # exp(0) exactly


def test_exp_special_values():
    x = np.array([-np.inf, -1e308, -745.2, np.nan, -0.0])
    got = np.empty_like(x)
    _exp_all(x, got)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(got[3]) and got[4] == 1.0


def test_sigmoid_matches_the_stable_form_to_a_few_ulps():
    x = np.concatenate([np.random.default_rng(1).standard_normal(100_000) * 20, [-740.0, 740.0]])
    got = np.empty_like(x)
    _sigmoid_all(x, got)
    exp_neg = np.array([math.exp(-abs(v)) for v in x])
    expected = np.where(x >= 0, 1 / (1 + exp_neg), exp_neg / (1 + exp_neg))
    assert _ulps(got, expected).max() <= 3.0
    special = np.array([np.nan, np.inf, -np.inf, 0.0])
    _sigmoid_all(special, out := np.empty(4))
    assert np.isnan(out[0]) and out[1:].tolist() == [1.0, 0.0, 0.5]


def _float32_ulps(got, expected):
    """Error in units of the float32 spacing at the float64 ``expected``."""
    return np.abs(got.astype(np.float64) - expected) / np.spacing(
        np.abs(expected).astype(np.float32)
    ).astype(np.float64)


def test_float32_exp_is_within_two_ulp_down_to_underflow():
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [-rng.random(300_000) * 104, -rng.random(100_000) * 2, np.linspace(-104, 0, 100_001)]
    ).astype(np.float32)
    got = np.empty_like(x)
    _exp_32_all(x, got)
    assert got.dtype == np.float32
    expected = np.exp(x.astype(np.float64))
    normal = expected >= np.finfo(np.float32).tiny
    assert _float32_ulps(got[normal], expected[normal]).max() <= 2.0
    # gradual underflow: off by at most one float32 denormal step
    denormal_step = float(np.finfo(np.float32).smallest_subnormal)
    assert np.abs(got[~normal] - expected[~normal]).max() <= denormal_step
    specials = np.array([-np.inf, -1e30, np.nan, -0.0], np.float32)
    _exp_32_all(specials, out := np.empty(4, np.float32))
    assert out[:2].tolist() == [0.0, 0.0] and np.isnan(out[2]) and out[3] == 1.0


def test_float32_sigmoid_is_within_three_ulp():
    x = (np.random.default_rng(3).standard_normal(200_000) * 20).astype(np.float32)
    got = np.empty_like(x)
    _sigmoid_32_all(x, got)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert _float32_ulps(got, exact).max() <= 3.0
    special = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    _sigmoid_32_all(special, out := np.empty(4, np.float32))
    assert np.isnan(out[0]) and out[1:].tolist() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_in_own_precision_picks_by_dtype(dtype):
    x = np.linspace(-30, 30, 1001).astype(dtype)
    got = np.empty_like(x)
    _own_precision_all(x, got)
    reference = np.empty_like(x)
    (_sigmoid_32_all if dtype == np.float32 else _sigmoid_all)(x, reference)
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("module_name", ["vector_math", "simd"])
def test_docstring_examples(module_name):
    module = importlib.import_module(f"fastgrad.backends.numba.{module_name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
