"""Every kernel and every model on every available backend, compared with the NumPy reference.

Written once and parametrized by the ``backend`` fixture, so a new backend
inherits the whole suite. Sizes cross the interesting boundaries: a batch of
one, odd shapes, more elements than threads, more than one CUDA grid. Where
the reference is compared with itself (``numpy``), a loop oracle from
``tests/naive.py`` keeps the test meaningful.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fastgrad
from fastgrad.backends._base import ACTIVATIONS, SparseRows
from tests import naive
from tests.conftest import (
    mnist_like,
    net_with,
    network_on,
    random_network,
    to_host,
    tolerance,
)

DTYPES = [np.float64, np.float32]
BATCH_SHAPES = [(1, 10), (7, 3), (100, 10), (257, 33)]
# Depths 1..4 with odd widths; an empty list is a single affine layer.
HIDDEN = [[], [5], [9, 4], [6, 7, 3]]
MODEL_ACTIVATIONS = ["relu", "sigmoid", "tanh"]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Run as training does: these products are small, and on 2 cores idle BLAS threads spin."""
    with fastgrad.get_backend("numpy").single_threaded_blas():
        yield


def depth_id(hidden):
    return f"depth{len(hidden) + 1}-" + ("x".join(map(str, hidden)) or "none")


def assert_matches(backend, reference, got, expected, dtype, scale=1.0):
    tol = scale * tolerance(dtype)
    np.testing.assert_allclose(
        to_host(backend, got), to_host(reference, expected), rtol=tol, atol=tol
    )


