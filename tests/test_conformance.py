"""Every kernel on every available backend, compared with the NumPy reference.

Written once and parametrized by the ``backend`` fixture, so a new backend
inherits the whole suite. Sizes cross the interesting boundaries: a batch of
one, odd shapes, more elements than threads, more than one CUDA grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastgrad.backends._base import PARAM_NAMES
from tests import naive
from tests.conftest import mnist_like, random_net, to_host, tolerance

DTYPES = [np.float64, np.float32]
BATCH_SHAPES = [(1, 10), (7, 3), (100, 10), (257, 33)]


def assert_matches(backend, reference, got, expected, dtype):
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        to_host(backend, got), to_host(reference, expected), rtol=tol, atol=tol
    )


def random_logits(shape, dtype, seed=0, scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def random_labels(batch_size, num_classes, seed=1):
    return np.random.default_rng(seed).integers(0, num_classes, batch_size)


def on(backend, params):
    return {name: backend.asarray(value.copy()) for name, value in params.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 31, 1025, 300_001])
@pytest.mark.parametrize("kernel", ["sigmoid", "sigmoid_grad", "relu", "identity"])
def test_elementwise(backend, reference, kernel, size, dtype):
    x = random_logits(size, dtype, scale=10.0)
    got = getattr(backend, kernel)(backend.asarray(x))
    assert got.dtype == dtype and got.shape == x.shape
    assert_matches(backend, reference, got, getattr(reference, kernel)(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_overflow(backend, dtype):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=dtype)
    got = to_host(backend, backend.sigmoid(backend.asarray(x)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[[0, 2, 4]], [0.0, 0.5, 1.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(10,), *BATCH_SHAPES, (2, 3, 5)])
def test_softmax(backend, reference, shape, dtype):
    x = random_logits(shape, dtype)
    got = backend.softmax(backend.asarray(x))
    assert_matches(backend, reference, got, reference.softmax(x), dtype)
    np.testing.assert_allclose(to_host(backend, got).sum(axis=-1), 1.0, rtol=tolerance(dtype))


def test_softmax_extreme_logits(backend):
    x = np.array([[1010.0, 1000.0, 990.0], [-1e4, 0.0, 1e4]])
    got = to_host(backend, backend.softmax(backend.asarray(x)))
    np.testing.assert_allclose(got, naive.softmax_rows(x), atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_losses(backend, reference, shape, dtype):
    logits = random_logits(shape, dtype)
    probabilities = reference.softmax(logits)
    labels = random_labels(shape[0], shape[1])
    onehot = np.eye(shape[1], dtype=dtype)[labels]
    soft = reference.softmax(random_logits(shape, dtype, seed=5))
    P, Z = backend.asarray(probabilities), backend.asarray(logits)
    L, T, S = backend.asarray(labels), backend.asarray(onehot), backend.asarray(soft)
    cases = [
        ("mean_squared_error", (P, T), (probabilities, onehot)),
        ("cross_entropy_error", (P, L), (probabilities, labels)),
        ("cross_entropy_error", (P, T), (probabilities, onehot)),
        ("softmax_cross_entropy", (Z, L), (logits, labels)),
        ("softmax_cross_entropy", (Z, S), (logits, soft)),
    ]
    for kernel, args, reference_args in cases:
        got = float(getattr(backend, kernel)(*args))
        expected = float(getattr(reference, kernel)(*reference_args))
        assert got == pytest.approx(expected, rel=tolerance(dtype), abs=tolerance(dtype)), kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_softmax_cross_entropy_with_grad(backend, reference, shape, dtype):
    logits = random_logits(shape, dtype)
    labels = random_labels(shape[0], shape[1])
    for targets in (labels, reference.softmax(random_logits(shape, dtype, seed=9))):
        loss, grad = backend.softmax_cross_entropy_with_grad(
            backend.asarray(logits), backend.asarray(targets)
        )
        ref_loss, ref_grad = reference.softmax_cross_entropy_with_grad(logits, targets)
        assert float(loss) == pytest.approx(float(ref_loss), rel=tolerance(dtype))
        assert_matches(backend, reference, grad, ref_grad, dtype)


def test_softmax_cross_entropy_matches_loop_oracle(backend):
    logits = random_logits((9, 4), np.float64, scale=30.0)
    labels = random_labels(9, 4)
    got = float(backend.softmax_cross_entropy(backend.asarray(logits), backend.asarray(labels)))
    assert got == pytest.approx(naive.log_softmax_cross_entropy(logits, labels), rel=1e-13)


NET_SIZES = [(784, 50, 10), (5, 3, 2), (37, 129, 11)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", NET_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_size", [1, 100])
def test_two_layer_forward_and_backprop(backend, reference, sizes, batch_size, dtype):
    params = random_net(sizes, dtype, scale=0.1)
    X = mnist_like(batch_size, sizes[0], dtype, seed=2)
    labels = random_labels(batch_size, sizes[2])
    device = on(backend, params)
    Xd, Ld = backend.asarray(X), backend.asarray(labels)
    assert_matches(
        backend,
        reference,
        backend.two_layer_logits(device, Xd),
        reference.two_layer_logits(params, X),
        dtype,
    )
    assert float(backend.two_layer_loss(device, Xd, Ld)) == pytest.approx(
        float(reference.two_layer_loss(params, X, labels)), rel=tolerance(dtype)
    )
    assert float(backend.two_layer_accuracy(device, Xd, Ld)) == pytest.approx(
        float(reference.two_layer_accuracy(params, X, labels))
    )
    loss, grads = backend.two_layer_gradient(device, Xd, Ld)
    ref_loss, ref_grads = reference.two_layer_gradient(params, X, labels)
    assert float(loss) == pytest.approx(float(ref_loss), rel=tolerance(dtype))
    for name in PARAM_NAMES:
        assert grads[name].dtype == dtype
        assert_matches(backend, reference, grads[name], ref_grads[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_layer_sgd_step_and_steps(backend, reference, dtype):
    sizes, lr = (60, 20, 10), 0.5
    params = random_net(sizes, dtype, scale=0.1)
    X = mnist_like(300, sizes[0], dtype, seed=2)
    labels = random_labels(300, sizes[2])
    indices = np.random.default_rng(3).integers(0, 300, (25, 32))

    device = on(backend, params)
    loss = backend.two_layer_sgd_step(
        device, backend.asarray(X[:32]), backend.asarray(labels[:32]), lr
    )
    expected_params = {k: v.copy() for k, v in params.items()}
    ref_loss = reference.two_layer_sgd_step(expected_params, X[:32], labels[:32], lr)
    assert float(loss) == pytest.approx(float(ref_loss), rel=tolerance(dtype))
    for name in PARAM_NAMES:
        assert_matches(backend, reference, device[name], expected_params[name], dtype)

    device = on(backend, params)
    losses = backend.two_layer_sgd_steps(
        device, backend.asarray(X), backend.asarray(labels), backend.asarray(indices), lr
    )
    expected_params = {k: v.copy() for k, v in params.items()}
    ref_losses = reference.two_layer_sgd_steps(expected_params, X, labels, indices, lr)
    # Steps compound rounding differences; 25 steps stay well inside 50x the tolerance.
    loose = 50 * tolerance(dtype)
    np.testing.assert_allclose(to_host(backend, losses), ref_losses, rtol=loose)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(
            to_host(backend, device[name]), expected_params[name], rtol=loose, atol=loose
        )


def test_two_layer_sgd_steps_numerical(backend, reference):
    sizes = (30, 8, 5)
    params = random_net(sizes, np.float64, scale=0.3)
    X = mnist_like(80, sizes[0], np.float64, seed=2)
    labels = random_labels(80, sizes[2])
    indices = np.random.default_rng(4).integers(0, 80, (6, 16))
    device = on(backend, params)
    losses = backend.two_layer_sgd_steps(
        device,
        backend.asarray(X),
        backend.asarray(labels),
        backend.asarray(indices),
        0.5,
        "numerical",
    )
    expected = {k: v.copy() for k, v in params.items()}
    ref_losses = reference.two_layer_sgd_steps(expected, X, labels, indices, 0.5, "numerical")
    np.testing.assert_allclose(to_host(backend, losses), ref_losses, rtol=1e-10)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(to_host(backend, device[name]), expected[name], atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes", [(20, 6, 4), (9, 1, 3), (50, 17, 10)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("batch_size", [1, 13])
def test_two_layer_numerical_gradient_equals_naive_loop(backend, sizes, batch_size, dtype):
    params = random_net(sizes, dtype, scale=0.8)
    X = mnist_like(batch_size, sizes[0], dtype, seed=batch_size)
    labels = random_labels(batch_size, sizes[2])
    expected = naive.two_layer_numerical_gradient(params, X, labels)
    got = backend.two_layer_numerical_gradient(
        on(backend, params), backend.asarray(X), backend.asarray(labels), 1e-4
    )
    for name in PARAM_NAMES:
        assert got[name].dtype == np.float64  # always float64, whatever the params
        np.testing.assert_allclose(to_host(backend, got[name]), expected[name], rtol=0, atol=1e-9)


def test_two_layer_numerical_gradient_chapter_size(backend, reference):
    params = random_net((784, 50, 10), np.float64, scale=0.05)
    X = mnist_like(100, 784, np.float64, seed=2)
    labels = random_labels(100, 10)
    got = backend.two_layer_numerical_gradient(
        on(backend, params), backend.asarray(X), backend.asarray(labels), 1e-4
    )
    expected = reference.two_layer_numerical_gradient(params, X, labels, 1e-4)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(to_host(backend, got[name]), expected[name], rtol=0, atol=1e-11)


@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 2)])
def test_blackbox_numerical_gradient(backend, reference, shape, method):
    x = np.random.default_rng(0).standard_normal(shape)
    weights = np.arange(1.0, x.size + 1).reshape(shape)

    def f(a):
        return float(to_host(backend, (backend.asarray(weights) * a**3).sum()))

    def f_reference(a):
        return float((weights * a**3).sum())

    xd = backend.asarray(x.copy())
    got = backend.numerical_gradient(f, xd, 1e-4, method)
    expected = reference.numerical_gradient(f_reference, x.copy(), 1e-4, method)
    np.testing.assert_allclose(to_host(backend, got), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(to_host(backend, xd), x)


@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_blackbox_numerical_gradient_batched(backend, reference, method, chunk_size):
    x = np.random.default_rng(1).standard_normal((4, 5))

    def f(stack):
        return (stack**2).sum(axis=(1, 2)) + stack[:, 0, 0]

    xd = backend.asarray(x.copy())
    got = backend.numerical_gradient_batched(f, xd, 1e-4, method, chunk_size)
    expected = reference.numerical_gradient_batched(f, x.copy(), 1e-4, method, chunk_size)
    np.testing.assert_allclose(to_host(backend, got), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(to_host(backend, xd), x)
