"""The rules of ``fastgrad._validation`` at every public entry point, on every backend.

Each class of bad input of issue 17 has its own section: non-finite values,
complex values, empty batches, steps that round to nothing, divergence in
training, an ``f`` that changes ``x``, and the errors that used to be unclear.
Every test checks the error's type and message and that the caller's arrays
(and files) are intact afterwards.
"""

from __future__ import annotations

import contextvars
import gc
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad.checkpoint import load_params, save_params
from fastgrad.cli import main
from fastgrad.errors import PrecisionWarning
from fastgrad.train import (
    DIVERGENCE_FACTOR,
    SUSTAINED_DIVERGENCE_FACTOR,
    TrainingDivergedError,
    TrainingHistory,
    _check_losses,
    train,
)
from tests.conftest import to_host

NONFINITE = [np.nan, np.inf, -np.inf]
NONFINITE_IDS = ["nan", "inf", "-inf"]


# ------------------------------------------------------------------ helpers
def shown(value: float) -> str:
    """How a message prints a bad value: ``nan``, ``inf``, ``-inf``."""
    return str(float(value))


def with_bad(array: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    bad = np.array(array, dtype=np.float64, copy=True)
    bad[index] = value
    return bad


def snapshot(*arrays: Any) -> list[np.ndarray]:
    return [np.array(array, copy=True) for array in arrays]


def assert_intact(backend: fastgrad.Backend, arrays: list[Any], before: list[np.ndarray]) -> None:
    for array, copy in zip(arrays, before, strict=True):
        # assert_array_equal treats NaN as equal to NaN, as needed here.
        np.testing.assert_array_equal(to_host(backend, array), copy)


def assert_refuses_nonfinite(
    call: Callable[[], Any], name: str, value: float, index: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    expected = f"{name} holds {shown(value)}" + (f" at index {list(index)}" if index else "")
    assert message.startswith(expected), message


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(17)


def small_data(rng: np.random.Generator, samples: int = 60) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((samples, 6)), rng.integers(0, 3, samples)


# ------------------------------------------------------ non-finite values
ACTIVATIONS = [
    fastgrad.sigmoid,
    fastgrad.sigmoid_grad,
    fastgrad.relu,
    fastgrad.identity,
    fastgrad.softmax,
]


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("function", ACTIVATIONS, ids=lambda f: f.__name__)
def test_activations_refuse_nonfinite_x_naming_the_first_bad_index(backend, rng, function, value):
    host = with_bad(rng.standard_normal((3, 4)), (2, 0), value)
    host[1, 3] = value  # the first in C order
    x = backend.asarray(host)
    before = snapshot(host)
    assert_refuses_nonfinite(lambda: function(x, backend=backend), "x", value, (1, 3))
    assert_intact(backend, [x], before)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_activations_refuse_nonfinite_scalars_and_lists(value):
    assert_refuses_nonfinite(lambda: fastgrad.sigmoid(value), "x", value, ())
    assert_refuses_nonfinite(lambda: fastgrad.relu([0.0, value]), "x", value, (1,))


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_losses_refuse_nonfinite_predictions_and_targets(backend, rng, value):
    probabilities = fastgrad.softmax(rng.standard_normal((4, 3)))
    labels = np.array([0, 2, 1, 1])
    onehot = np.eye(3)[labels]
    cases = [
        (fastgrad.mean_squared_error, with_bad(probabilities, (2, 1), value), onehot, "y"),
        (fastgrad.mean_squared_error, probabilities, with_bad(onehot, (3, 0), value), "t"),
        (fastgrad.cross_entropy_error, with_bad(probabilities, (0, 2), value), labels, "y"),
        (fastgrad.cross_entropy_error, probabilities, with_bad(onehot, (1, 1), value), "t"),
        (fastgrad.softmax_cross_entropy, with_bad(probabilities, (3, 2), value), labels, "logits"),
        (fastgrad.softmax_cross_entropy, probabilities, with_bad(onehot, (2, 2), value), "t"),
    ]
    for loss, y, t, name in cases:
        bad = y if name != "t" else t
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(bad))[0])
        y_b, t_b = backend.asarray(y), backend.asarray(t)
        before = snapshot(y, t)
        assert_refuses_nonfinite(lambda: loss(y_b, t_b, backend=backend), name, value, index)
        assert_intact(backend, [y_b, t_b], before)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched"])
def test_numerical_gradient_refuses_nonfinite_x(backend, rng, value, batched):
    x = backend.asarray(with_bad(rng.standard_normal((2, 3)), (1, 1), value))
    before = snapshot(to_host(backend, x))
    calls = []

    def f(a):
        calls.append(1)
        return a.sum(axis=tuple(range(1, a.ndim))) if batched else float(a.sum())

    assert_refuses_nonfinite(
        lambda: fastgrad.numerical_gradient(f, x, batched=batched, backend=backend),
        "x",
        value,
        (1, 1),
    )
    assert not calls  # refused before f runs
    assert_intact(backend, [x], before)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_numerical_gradient_refuses_nonfinite_values_of_f(backend, value):
    x = backend.asarray(np.array([0.5, -1.0, 2.0]))
    before = snapshot(to_host(backend, x))

    def spoilt_at_second(a):
        return value if float(a[1]) != -1.0 else float((a**2).sum())

    shown_value = "NaN" if np.isnan(value) else shown(value)
    with pytest.raises(ValueError, match=rf"f\(x \+ h\) at index \[1\] returned {shown_value}"):
        fastgrad.numerical_gradient(spoilt_at_second, x, backend=backend)
    assert_intact(backend, [x], before)

    def spoilt_stack(stack):
        values = (stack**2).sum(axis=1)
        values[2] = value
        return values

    with pytest.raises(ValueError, match=rf"batched f returned {shown(value)} for the element"):
        fastgrad.numerical_gradient(spoilt_stack, x, batched=True, chunk_size=3, backend=backend)
    with pytest.raises(ValueError, match=rf"^f\(x\) returned {shown_value}"):
        fastgrad.numerical_gradient(lambda a: value, x, method="forward", backend=backend)
    assert_intact(backend, [x], before)