def random_logits(shape, dtype, seed=0, scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def random_labels(batch_size, num_classes, seed=1):
    return np.random.default_rng(seed).integers(0, num_classes, batch_size)


# ------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 31, 1025, 300_001])
@pytest.mark.parametrize("kernel", ["sigmoid", "sigmoid_grad", "relu", "tanh", "identity"])
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


# ----------------------------------------------------------------------- losses
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
        ("softmax_cross_entropy", (Z, T), (logits, onehot)),
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
    onehot = np.eye(shape[1], dtype=dtype)[labels]
    soft = reference.softmax(random_logits(shape, dtype, seed=9))
    for kind, targets in (("labels", labels), ("one-hot", onehot), ("soft", soft)):
        Z, T = backend.asarray(logits), backend.asarray(targets)
        loss, grad = backend.softmax_cross_entropy_with_grad(Z, T)
        ref_loss, ref_grad = reference.softmax_cross_entropy_with_grad(logits, targets)
        assert grad.dtype == dtype and grad.shape == shape, kind
        assert float(loss) == pytest.approx(float(ref_loss), rel=tolerance(dtype)), kind
        # the forward kernel alone gives the same loss
        assert float(loss) == pytest.approx(
            float(backend.softmax_cross_entropy(Z, T)), rel=tolerance(dtype)
        ), kind
        assert_matches(backend, reference, grad, ref_grad, dtype)
    # one-hot targets and their labels are the same loss and the same gradient
    by_labels = backend.softmax_cross_entropy_with_grad(
        backend.asarray(logits), backend.asarray(labels)
    )
    by_onehot = backend.softmax_cross_entropy_with_grad(
        backend.asarray(logits), backend.asarray(onehot)
    )
    assert float(by_labels[0]) == pytest.approx(float(by_onehot[0]), rel=tolerance(dtype))
    assert_matches(backend, backend, by_labels[1], by_onehot[1], dtype)


def test_softmax_cross_entropy_matches_loop_oracle(backend):
    logits = random_logits((9, 4), np.float64, scale=30.0)
    labels = random_labels(9, 4)
    got = float(backend.softmax_cross_entropy(backend.asarray(logits), backend.asarray(labels)))
    assert got == pytest.approx(naive.log_softmax_cross_entropy(logits, labels), rel=1e-13)


@pytest.mark.parametrize("targets", ["labels", "soft"])
def test_softmax_cross_entropy_grad_is_the_derivative_of_the_loss(backend, targets):
    logits = random_logits((7, 5), np.float64)
    labels = random_labels(7, 5)
    T = labels if targets == "labels" else naive.softmax_rows(random_logits((7, 5), np.float64, 4))

    def loop_loss(z):
        if targets == "labels":
            return naive.log_softmax_cross_entropy(z, labels)
        log_p = np.log(naive.softmax_rows(z))
        return float(-(T * log_p).sum() / z.shape[0])

    _, grad = backend.softmax_cross_entropy_with_grad(backend.asarray(logits), backend.asarray(T))
    expected = naive.numerical_gradient(loop_loss, logits.copy(), h=1e-5)
    np.testing.assert_allclose(to_host(backend, grad), expected, atol=1e-9)


# --------------------------------------------------------------------- affine
# (N, D, F); 1001 rows: from 1000 the Numba backend runs blocks of rows on its threads
AFFINE_SHAPES = [(1, 10, 3), (7, 13, 5), (100, 784, 50), (257, 33, 129), (1001, 33, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", AFFINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["dense", "sparse_rows"])
def test_affine_forward_and_backward(backend, reference, form, shape, dtype):
    batch_size, fan_in, fan_out = shape
    X = mnist_like(batch_size, fan_in, dtype, seed=batch_size)
    W = random_logits((fan_in, fan_out), dtype, seed=1, scale=0.3)
    b = random_logits(fan_out, dtype, seed=2, scale=0.1)
    dY = random_logits((batch_size, fan_out), dtype, seed=3, scale=1.0)
    Xd, Wd, dYd = backend.asarray(X), backend.asarray(W), backend.asarray(dY)
    inputs = backend.sparse_rows(Xd) if form == "sparse_rows" else Xd

    Y = backend.affine_forward(inputs, Wd, backend.asarray(b))
    assert Y.dtype == dtype and Y.shape == (batch_size, fan_out)
    assert_matches(backend, reference, Y, reference.affine_forward(X, W, b), dtype)

    expected = reference.affine_backward(dY, X, W)
    got = backend.affine_backward(dYd, inputs, Wd)
    for name, value, reference_value in zip(("dX", "dW", "db"), got, expected, strict=True):
        assert value.dtype == dtype and value.shape == reference_value.shape, name
        assert_matches(backend, reference, value, reference_value, dtype)

    # A first layer asks for no dX; dW and db do not change.
    dX, dW, db = backend.affine_backward(dYd, inputs, Wd, need_dX=False)
    assert dX is None
    assert_matches(backend, reference, dW, expected[1], dtype)
    assert_matches(backend, reference, db, expected[2], dtype)


def test_affine_matches_a_loop(backend):
    X = mnist_like(3, 4, seed=1)
    W = random_logits((4, 2), np.float64, seed=2)
    b = np.array([0.5, -0.25])
    dY = random_logits((3, 2), np.float64, seed=3)
    Y = np.array(
        [[sum(X[n, i] * W[i, j] for i in range(4)) + b[j] for j in range(2)] for n in range(3)]
    )
    dX = np.array([[sum(dY[n, j] * W[i, j] for j in range(2)) for i in range(4)] for n in range(3)])
    dW = np.array([[sum(X[n, i] * dY[n, j] for n in range(3)) for j in range(2)] for i in range(4)])
    db = np.array([sum(dY[n, j] for n in range(3)) for j in range(2)])
    for inputs in (backend.asarray(X), backend.sparse_rows(backend.asarray(X))):
        got_Y = backend.affine_forward(inputs, backend.asarray(W), backend.asarray(b))
        np.testing.assert_allclose(to_host(backend, got_Y), Y, rtol=1e-14, atol=1e-15)
        got = backend.affine_backward(backend.asarray(dY), inputs, backend.asarray(W))
        for value, expected in zip(got, (dX, dW, db), strict=True):
            np.testing.assert_allclose(to_host(backend, value), expected, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 13), (257, 129)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_forward_and_backward(backend, reference, activation, shape, dtype):
    X = random_logits(shape, dtype, scale=3.0)
    X.reshape(-1)[::3] = 0.0  # exact zeros: ReLU's kink
    dY = random_logits(shape, dtype, seed=4, scale=1.0)
    Xd = backend.asarray(X)
    Y = backend.activation_forward(Xd, activation)
    reference_Y = reference.activation_forward(X, activation)
    assert Y.dtype == dtype and Y.shape == shape
    assert_matches(backend, reference, Y, reference_Y, dtype)
    dX = backend.activation_backward(backend.asarray(dY), Xd, Y, activation)
    assert dX.dtype == dtype and dX.shape == shape
    expected = reference.activation_backward(dY, X, reference_Y, activation)
    assert_matches(backend, reference, dX, expected, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_by_formula(backend, activation):
    X = np.array([-3.0, -0.5, -0.0, 0.0, 1e-300, 0.5, 3.0])
    Xd = backend.asarray(X)
    Y = backend.activation_forward(Xd, activation)
    np.testing.assert_allclose(
        to_host(backend, Y), [naive.ACTIVATIONS[activation](v) for v in X], rtol=1e-15, atol=0
    )
    dX = to_host(
        backend, backend.activation_backward(backend.asarray(2 * np.ones(7)), Xd, Y, activation)
    )
    s = 1 / (1 + np.exp(-X))
    derivative = {
        "sigmoid": s * (1 - s),
        "relu": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0],  # 0 at exactly 0, as the book's mask
        "tanh": 1 - np.tanh(X) ** 2,
        "identity": np.ones(7),
    }[activation]
    np.testing.assert_allclose(dX, 2 * np.asarray(derivative), rtol=1e-15, atol=1e-300)


def test_unknown_activation_is_refused(backend):
    X = backend.asarray(np.zeros(3))
    with pytest.raises(ValueError, match=r"activation must be one of .*'softplus'"):
        backend.activation_forward(X, "softplus")
    with pytest.raises(ValueError, match=r"activation must be one of .*'softplus'"):
        backend.activation_backward(X, X, X, "softplus")


# --------------------------------------------------------- updates and inputs
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update_in_place(backend, reference, dtype):
    shapes = [(13, 5), (5,), (1, 1), (300_001,)]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    grads = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    on_backend = [backend.asarray(a.copy()) for a in arrays]
    identities = [id(a) for a in on_backend]
    assert backend.sgd_update(on_backend, [backend.asarray(g) for g in grads], 0.125) is None
    expected = [a.copy() for a in arrays]
    reference.sgd_update(expected, grads, 0.125)
    assert [id(a) for a in on_backend] == identities
    for got, want, array, grad in zip(on_backend, expected, arrays, grads, strict=True):
        assert got.dtype == dtype
        assert_matches(backend, reference, got, want, dtype)
        np.testing.assert_allclose(
            to_host(backend, got), array.astype(np.float64) - 0.125 * grad, rtol=tolerance(dtype)
        )


def sparse_rows_by_loop(X):
    starts, columns, values = [0], [], []
    for row in X:
        for column, value in enumerate(row):
            if value != 0:
                columns.append(column)
                values.append(value)
        starts.append(len(columns))
    return starts, columns, values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 10), (7, 13), (100, 784)], ids=lambda s: "x".join(map(str, s))
)
def test_sparse_rows_match_a_loop(backend, shape, dtype):
    X = mnist_like(*shape, dtype, seed=shape[1])
    if shape[0] > 1:
        X[0] = 0.0  # an empty row
        X[1] = np.linspace(-1.0, 1.0, shape[1]) + 0.01  # a full row, negative values too
        X[-1, 0] = -0.0  # negative zero is a zero
    starts, columns, values = sparse_rows_by_loop(X)
    wide = np.zeros((shape[0], 2 * shape[1]), dtype)
    wide[:, ::2] = X
    # C order, Fortran order and a strided view list the same non-zeros.
    for layout in (X, np.asfortranarray(X), wide[:, ::2]):
        rows = backend.sparse_rows(backend.asarray(layout))
        assert isinstance(rows, SparseRows)
        assert rows.shape == shape and rows.dtype == dtype
        np.testing.assert_array_equal(to_host(backend, rows.dense), X)
        assert to_host(backend, rows.starts).tolist() == starts
        assert to_host(backend, rows.columns).tolist() == columns
        assert np.issubdtype(to_host(backend, rows.columns).dtype, np.integer)
        got_values = to_host(backend, rows.values)
        assert got_values.dtype == dtype
        np.testing.assert_array_equal(got_values, np.array(values, dtype=dtype))


