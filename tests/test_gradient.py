"""The black-box numerical gradient's contract, and properties on random shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastgrad
from fastgrad.errors import PrecisionWarning
from tests import naive

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
values = st.floats(-3, 3, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float64, shapes, elements=values))
def test_matches_the_books_loop_on_any_shape(x):
    weights = np.linspace(-1.0, 2.0, x.size).reshape(x.shape)

    def f(a):
        return float(np.sum(weights * np.sin(a)) + np.sum(a**2))

    expected = naive.numerical_gradient(f, x.copy())
    got = fastgrad.numerical_gradient(f, x)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, weights * np.cos(x) + 2 * x, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float64, shapes, elements=values))
def test_batched_equals_unbatched(x):
    def f(a):
        return float(np.sum(np.exp(a) * 0.5))

    def f_stack(stack):
        return np.sum(np.exp(stack) * 0.5, axis=tuple(range(1, stack.ndim)))

    unbatched = fastgrad.numerical_gradient(f, x.copy())
    batched = fastgrad.numerical_gradient(f_stack, x, batched=True, chunk_size=3)
    np.testing.assert_allclose(batched, unbatched, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    logits=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
        elements=st.floats(-50, 50, allow_nan=False),
    )
)
def test_loss_properties(logits):
    labels = np.arange(logits.shape[0]) % logits.shape[1]
    onehot = np.eye(logits.shape[1])[labels]
    exact = fastgrad.softmax_cross_entropy(logits, labels)
    assert exact >= 0
    assert exact == pytest.approx(
        fastgrad.softmax_cross_entropy(logits, onehot), rel=1e-12, abs=1e-12
    )
    assert exact == pytest.approx(
        naive.log_softmax_cross_entropy(logits, labels), rel=1e-9, abs=1e-12
    )
    probabilities = fastgrad.softmax(logits)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    book = fastgrad.cross_entropy_error(probabilities, labels)
    assert book <= exact + 1e-12  # the +1e-7 guard only ever lowers the loss
    # log(p + 1e-7) - log(p) = log1p(1e-7 / p) <= 1e-7 / p, sample by sample
    picked = probabilities[np.arange(len(labels)), labels]
    assert exact - book <= np.mean(1e-7 / picked) * (1 + 1e-9) + 1e-12
    assert fastgrad.mean_squared_error(probabilities, onehot) >= 0


def test_forward_difference_has_first_order_error():
    f = lambda a: float(np.sum(a**3))  # noqa: E731
    x = np.array([2.0])
    forward = fastgrad.numerical_gradient(f, x, method="forward")
    central = fastgrad.numerical_gradient(f, x, method="central")
    assert abs(central[0] - 12.0) < 1e-7
    assert 1e-4 < abs(forward[0] - 12.0) < 1e-2  # 3·x·h ≈ 6e-4


def test_perturbs_in_place_so_closures_see_it(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0]))
    holder = {"x": x}
    grad = fastgrad.numerical_gradient(
        lambda _: float((holder["x"] ** 2).sum()), x, backend=backend
    )
    np.testing.assert_allclose(backend.to_numpy(grad), [2.0, 4.0, 6.0], atol=1e-8)


def test_restores_x_when_f_raises(backend):
    x = backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]))
    before = backend.to_numpy(x).copy()
    calls = []

    def f(a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("user bug")
        return float(a.sum())

    with pytest.raises(KeyError, match="user bug"):
        fastgrad.numerical_gradient(f, x, backend=backend)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


def test_non_contiguous_view_is_perturbed_and_restored():
    base = np.arange(12.0).reshape(3, 4)
    view = base[:, ::2]
    grad = fastgrad.numerical_gradient(lambda a: float((a**2).sum()), view)
    np.testing.assert_allclose(grad, 2 * view, atol=1e-7)
    np.testing.assert_array_equal(base, np.arange(12.0).reshape(3, 4))


def test_float32_warns_and_still_returns_float32():
    x = np.array([1.0, 2.0], dtype=np.float32)
    with pytest.warns(PrecisionWarning, match="float32"):
        grad = fastgrad.numerical_gradient(lambda a: float((a**2).sum()), x)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, [2.0, 4.0], rtol=0.05)


def test_lists_become_float64():
    grad = fastgrad.numerical_gradient(lambda a: float(a[0] * a[1]), [3, 4])
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, [4.0, 3.0])


def test_empty_array():
    assert fastgrad.numerical_gradient(lambda a: 0.0, np.zeros((0, 3))).shape == (0, 3)


def test_gradient_descent_does_not_mutate_and_records_history():
    start = np.array([[-3.0, 4.0]])
    x, history = fastgrad.gradient_descent(lambda a: float((a**2).sum()), start, lr=0.1, step_num=3)
    np.testing.assert_array_equal(start, [[-3.0, 4.0]])
    np.testing.assert_allclose(history[1], [[-2.4, 3.2]])
    np.testing.assert_allclose(x, [[-3.0 * 0.8**3, 4.0 * 0.8**3]])
    ints, _ = fastgrad.gradient_descent(lambda a: float((a**2).sum()), np.array([1, 1]), step_num=1)
    assert ints.dtype == np.float64