def test_numerical_gradient_refuses_a_difference_that_overflows_the_dtype(backend):
    x = backend.asarray(np.array([1.0, 2.0], dtype=np.float32))
    with (
        pytest.warns(PrecisionWarning),
        pytest.raises(
            ValueError,
            match=r"numerical gradient is 1e\+40 at index \[0\], beyond the range of "
            "float32",
        ),
    ):
        fastgrad.numerical_gradient(lambda a: 1e40 * float(a[0]), x, backend=backend)
    with (
        pytest.warns(PrecisionWarning),
        pytest.raises(
            ValueError, match=r"numerical gradient is inf at index \[0\].*overflows float32"
        ),
    ):
        fastgrad.numerical_gradient(
            lambda s: 1e40 * s[:, 0].astype(np.float64), x, batched=True, backend=backend
        )
    np.testing.assert_array_equal(to_host(backend, x), [1.0, 2.0])


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_numerical_diff_refuses_nonfinite_points_and_values(value):
    assert_refuses_nonfinite(lambda: fastgrad.numerical_diff(np.sin, value), "x", value, ())
    x = np.array([1.0, value])
    assert_refuses_nonfinite(lambda: fastgrad.numerical_diff(np.sin, x), "x", value, (1,))
    with pytest.raises(ValueError, match=rf"f\(x \+ h\) is {shown(value)}; a derivative needs"):
        fastgrad.numerical_diff(lambda a: value, 1.0)
    with pytest.raises(ValueError, match=r"f\(x - h\) is .* at index \[1\]"):
        fastgrad.numerical_diff(lambda a: np.where(a < 2, value, a), np.array([5.0, 2.0]))
    with pytest.raises(ValueError, match=r"overflows"):
        fastgrad.numerical_diff(lambda a: 1e308 * np.sign(a - 1.0), 1.0)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_gradient_descent_refuses_nonfinite_start_and_learning_rate(backend, value):
    start = backend.asarray(np.array([1.0, value]))
    before = snapshot(to_host(backend, start))
    assert_refuses_nonfinite(
        lambda: fastgrad.gradient_descent(lambda a: float((a**2).sum()), start, backend=backend),
        "init_x",
        value,
        (1,),
    )
    assert_intact(backend, [start], before)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got"):
        fastgrad.gradient_descent(lambda a: 0.0, np.ones(2), lr=value)


def model_cases(backend: fastgrad.Backend) -> list[fastgrad.MultiLayerNet]:
    return [
        fastgrad.TwoLayerNet(6, 4, 3, seed=0, backend=backend),
        fastgrad.MultiLayerNet(
            6, [5, 4], 3, "tanh", weight_decay_lambda=0.1, seed=0, backend=backend
        ),
    ]


METHODS = ["predict", "loss", "accuracy", "gradient", "numerical_gradient"]


def call_method(net: Any, method: str, x: Any, t: Any) -> Any:
    if method == "predict":
        return net.predict(x)
    return getattr(net, method)(x, t)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_model_methods_refuse_nonfinite_inputs_targets_and_parameters(backend, rng, method, value):
    for net in model_cases(backend):
        x_host, labels = small_data(rng, 5)
        x = backend.asarray(with_bad(x_host, (3, 4), value))
        t = backend.asarray(labels)
        params_before = {name: to_host(backend, array).copy() for name, array in net.params.items()}
        before = snapshot(to_host(backend, x), labels)
        assert_refuses_nonfinite(lambda: call_method(net, method, x, t), "x", value, (3, 4))
        assert_intact(backend, [x, t], before)
        if method != "predict":
            onehot = backend.asarray(with_bad(np.eye(3)[labels], (2, 1), value))
            clean = backend.asarray(x_host)
            assert_refuses_nonfinite(
                lambda: call_method(net, method, clean, onehot), "t", value, (2, 1)
            )
        for name, array in params_before.items():
            np.testing.assert_array_equal(to_host(backend, net.params[name]), array)
        spoilt = net.params["W1"]
        original = to_host(backend, spoilt).copy()
        spoilt[1, 2] = value
        with pytest.raises(
            ValueError,
            match=rf"params\['W1'\] holds {shown(value)} at index "
            r"\[1, 2\]; the net's parameters must be finite",
        ):
            call_method(net, method, backend.asarray(x_host), t)
        spoilt[...] = backend.asarray(original)