def test_training_inputs_are_x_or_its_rows(backend):
    X = mnist_like(9, 20, seed=4)
    inputs = backend.training_inputs(backend.asarray(X))
    dense = inputs.dense if isinstance(inputs, SparseRows) else inputs
    np.testing.assert_array_equal(to_host(backend, dense), X)
    W, b = random_logits((20, 3), np.float64), np.zeros(3)
    np.testing.assert_allclose(
        to_host(backend, backend.affine_forward(inputs, backend.asarray(W), backend.asarray(b))),
        X @ W,
        rtol=1e-14,
        atol=1e-14,
    )


# ------------------------------------------------ numerical gradients of networks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes", [(20, 6, 4), (9, 1, 3), (12, 9, 10)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("batch_size", [1, 13])
def test_two_layer_network_numerical_gradient_equals_naive_loop(backend, sizes, batch_size, dtype):
    network = random_network(sizes, "sigmoid", dtype, scale=0.8)
    X = mnist_like(batch_size, sizes[0], dtype, seed=batch_size)
    labels = random_labels(batch_size, sizes[-1])
    expected = naive.multilayer_numerical_gradient(
        network.weights, network.biases, X, labels, "sigmoid"
    )
    got = backend.network_numerical_gradient(
        network_on(backend, network), backend.asarray(X), backend.asarray(labels), 1e-4
    )
    assert len(got) == 2
    for (dW, db), (expected_dW, expected_db) in zip(got, expected, strict=True):
        for value, oracle in ((dW, expected_dW), (db, expected_db)):
            assert value.dtype == np.float64  # always float64, whatever the params
            np.testing.assert_allclose(to_host(backend, value), oracle, rtol=0, atol=1e-9)


