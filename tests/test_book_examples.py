"""The chapter's worked examples, with the values the book prints."""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad

T = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
Y_GOOD = np.array([0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0])
Y_BAD = np.array([0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.6, 0.0, 0.0])


def function_1(x):
    return 0.01 * x**2 + 0.1 * x


def function_2(x):
    return x[0] ** 2 + x[1] ** 2


def test_mean_squared_error_values(backend):
    assert fastgrad.mean_squared_error(Y_GOOD, T, backend=backend) == pytest.approx(0.0975)
    assert fastgrad.mean_squared_error(Y_BAD, T, backend=backend) == pytest.approx(0.5975)


@pytest.mark.parametrize("target", [T, 2], ids=["one-hot", "label"])
def test_cross_entropy_error_values(backend, target):
    good = fastgrad.cross_entropy_error(Y_GOOD, target, backend=backend)
    bad = fastgrad.cross_entropy_error(Y_BAD, target, backend=backend)
    assert good == pytest.approx(0.510825457099338, abs=1e-12)
    assert bad == pytest.approx(2.302584092994546, abs=1e-12)


def test_cross_entropy_error_batch_averages(backend):
    y = np.stack([Y_GOOD, Y_BAD])
    expected = (0.510825457099338 + 2.302584092994546) / 2
    assert fastgrad.cross_entropy_error(y, np.stack([T, T]), backend=backend) == pytest.approx(
        expected
    )
    assert fastgrad.cross_entropy_error(y, np.array([2, 2]), backend=backend) == pytest.approx(
        expected
    )


def test_numerical_diff_values():
    assert fastgrad.numerical_diff(function_1, 5) == pytest.approx(0.1999999999990898, abs=1e-15)
    assert fastgrad.numerical_diff(function_1, 10) == pytest.approx(0.2999999999986347, abs=1e-15)


def test_tangent_line_touches_the_curve():
    tangent = fastgrad.tangent_line(function_1, 5)
    assert tangent(5) == pytest.approx(function_1(5))
    assert tangent(6) - tangent(5) == pytest.approx(0.2, abs=1e-9)


@pytest.mark.parametrize(
    "point, expected", [([3.0, 4.0], [6, 8]), ([0.0, 2.0], [0, 4]), ([3.0, 0.0], [6, 0])]
)
def test_numerical_gradient_function_2(backend, point, expected):
    x = backend.asarray(np.array(point))
    grad = backend.to_numpy(fastgrad.numerical_gradient(function_2, x, backend=backend))
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_gradient_descent_book_example(backend):
    start = backend.asarray(np.array([-3.0, 4.0]))
    x, history = fastgrad.gradient_descent(function_2, start, lr=0.1, step_num=20, backend=backend)
    np.testing.assert_allclose(backend.to_numpy(x), [-0.03458765, 0.04611686], rtol=1e-6)
    assert history.shape == (20, 2)
    np.testing.assert_array_equal(backend.to_numpy(history[0]), [-3.0, 4.0])
    np.testing.assert_array_equal(backend.to_numpy(start), [-3.0, 4.0])  # not mutated


def test_gradient_descent_learning_rate_extremes():
    # The book's lr=10 run diverges until x + h rounds back to x (a zero
    # "gradient" then freezes it near 1e13); fastgrad stops it there instead.
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+ of 100 \(lr=10.0\)"):
        fastgrad.gradient_descent(function_2, np.array([-3.0, 4.0]), lr=10.0, step_num=100)
    too_small, _ = fastgrad.gradient_descent(
        function_2, np.array([-3.0, 4.0]), lr=1e-10, step_num=100
    )
    np.testing.assert_allclose(too_small, [-3.0, 4.0], atol=1e-6)  # barely moves


def test_simple_net_gradient_matches_book_shape_and_analytic():
    W = np.array([[0.47355232, 0.9977393, 0.84668094], [0.85557411, 0.03563661, 0.69422093]])
    net = fastgrad.SimpleNet(W)
    x, t = np.array([0.6, 0.9]), np.array([0, 0, 1])
    np.testing.assert_allclose(net.predict(x), [1.05414809, 0.63071653, 1.1328074])
    assert net.loss(x, t) == pytest.approx(0.92806853663411326, abs=1e-6)  # book's, with its 1e-7
    dW = net.numerical_gradient(x, t)
    probabilities = fastgrad.softmax(x @ W)
    analytic = np.outer(x, probabilities - t)
    np.testing.assert_allclose(dW, analytic, atol=1e-8)
    np.testing.assert_array_equal(net.W, W)  # restored after perturbation