def test_float64_inputs_beyond_float32_range_are_refused_by_a_float32_net():
    net = fastgrad.TwoLayerNet(2, 3, 2, dtype=np.float32, seed=0)
    x = np.array([[1.0, 1e39]])
    with pytest.raises(ValueError, match=r"^x \(as float32\) holds inf at index \[0, 1\]"):
        net.loss(x, np.array([1]))


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_simple_net_refuses_nonfinite_weights_and_inputs(backend, value):
    W = np.array([[0.5, 1.0, -0.5], [0.2, -0.1, 0.3]])
    assert_refuses_nonfinite(
        lambda: fastgrad.SimpleNet(with_bad(W, (1, 0), value), backend=backend), "W", value, (1, 0)
    )
    net = fastgrad.SimpleNet(backend.asarray(W), backend=backend)
    x = backend.asarray(np.array([0.6, value]))
    t = backend.asarray(np.array([0.0, 0.0, 1.0]))
    for call in (
        lambda: net.predict(x),
        lambda: net.loss(x, t),
        lambda: net.numerical_gradient(x, t),
    ):
        assert_refuses_nonfinite(call, "x", value, (1,))
    np.testing.assert_array_equal(to_host(backend, net.W), W)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_train_refuses_nonfinite_data_by_name_not_as_divergence(backend, rng, value):
    (x, t), (x_test, t_test) = small_data(rng), small_data(rng, 20)
    onehot = np.eye(3)[t]
    cases = [
        (((with_bad(x, (7, 2), value), t), (x_test, t_test)), "x_train", (7, 2)),
        (((x, with_bad(onehot, (4, 1), value)), (x_test, t_test)), "t_train", (4, 1)),
        (((x, t), (with_bad(x_test, (0, 5), value), t_test)), "x_test", (0, 5)),
        (((x, t), (x_test, with_bad(np.eye(3)[t_test], (19, 0), value))), "t_test", (19, 0)),
    ]
    for data, name, index in cases:
        net = fastgrad.TwoLayerNet(6, 4, 3, seed=0, backend=backend)
        arrays = [array for split in data for array in split]
        before = snapshot(*arrays)
        with pytest.raises(ValueError) as caught:
            train(net, data, iters=5, batch_size=10, seed=0)
        message = str(caught.value)
        assert message.startswith(f"{name} holds {shown(value)} at index {list(index)}"), message
        assert "learning rate" not in message
        assert_intact(fastgrad.get_backend("numpy"), arrays, before)


def test_train_refuses_a_net_with_nonfinite_parameters(backend, rng):
    net = fastgrad.TwoLayerNet(6, 4, 3, seed=0, backend=backend)
    net.params["b2"][1] = np.nan
    with pytest.raises(
        ValueError,
        match=r"net.params\['b2'\] holds nan at index \[1\]; the net "
        "must start from finite parameters",
    ):
        train(net, (small_data(rng), small_data(rng, 20)), iters=5, batch_size=10)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_gradient_check_refuses_nonfinite_x_and_t_of_fastgrad_models(backend, rng, value):
    net = fastgrad.MultiLayerNet(6, [4], 3, seed=0, backend=backend)
    x, t = small_data(rng, 8)
    assert_refuses_nonfinite(
        lambda: fastgrad.gradient_check(net, backend.asarray(with_bad(x, (5, 0), value)), t),
        "x",
        value,
        (5, 0),
    )
    onehot = with_bad(np.eye(3)[t], (6, 2), value)
    assert_refuses_nonfinite(
        lambda: fastgrad.gradient_check(net, backend.asarray(x), backend.asarray(onehot)),
        "t",
        value,
        (6, 2),
    )


def test_finite_extremes_give_exact_limits_not_errors():
    # Rows spanning more than float64's range: x - max(x) overflows to -inf,
    # whose exp, 0, is the correctly rounded probability.
    np.testing.assert_array_equal(fastgrad.softmax(np.array([1e308, -1e308])), [1.0, 0.0])
    assert fastgrad.sigmoid(np.array([-1e308]))[0] == 0.0
    assert fastgrad.softmax_cross_entropy(np.array([[1e308, -1e308]]), np.array([0])) == 0.0


def test_losses_that_overflow_the_dtype_are_errors_not_inf():
    with pytest.raises(ValueError, match="mean_squared_error overflows float64"):
        fastgrad.mean_squared_error(np.array([1e200]), np.array([-1e200]))
    with pytest.raises(ValueError, match="softmax_cross_entropy overflows float64"):
        fastgrad.softmax_cross_entropy(np.array([[1e308, -1e308]]), np.array([1]))
    with pytest.raises(ValueError, match="cross_entropy_error overflows float64"):
        fastgrad.cross_entropy_error(np.array([[1e-300, 1.0]]), np.array([[1e308, 0.0]]))


# ------------------------------------------------------------ complex values
def test_complex_inputs_are_refused_everywhere(backend, rng):
    z = backend.asarray(np.array([[1.0 + 2.0j, 0.5, -1.0]]))
    real = backend.asarray(np.array([[0.2, 0.3, 0.5]]))
    calls = {f.__name__: (lambda f=f: f(z, backend=backend)) for f in ACTIVATIONS}
    calls.update(
        mse_y=lambda: fastgrad.mean_squared_error(z, real, backend=backend),
        mse_t=lambda: fastgrad.mean_squared_error(real, z, backend=backend),
        cee_t=lambda: fastgrad.cross_entropy_error(real, z, backend=backend),
        sce=lambda: fastgrad.softmax_cross_entropy(z, backend.asarray([1]), backend=backend),
        numerical_gradient=lambda: fastgrad.numerical_gradient(lambda a: 0.0, z, backend=backend),
        gradient_descent=lambda: fastgrad.gradient_descent(lambda a: 0.0, z, backend=backend),
        numerical_diff=lambda: fastgrad.numerical_diff(np.sin, 1.0 + 1.0j),
        simple_net=lambda: fastgrad.SimpleNet(backend=backend).predict(z[:, :2]),
    )
    net = fastgrad.MultiLayerNet(3, [2], 3, seed=0, backend=backend)
    for method in METHODS:
        calls[f"net.{method}"] = lambda m=method: call_method(net, m, z, backend.asarray([0]))
    calls["net.t"] = lambda: net.loss(real, z)
    before = snapshot(to_host(backend, z))
    for name, call in calls.items():
        with pytest.raises(
            TypeError,
            match=r"is complex \(complex128\); fastgrad computes with "
            "real numbers only",
        ):
            call()
        assert_intact(backend, [z], before)
    with pytest.raises(TypeError, match="x is complex"):
        fastgrad.sigmoid([1 + 1j])