@functools.cache
def chapter_size_case(weight_decay):
    """The chapter's 784-50-10 sigmoid net on an MNIST-like batch, and the reference's result."""
    network = random_network([784, 50, 10], "sigmoid", scale=0.05, weight_decay=weight_decay)
    X = mnist_like(100, 784, np.float64, seed=2)
    labels = random_labels(100, 10)
    reference = fastgrad.get_backend("numpy")
    return network, X, labels, reference.network_numerical_gradient(network, X, labels, 1e-4)


@pytest.mark.parametrize("weight_decay, form", [(0.0, "dense"), (0.1, "sparse_rows")])
def test_network_numerical_gradient_chapter_size(backend, weight_decay, form):
    network, X, labels, expected = chapter_size_case(weight_decay)
    inputs = backend.asarray(X)
    if form == "sparse_rows":
        inputs = backend.sparse_rows(inputs)
    got = backend.network_numerical_gradient(
        network_on(backend, network), inputs, backend.asarray(labels), 1e-4
    )
    for pair, expected_pair in zip(got, expected, strict=True):
        for value, oracle in zip(pair, expected_pair, strict=True):
            np.testing.assert_allclose(to_host(backend, value), oracle, rtol=0, atol=1e-11)


def test_network_numerical_gradient_leaves_the_network_alone(backend):
    network = network_on(backend, random_network([8, 5, 4, 3], "relu", weight_decay=0.1))
    before = [to_host(backend, a).copy() for a in network.arrays]
    X, labels = backend.asarray(mnist_like(6, 8)), backend.asarray(random_labels(6, 3))
    backend.network_numerical_gradient(network, X, labels, 1e-4)
    for array, original in zip(network.arrays, before, strict=True):
        np.testing.assert_array_equal(to_host(backend, array), original)


# ------------------------------------------------------------------- models
def model_case(hidden, activation, dtype, weight_decay, batch_size, seed=0):
    sizes = [13, *hidden, 4]
    network = random_network(
        sizes, activation, dtype, scale=0.5, seed=seed, weight_decay=weight_decay
    )
    x = mnist_like(batch_size, 13, dtype, seed=batch_size)
    return network, x, random_labels(batch_size, 4, seed=batch_size)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("activation", MODEL_ACTIVATIONS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=depth_id)