def test_functions_of_x_returning_complex_values_are_refused():
    x = np.array([1.0, 2.0])
    with pytest.raises(TypeError, match=r"f\(x \+ h\) at index \[0\] returned a complex value"):
        fastgrad.numerical_gradient(lambda a: complex(a.sum(), 1.0), x)
    with pytest.raises(TypeError, match=r"returned a complex value"):
        fastgrad.numerical_gradient(lambda a: np.complex64(a.sum()), x)
    with pytest.raises(TypeError, match="batched f returned complex values"):
        fastgrad.numerical_gradient(lambda s: s.sum(axis=1) + 0j, x, batched=True)
    with pytest.raises(TypeError, match="returned a complex value"):
        fastgrad.numerical_diff(lambda a: a + 1j, 1.0)
    np.testing.assert_array_equal(x, [1.0, 2.0])


# ------------------------------------------------------------ empty batches
def test_losses_refuse_empty_batches_by_name(backend):
    empty = backend.asarray(np.zeros((0, 3)))
    no_labels = backend.asarray(np.zeros(0, dtype=np.int64))
    for call, name in (
        (lambda: fastgrad.mean_squared_error(empty, empty, backend=backend), "y"),
        (lambda: fastgrad.cross_entropy_error(empty, no_labels, backend=backend), "y"),
        (lambda: fastgrad.softmax_cross_entropy(empty, no_labels, backend=backend), "logits"),
        (lambda: fastgrad.softmax_cross_entropy(empty, empty, backend=backend), "logits"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} is empty \(shape \(0, 3\)\)"):
            call()
    with pytest.raises(ValueError, match=r"logits has shape \(2, 0\): no classes"):
        fastgrad.softmax_cross_entropy(np.zeros((2, 0)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"a softmax needs at least one class"):
        fastgrad.softmax(np.zeros((2, 0)), backend=backend)


def test_maps_are_exact_on_empty_arrays(backend):
    empty = backend.asarray(np.zeros((0, 4)))
    for function in ACTIVATIONS:
        assert to_host(backend, function(empty, backend=backend)).shape == (0, 4)
    grad = fastgrad.numerical_gradient(lambda a: 0.0, empty, backend=backend)
    assert to_host(backend, grad).shape == (0, 4)
    grad = fastgrad.numerical_gradient(
        lambda s: s.sum(axis=(1, 2)), empty, batched=True, backend=backend
    )
    assert to_host(backend, grad).shape == (0, 4)
    net = fastgrad.TwoLayerNet(4, 3, 2, seed=0, backend=backend)
    assert to_host(backend, net.predict(empty)).shape == (0, 2)


@pytest.mark.parametrize("method", METHODS[1:])
def test_model_methods_refuse_empty_batches(backend, method):
    for net in model_cases(backend):
        x = backend.asarray(np.zeros((0, 6)))
        t = backend.asarray(np.zeros(0, dtype=np.int64))
        with pytest.raises(ValueError, match=r"^x is empty \(shape \(0, 6\)\); a batch needs"):
            call_method(net, method, x, t)
    simple = fastgrad.SimpleNet(seed=0, backend=backend)
    with pytest.raises(ValueError, match=r"^x is empty"):
        simple.loss(backend.asarray(np.zeros((0, 2))), backend.asarray(np.zeros(0, dtype=int)))


def test_train_refuses_empty_training_and_test_sets(rng):
    x, t = small_data(rng)
    empty = (np.zeros((0, 6)), np.zeros(0, dtype=np.int64))
    for data, name in (((empty, (x, t)), "x_train"), (((x, t), empty), "x_test")):
        with pytest.raises(ValueError, match=rf"^{name} is empty \(shape \(0, 6\)\)"):
            train(fastgrad.TwoLayerNet(6, 4, 3, seed=0), data, iters=3)


# --------------------------------------------------- steps that do nothing
def named_step(message: str) -> float:
    return float(re.search(r"the smallest step that moves every element is (\S+) ", message)[1])


@pytest.mark.parametrize(
    "x, h",
    [
        (np.array([3.0, -2.0], dtype=np.float16), 1e-4),
        (np.array([1.0, 2048.0], dtype=np.float16), 0.5),
        (np.array([1e8, 1.0], dtype=np.float32), 1e-4),
        (np.array([1.0, 0.25]), 1e-17),
        (np.array([1e15, 3.0]), 1e-4),
        (np.array([[0.0, 1e300]]), 1e280),
    ],
    ids=["float16", "float16-large", "float32-large", "tiny-h", "float64-large", "huge"],
)
@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched"])
def test_steps_that_round_to_nothing_are_refused_naming_the_smallest_that_works(
    backend, x, h, batched
):
    def f(a):
        if batched:
            return a.reshape(len(a), -1).sum(axis=1)
        return float(a.astype(np.float64).sum())

    array = backend.asarray(x)
    before = snapshot(x)
    expected = re.escape(f"h={h} is too small for {x.dtype.name} x")
    with pytest.raises(ValueError, match=expected) as caught:
        fastgrad.numerical_gradient(f, array, h, batched=batched, backend=backend)
    assert_intact(backend, [array], before)
    needed = named_step(str(caught.value))
    largest = np.abs(x).max()
    # It moves every element, and a quarter of it leaves the largest where it is.
    assert np.all(x + x.dtype.type(needed) != x) and np.all(x - x.dtype.type(needed) != x)
    assert largest + x.dtype.type(needed / 4) == largest
    if x.dtype.itemsize < 8:
        with pytest.warns(PrecisionWarning):
            grad = fastgrad.numerical_gradient(f, array, needed, batched=batched, backend=backend)
    else:
        grad = fastgrad.numerical_gradient(f, array, needed, batched=batched, backend=backend)
    assert np.all(np.isfinite(to_host(backend, grad)))


def test_steps_the_dtype_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"h=100000.0 is not representable in float16"):
        fastgrad.numerical_gradient(lambda a: 0.0, np.ones(2, dtype=np.float16), h=1e5)
    with pytest.raises(ValueError, match=r"h=1e-50 is not representable in float32"):
        fastgrad.numerical_gradient(lambda a: 0.0, np.ones(2, dtype=np.float32), h=1e-50)


def test_numerical_diff_and_descent_refuse_steps_that_do_nothing():
    with pytest.raises(ValueError, match=r"h=0.0001 is too small for float64 x: x = 1e\+20"):
        fastgrad.numerical_diff(np.sin, 1e20)
    with pytest.raises(ValueError, match=r"too small for float16 x"):
        fastgrad.numerical_diff(np.sin, np.float16(3.0))
    with pytest.raises(ValueError, match=r"h=0.0001 is too small for float64 init_x"):
        fastgrad.gradient_descent(lambda a: float(a.sum()), np.array([1e20]))


def test_model_numerical_gradient_refuses_steps_that_do_not_move_the_parameters(backend, rng):
    x, t = small_data(rng, 5)
    for method in ("fast", "naive"):
        net = fastgrad.MultiLayerNet(6, [4], 3, seed=0, backend=backend)
        net.params["W2"][0, 1] = 1e15
        with pytest.raises(
            ValueError,
            match=r"h=0.0001 is too small for float64 params\['W2'\]: "
            r"params\['W2'\]\[0, 1\] = 1e\+15",
        ):
            net.numerical_gradient(x, t, method=method)
        with pytest.raises(ValueError, match=r"h=1e-20 is too small"):
            fastgrad.TwoLayerNet(6, 4, 3, seed=0, backend=backend).numerical_gradient(
                x, t, method=method, h=1e-20
            )


# ------------------------------------------------------------- divergence
def test_the_divergence_rule_at_its_boundaries():
    history = TrainingHistory(losses=[2.0])
    _check_losses(np.array([2.0 * DIVERGENCE_FACTOR]), 1, 0.1, history)  # exactly 100x: not yet
    with pytest.raises(
        TrainingDivergedError,
        match=r"iteration 3 is 200\.1, more than 100 "
        r"times the run's first loss 2 ",
    ) as caught:
        _check_losses(np.array([3.0, 2.0 * DIVERGENCE_FACTOR + 0.1]), 1, 0.5, history)
    assert caught.value.iteration == 3 and caught.value.history.losses == [2.0, 3.0]
    # A net that starts nearly trained: the floor of 1 sets the limit at 100.
    nearly_trained = TrainingHistory(losses=[0.01])
    _check_losses(np.array([99.0]), 1, 0.1, nearly_trained)
    with pytest.raises(TrainingDivergedError, match=r"iteration 2 is nan"):
        _check_losses(np.array([np.nan]), 1, 0.1, nearly_trained)
    with pytest.raises(TrainingDivergedError, match=r"iteration 1 is inf"):
        _check_losses(np.array([np.inf]), 0, 0.1, TrainingHistory())


def test_a_loss_that_explodes_stops_training(backend, rng):
    net = fastgrad.MultiLayerNet(6, [16, 16], 3, seed=0, backend=backend)
    data = (small_data(rng, 200), small_data(rng, 50))
    with pytest.raises(TrainingDivergedError) as caught:
        train(net, data, iters=100, batch_size=20, lr=1e3, seed=0)
    error = caught.value
    assert re.match(
        rf"training diverged: the batch loss of iteration {error.iteration} is \S+, more than "
        r"100 times the run's first loss .*; try a smaller learning rate than 1000.0$",
        str(error),
    ), str(error)
    assert error.iteration <= 5
    assert len(error.history.losses) == error.iteration - 1
    assert all(np.isfinite(error.history.losses))
    TrainingHistory.from_json(error.history.to_json())  # what the CLI saves


def test_a_loss_stuck_far_above_its_start_stops_training_at_the_epoch_end(rng):
    net = fastgrad.TwoLayerNet(6, 8, 3, seed=0)
    data = (small_data(rng, 200), small_data(rng, 50))
    with pytest.raises(TrainingDivergedError) as caught:
        train(net, data, iters=100, batch_size=20, lr=100.0, seed=0)
    error = caught.value
    assert re.match(
        rf"training diverged: the median batch loss of iterations \d+\.\.{error.iteration} is "
        rf"\S+, more than {SUSTAINED_DIVERGENCE_FACTOR:g} times the run's first loss",
        str(error),
    ), str(error)
    assert error.iteration % 10 == 0  # an epoch's end: 200 samples in batches of 20
    assert len(error.history.losses) == error.iteration


def test_noisy_but_converging_runs_are_not_stopped(backend, rng):
    data = (small_data(rng, 200), small_data(rng, 50))
    for net, lr in (
        (fastgrad.TwoLayerNet(6, 8, 3, seed=0, backend=backend), 5.0),
        (fastgrad.MultiLayerNet(6, [16, 16], 3, seed=0, backend=backend), 2.0),
    ):
        history = train(net, data, iters=200, batch_size=20, lr=lr, seed=0)
        assert len(history.losses) == 200


def test_the_cli_exits_non_zero_on_divergence_and_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "mini", "--iters", "30", "--lr", "1000", "--seed", "0"]
    status = main([*arguments, "--out", str(out)])
    assert status == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fastgrad: error:")]
    assert len(lines) == 1, captured.err
    assert "training diverged: the batch loss of iteration 2" in lines[0]
    assert f"wrote only {out / 'history.json'}" in lines[0]
    assert "no params.npz or training.png" in lines[0]
    assert "Traceback" not in captured.err
    assert sorted(path.name for path in out.iterdir()) == ["history.json"]
    saved = TrainingHistory.load(out / "history.json")
    assert saved.config["diverged"].startswith("training diverged")
    assert len(saved.losses) == 1


# --------------------------------------------------------- an f that moves x
def test_an_f_that_scales_x_in_place_is_an_error_and_x_is_restored(backend):
    x = backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]))

    def doubling(a):
        a *= 2
        return float(a.sum())

    with pytest.raises(RuntimeError, match=r"^f\(x \+ h\) changed x: x\[0, 0\] holds "):
        fastgrad.numerical_gradient(doubling, x, backend=backend)
    np.testing.assert_array_equal(to_host(backend, x), [[1.0, 2.0], [3.0, 4.0]])


def test_an_f_that_changes_another_element_once_is_an_error(backend):
    x = backend.asarray(np.arange(1000, dtype=np.float64).reshape(10, 100))
    calls = []

    def sneaky(a):
        calls.append(1)
        if len(calls) == 7:
            a[9, 99] += 1.0  # far from the perturbed element, and only once
        return float((a**2).sum())

    with pytest.raises(RuntimeError, match=r"changed x: x\[9, 99\] held 1000.0 but 999.0 before"):
        fastgrad.numerical_gradient(sneaky, x, backend=backend)
    np.testing.assert_array_equal(to_host(backend, x), np.arange(1000.0).reshape(10, 100))
    assert len(calls) <= 2 * 4 + 1  # found within the chunk of elements it happened in