def test_multilayer_net(backend, reference, hidden, activation, batch_size, dtype, weight_decay):
    network, x, t = model_case(hidden, activation, dtype, weight_decay, batch_size)
    net, expected = net_with(network, backend), net_with(network, reference)
    xd, td = backend.asarray(x), backend.asarray(t)
    onehot = backend.asarray(np.eye(4, dtype=dtype)[t])
    assert net.depth == len(hidden) + 1 and net.dtype == dtype

    logits = net.predict(xd)
    assert logits.dtype == dtype and logits.shape == (batch_size, 4)
    assert_matches(backend, reference, logits, expected.predict(x), dtype)
    oracle_logits = naive.multilayer_logits(network.weights, network.biases, x, activation)
    assert_matches(backend, reference, logits, np.array(oracle_logits), dtype, scale=10)

    loss = net.loss(xd, td)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected.loss(x, t), rel=tolerance(dtype))
    assert loss == pytest.approx(net.loss(xd, onehot), rel=tolerance(dtype))
    oracle_loss = naive.multilayer_loss(
        network.weights, network.biases, x, t, activation, weight_decay
    )
    assert loss == pytest.approx(oracle_loss, rel=10 * tolerance(dtype))

    assert net.accuracy(xd, td) == expected.accuracy(x, t)
    assert net.accuracy(xd, td) == np.mean(np.argmax(oracle_logits, axis=1) == t)

    grads, reference_grads = net.gradient(xd, td), expected.gradient(x, t)
    assert list(grads) == list(net.params)
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == net.params[name].shape, name
        assert_matches(backend, reference, grad, reference_grads[name], dtype)

    numerical = net.numerical_gradient(xd, td, method="fast")
    reference_numerical = expected.numerical_gradient(x, t, method="fast")
    # float64 arithmetic either way; float32 nets only round the result
    close = 1e-10 if dtype == np.float64 else tolerance(dtype)
    for name, grad in numerical.items():
        assert grad.dtype == dtype, name
        np.testing.assert_allclose(
            to_host(backend, grad), reference_numerical[name], rtol=close, atol=close
        )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", MODEL_ACTIVATIONS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=depth_id)
def test_multilayer_sgd_steps(backend, reference, hidden, activation, dtype, weight_decay):
    network, _, _ = model_case(hidden, activation, dtype, weight_decay, 1)
    X = mnist_like(60, 13, dtype, seed=5)
    labels = random_labels(60, 4, seed=6)
    rng = np.random.default_rng(7)
    lr = 0.3
    for indices in (rng.integers(0, 60, (10, 7)), rng.integers(0, 60, (4, 1))):
        net, expected = net_with(network, backend), net_with(network, reference)
        losses = net.sgd_steps(
            backend.asarray(X), backend.asarray(labels), backend.asarray(indices), lr
        )
        reference_losses = expected.sgd_steps(X, labels, indices, lr)
        assert losses.dtype == np.float64 and losses.shape == (len(indices),)
        # Steps compound rounding differences; a few steps stay well inside 50x the tolerance.
        loose = 50 * tolerance(dtype)
        np.testing.assert_allclose(to_host(backend, losses), reference_losses, rtol=loose)
        for name, value in net.params.items():
            assert value.dtype == dtype, name
            np.testing.assert_allclose(
                to_host(backend, value), expected.params[name], rtol=loose, atol=loose
            )

        # The steps are the book's loop: loss before the update, then W -= lr * grad.
        by_hand = net_with(network, reference)
        for step, rows in enumerate(indices):
            loss, grads = by_hand.prepared_gradient(X[rows], labels[rows])
            assert float(loss) == pytest.approx(float(reference_losses[step]), rel=loose)
            for name, value in by_hand.params.items():
                value -= (lr * grads[name]).astype(dtype)
        for name, value in by_hand.params.items():
            np.testing.assert_allclose(expected.params[name], value, rtol=loose, atol=loose)