def test_an_f_that_changes_x_transiently_is_fine(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0]))

    def borrowing(a):
        saved = a.copy()
        a[:] = 0.0
        a[:] = saved
        return float((a**2).sum())

    grad = fastgrad.numerical_gradient(borrowing, x, backend=backend)
    np.testing.assert_allclose(to_host(backend, grad), [2.0, 4.0, 6.0], rtol=1e-8)


def test_an_f_that_writes_x_in_forward_mode_is_an_error():
    x = np.array([1.0, 2.0])

    seen = []

    def first_call_writes(a):
        seen.append(1)
        if len(seen) == 1:
            a[1] = 5.0
        return float(a.sum())

    with pytest.raises(RuntimeError, match=r"^f\(x\) changed x: x\[1\] held 5.0 but 2.0"):
        fastgrad.numerical_gradient(first_call_writes, x, method="forward")
    np.testing.assert_array_equal(x, [1.0, 2.0])


def test_a_batched_f_that_writes_x_through_its_closure_is_an_error(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0, 4.0]))

    def closure_writer(stack):
        x[2] = -1.0
        return (stack**2).sum(axis=1)

    with pytest.raises(RuntimeError, match=r"f at elements 0\.\.1 changed x: x\[2\] held -1.0"):
        fastgrad.numerical_gradient(closure_writer, x, batched=True, chunk_size=2, backend=backend)
    np.testing.assert_array_equal(to_host(backend, x), [1.0, 2.0, 3.0, 4.0])


def test_a_batched_f_may_write_or_return_views_of_its_own_argument(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0]))

    def scribbling(stack):
        values = (stack**2).sum(axis=1)
        stack -= 1.0  # its own scratch: the -h stack is rebuilt from x
        return values

    grad = fastgrad.numerical_gradient(scribbling, x, batched=True, backend=backend)
    np.testing.assert_allclose(to_host(backend, grad), [2.0, 4.0, 6.0], rtol=1e-8)
    # A view of the +h stack, which the -h stack overwrites: copied first.
    first_column = fastgrad.numerical_gradient(
        lambda stack: stack[:, 0], x, batched=True, backend=backend
    )
    np.testing.assert_allclose(to_host(backend, first_column), [1.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_array_equal(to_host(backend, x), [1.0, 2.0, 3.0])


def test_a_batched_f_in_forward_mode_is_handed_a_copy_of_x_not_x(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0]))

    def scribbling(stack):
        values = (stack**2).sum(axis=1)
        stack[...] = -5.0  # its own argument, also in the unperturbed call f(x)
        return values

    grad = fastgrad.numerical_gradient(
        scribbling, x, method="forward", batched=True, backend=backend
    )
    np.testing.assert_allclose(to_host(backend, grad), [2.0, 4.0, 6.0], rtol=1e-3)
    np.testing.assert_array_equal(to_host(backend, x), [1.0, 2.0, 3.0])


def test_the_books_closure_over_a_model_is_not_mistaken_for_a_change(backend, rng):
    net = fastgrad.SimpleNet(seed=0, backend=backend)
    x, t = np.array([0.6, 0.9]), np.array([0.0, 0.0, 1.0])
    W = to_host(backend, net.W).copy()
    grad = fastgrad.numerical_gradient(lambda _: net.loss(x, t), net.W, backend=backend)
    assert to_host(backend, grad).shape == (2, 3)
    np.testing.assert_array_equal(to_host(backend, net.W), W)


# ------------------------------------------ large logits: no cancellation
LARGE_LOGIT = 1e5
# log(1 + e^-1 + e^-2 + e^-3): the loss of the largest of four logits one apart
LOG_PARTITION = math.log1p(math.exp(-1.0) + math.exp(-2.0) + math.exp(-3.0))


def large_logits(dtype: Any) -> np.ndarray:
    """Logits ~1e5, one apart: exactly representable in float32 and float64."""
    top = LARGE_LOGIT
    rows = [[top, top - 1, top - 2, top - 3], [top - 3, top, top - 1, top - 2]]
    return np.array(rows, dtype=dtype)


def close_to_exact(got: Any, exact: float, dtype: Any) -> None:
    # A few ulp of the loss itself; log-sum-exp minus z_label, taken in that
    # order, loses ~1e-11 of it to cancellation against the logits of 1e5.
    assert abs(float(got) - exact) <= 8 * float(np.finfo(dtype).eps) * exact, (float(got), exact)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_of_large_logits_does_not_cancel(backend, dtype):
    z = backend.asarray(large_logits(dtype))
    labels = backend.asarray(np.array([0, 2]))
    onehot = backend.asarray(np.eye(4, dtype=dtype)[[0, 2]])
    before = snapshot(to_host(backend, z))
    # row 0 picks the largest logit, row 1 one that is 1 below it
    exact = (LOG_PARTITION + (1.0 + LOG_PARTITION)) / 2
    for targets in (labels, onehot):
        close_to_exact(fastgrad.softmax_cross_entropy(z, targets, backend=backend), exact, dtype)
        loss, dlogits = backend.softmax_cross_entropy_with_grad(z, targets)
        close_to_exact(loss, exact, dtype)
        assert np.isfinite(to_host(backend, dlogits)).all()
    assert_intact(backend, [z], before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "hidden, activation", [([5], "sigmoid"), ([5, 4], "relu")], ids=["chapter", "deeper"]
)
def test_the_models_losses_of_large_logits_do_not_cancel(backend, rng, dtype, hidden, activation):
    # A zero last layer makes the logits its biases: ~1e5, one apart.
    net = fastgrad.MultiLayerNet(6, hidden, 4, activation, seed=0, dtype=dtype, backend=backend)
    last = len(hidden) + 1
    net.params[f"W{last}"][...] = 0
    net.params[f"b{last}"][...] = backend.asarray(large_logits(dtype)[0])
    x, t = rng.random((2, 6)), np.array([0, 2])
    exact = (LOG_PARTITION + (2.0 + LOG_PARTITION)) / 2
    close_to_exact(net.loss(x, t), exact, dtype)
    X, labels = net.prepare(x, t)
    steps = backend.asarray(np.array([[0, 1]]))
    for gradient in ("backprop", "numerical"):
        # lr = 0: every step measures the loss of the same parameters
        losses = to_host(backend, net.sgd_steps(X, labels, steps, 0.0, gradient))
        close_to_exact(losses[0], exact, dtype)


# ------------------------------- large steps: the fast kernels as the naive loop
def mini_batch() -> tuple[np.ndarray, np.ndarray]:
    (x_train, t_train), _ = fastgrad.load_mnist(subset="mini", dtype=np.float64)
    return x_train[:5], t_train[:5]


LARGE_STEP_NETS = {
    # the chapter's kind of net (the Numba backend's chapter kernels)
    "chapter": ((784, 4, 10), "sigmoid", 1.0),
    "relu-deep": ((784, 4, 3, 10), "relu", 1.0),
    # logits hundreds apart: softmax probabilities that underflow to 0
    "spread-logits": ((784, 4, 10), "tanh", 1000.0),
}


@pytest.mark.parametrize("h", [1e1, 1e2, 1e3])
@pytest.mark.parametrize("case", list(LARGE_STEP_NETS))
def test_the_fast_numerical_gradient_agrees_with_the_naive_loop_at_large_steps(backend, case, h):
    (sizes, activation, last_scale) = LARGE_STEP_NETS[case]
    net = fastgrad.MultiLayerNet(
        sizes[0], list(sizes[1:-1]), sizes[-1], activation, seed=0, backend=backend
    )
    generator = np.random.default_rng(5)
    for name in net.params:
        values = 0.5 * generator.standard_normal(tuple(net.params[name].shape))
        net.params[name][...] = backend.asarray(values)
    net.params[f"W{len(sizes) - 1}"][...] *= last_scale
    x, t = mini_batch()
    params = {name: to_host(backend, array).copy() for name, array in net.params.items()}
    fast = net.numerical_gradient(x, t, h=h)
    naive = net.numerical_gradient(x, t, method="naive", h=h)
    for name, expected in naive.items():
        expected = to_host(backend, expected)
        got = to_host(backend, fast[name])
        scale = 1.0 + float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale, err_msg=name)
        np.testing.assert_array_equal(to_host(backend, net.params[name]), params[name])


# ---------------------------------------------------------- unclear errors
def test_nan_learning_rates_and_other_bad_descent_settings():
    for lr in (float("nan"), float("inf"), 0.0, -0.1, True, "0.1"):
        with pytest.raises(
            ValueError,
            match=rf"lr must be a positive finite number, got "
            rf"{re.escape(repr(lr))}",
        ):
            fastgrad.gradient_descent(lambda a: float(a.sum()), np.ones(2), lr=lr)
    with pytest.raises(ValueError, match=r"step_num must be a non-negative integer, got True"):
        fastgrad.gradient_descent(lambda a: 0.0, np.ones(2), step_num=True)