@pytest.mark.parametrize("activation", MODEL_ACTIVATIONS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=depth_id)
def test_multilayer_numerical_sgd_steps(backend, reference, hidden, activation):
    network, _, _ = model_case(hidden, activation, np.float64, 0.1, 1)
    X = mnist_like(40, 13, seed=8)
    labels = random_labels(40, 4, seed=9)
    indices = np.random.default_rng(10).integers(0, 40, (4, 9))
    net, expected = net_with(network, backend), net_with(network, reference)
    args = (backend.asarray(X), backend.asarray(labels), backend.asarray(indices), 0.5)
    losses = net.sgd_steps(*args, "numerical")
    reference_losses = expected.sgd_steps(X, labels, indices, 0.5, "numerical")
    np.testing.assert_allclose(to_host(backend, losses), reference_losses, rtol=1e-10)
    for name, value in net.params.items():
        np.testing.assert_allclose(to_host(backend, value), expected.params[name], atol=1e-10)
    # Central differences are backprop up to O(h²): the two trainings stay together.
    backprop = net_with(network, backend)
    backprop_losses = backprop.sgd_steps(*args, "backprop")
    np.testing.assert_allclose(
        to_host(backend, losses), to_host(backend, backprop_losses), atol=1e-7
    )
    for name, value in net.params.items():
        np.testing.assert_allclose(
            to_host(backend, value), to_host(backend, backprop.params[name]), atol=1e-7
        )


# (layer sizes, activation, weight decay): the chapter's net, which the Numba
# backend fuses, and nets that differ from it in one way each.
FUSED_CASES = {
    "chapter": ([784, 50, 10], "sigmoid", 0.0),
    "decay": ([30, 9, 5], "sigmoid", 0.1),
    "relu": ([30, 9, 5], "relu", 0.0),
    "tanh": ([30, 9, 5], "tanh", 0.0),
    "depth1": ([30, 5], "sigmoid", 0.0),
    "depth3": ([30, 9, 4, 5], "sigmoid", 0.0),
}


@pytest.mark.parametrize("gradient", ["backprop", "numerical"])
@pytest.mark.parametrize("form", ["dense", "training_inputs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_sgd_steps_equal_the_primitive_steps(
    backend, monkeypatch, case, dtype, form, gradient
):
    """``net.sgd_steps`` as the backend serves it against the model's loop of primitives."""
    sizes, activation, weight_decay = FUSED_CASES[case]
    scale = 0.1 if case == "chapter" else 0.3
    network = random_network(sizes, activation, dtype, scale=scale, weight_decay=weight_decay)
    X = mnist_like(300, sizes[0], dtype, seed=2)
    labels = random_labels(300, sizes[-1])
    steps = 25 if gradient == "backprop" else 2
    indices = np.random.default_rng(3).integers(0, 300, (steps, 32))
    net = net_with(network, backend)
    Xd, Ld = net.prepare(backend.asarray(X), backend.asarray(labels))
    inputs = net.training_inputs(Xd) if form == "training_inputs" else Xd
    args = (inputs, Ld, backend.asarray(indices), 0.5, gradient)

    if case == "chapter" and backend.name == "numba":
        scratch = net_with(network, backend).network()
        assert backend.fused_sgd_steps(scratch, *args) is not None, "the chapter's net is fused"

    served_losses = net.sgd_steps(*args)
    primitive = net_with(network, backend)
    monkeypatch.setattr(type(backend), "fused_sgd_steps", lambda *a, **k: None)
    primitive_losses = primitive.sgd_steps(*args)

    assert served_losses.dtype == np.float64 and served_losses.shape == (steps,)
    loose = 50 * tolerance(dtype)
    np.testing.assert_allclose(
        to_host(backend, served_losses), to_host(backend, primitive_losses), rtol=loose
    )
    for name, value in net.params.items():
        assert value.dtype == dtype
        np.testing.assert_allclose(
            to_host(backend, value),
            to_host(backend, primitive.params[name]),
            rtol=loose,
            atol=loose,
        )


# --------------------------------------------------- black-box numerical gradients
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