def test_a_diverging_descent_says_so_instead_of_returning_a_frozen_point():
    start = np.array([-3.0, 4.0])
    with pytest.raises(
        FloatingPointError,
        match=r"^gradient_descent diverged at step \d+ of 100 "
        r"\(lr=10.0\): h=0.0001 is too small.*or try a smaller lr$",
    ):
        fastgrad.gradient_descent(lambda a: float((a**2).sum()), start, lr=10.0)
    with pytest.raises(
        FloatingPointError,
        match=r"diverged at step 1 of 50 \(lr=1e\+308\): "
        r"x\[0\] became inf; try a smaller lr",
    ):
        fastgrad.gradient_descent(lambda a: float((a**2).sum()), start, lr=1e308, step_num=50)
    np.testing.assert_array_equal(start, [-3.0, 4.0])


@pytest.mark.parametrize(
    "sizes, name, shown_value",
    [
        ((6, True, 3), "hidden_size", "True"),
        ((True, 4, 3), "input_size", "True"),
        ((6, 4, False), "output_size", "False"),
        ((6, np.True_, 3), "hidden_size", "np.True_"),
    ],
)
def test_booleans_for_layer_sizes_are_named(sizes, name, shown_value):
    with pytest.raises(
        ValueError,
        match=rf"^{name} must be a positive integer, got "
        rf"{re.escape(shown_value)} \(a bool, not a size\)$",
    ):
        fastgrad.TwoLayerNet(*sizes)


def test_a_npy_file_renamed_to_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "params.npz"
    np.save(tmp_path / "params.npy", np.arange(6.0).reshape(2, 3))
    (tmp_path / "params.npy").rename(path)
    content = path.read_bytes()
    net = fastgrad.TwoLayerNet(2, 3, 2, seed=0)
    params_before = {name: array.copy() for name, array in net.params.items()}
    for target in (None, net):
        with pytest.raises(
            ValueError,
            match=rf"^{re.escape(str(path))}: a single \.npy array "
            r"\(shape \(2, 3\), dtype float64\), not a \.npz parameter file",
        ):
            load_params(path, target)
    assert path.read_bytes() == content
    for name, array in params_before.items():
        np.testing.assert_array_equal(net.params[name], array)
    # The other way round still loads: a .npz whatever it is called.
    saved = save_params(net, tmp_path / "params.npz.npy")
    assert load_params(saved).architecture == net.architecture


@pytest.mark.parametrize("size", [np.int64(2), np.int32(2), np.uint8(2), 2])
def test_numpy_integers_are_integers_for_chunk_size(size):
    x = np.array([1.0, 2.0, 3.0])
    got = fastgrad.numerical_gradient(
        lambda s: (s**2).sum(axis=1), x, batched=True, chunk_size=size
    )
    np.testing.assert_allclose(got, [2.0, 4.0, 6.0], rtol=1e-8)
    with pytest.raises(ValueError, match="elements_per_task sizes Dask tasks; it needs client="):
        fastgrad.numerical_gradient(lambda a: 0.0, x, elements_per_task=size)


@pytest.mark.parametrize("size", [0, -1, 2.0, True, np.True_, "2", np.int64(0)])
def test_bad_chunk_sizes_are_still_refused(size):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        fastgrad.numerical_gradient(
            lambda s: s.sum(axis=1), np.ones(2), batched=True, chunk_size=size
        )


# ------------------------------------------------------ use_backend lifetime
def inside_a_block(name: str = "numba"):
    with fastgrad.use_backend(name):
        yield fastgrad.get_backend().name
        yield fastgrad.get_backend().name


@pytest.fixture
def numba_backend():
    from tests.conftest import backend_or_skip

    return backend_or_skip("numba")


def test_a_block_in_a_generator_closed_in_another_thread_leaves_nothing_behind(numba_backend):
    generator = inside_a_block()
    assert next(generator) == "numba"
    errors = []

    def close() -> None:
        try:
            generator.close()
        except Exception as error:  # pragma: no cover - the failure this test guards against
            errors.append(error)

    worker = threading.Thread(target=close)
    worker.start()
    worker.join()
    assert errors == []
    assert fastgrad.get_backend().name == "numpy"


def test_a_block_in_a_generator_closed_inside_a_block_of_the_caller(numba_backend):
    generator = inside_a_block()
    next(generator)
    with fastgrad.use_backend("numpy"):
        generator.close()
        assert fastgrad.get_backend().name == "numpy"
    assert fastgrad.get_backend().name == "numpy"
    with fastgrad.use_backend("numba"):
        assert fastgrad.get_backend().name == "numba"
    assert fastgrad.get_backend().name == "numpy"


def test_a_block_in_an_abandoned_generator_ends_when_it_is_collected(numba_backend):
    generator = inside_a_block()
    next(generator)
    del generator
    gc.collect()
    assert fastgrad.get_backend().name == "numpy"


def test_a_block_closed_in_a_copied_context(numba_backend):
    generator = inside_a_block()
    next(generator)
    contextvars.copy_context().run(generator.close)
    assert fastgrad.get_backend().name == "numpy"


def test_the_documented_limit_a_suspended_block_is_in_force_for_the_caller(numba_backend):
    # Python gives generators no context of their own (see use_backend's docstring).
    generator = inside_a_block()
    next(generator)
    assert fastgrad.get_backend().name == "numba"
    assert next(generator) == "numba"
    with pytest.raises(StopIteration):
        next(generator)
    assert fastgrad.get_backend().name == "numpy"


def test_nested_blocks_restore_in_order(numba_backend):
    with fastgrad.use_backend("numba"):
        with fastgrad.use_backend("numpy"):
            assert fastgrad.get_backend().name == "numpy"
        assert fastgrad.get_backend().name == "numba"
        with pytest.raises(KeyError), fastgrad.use_backend("numpy"):
            raise KeyError("inside")
        assert fastgrad.get_backend().name == "numba"
    assert fastgrad.get_backend().name == "numpy"
