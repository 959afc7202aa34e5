"""Every bad input gets a clear error, and never corrupts the caller's data."""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad
from fastgrad import BackendUnavailableError

Y = np.array([[0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])


def test_numerical_gradient_refuses_integer_arrays():
    x = np.array([3, 4])
    with pytest.raises(TypeError, match=r"floating-point x, got dtype int64.*astype"):
        fastgrad.numerical_gradient(lambda a: float((a**2).sum()), x)
    np.testing.assert_array_equal(x, [3, 4])


@pytest.mark.parametrize(
    "bad, message",
    [(np.array([True, False]), "floating-point"), (np.array([1 + 2j]), "x is complex")],
)
def test_numerical_gradient_refuses_other_non_float_dtypes(bad, message):
    with pytest.raises(TypeError, match=message):
        fastgrad.numerical_gradient(lambda a: 0.0, bad)


@pytest.mark.parametrize("h", [0, -1e-4, float("nan"), float("inf"), "1e-4"])
def test_bad_step(h):
    with pytest.raises(ValueError, match="h must be a positive finite step"):
        fastgrad.numerical_gradient(lambda a: 0.0, np.zeros(2), h=h)
    with pytest.raises(ValueError, match="h must be a positive finite step"):
        fastgrad.numerical_diff(lambda a: a, 1.0, h=h)


def test_bad_method_and_chunk_size():
    with pytest.raises(ValueError, match="method must be one of"):
        fastgrad.numerical_gradient(lambda a: 0.0, np.zeros(2), method="backward")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        fastgrad.numerical_gradient(lambda a: 0.0, np.zeros(2), batched=True, chunk_size=0)


def test_f_returning_an_array_or_nan():
    x = np.ones(3)
    with pytest.raises(TypeError, match="must return a scalar"):
        fastgrad.numerical_gradient(lambda a: a * 2, x)
    np.testing.assert_array_equal(x, np.ones(3))
    with pytest.raises(ValueError, match="returned NaN"):
        fastgrad.numerical_gradient(lambda a: float("nan"), x)
    np.testing.assert_array_equal(x, np.ones(3))


def test_batched_f_with_wrong_output_shape():
    with pytest.raises(
        ValueError, match=r"batched f must map an array of shape \(2, 2\) to shape \(2,\)"
    ):
        fastgrad.numerical_gradient(lambda s: s.sum(), np.zeros(2), batched=True)


def test_read_only_x():
    x = np.zeros(3)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastgrad.numerical_gradient(lambda a: 0.0, x)
    assert fastgrad.numerical_gradient(lambda s: s.sum(axis=1), x, batched=True).shape == (3,)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        fastgrad.mean_squared_error(Y, np.array([1, 2]))
    with pytest.raises(ValueError, match="fits neither one-hot targets"):
        fastgrad.cross_entropy_error(Y, np.array([1, 2, 0]))
    with pytest.raises(ValueError, match=r"1-D .* or 2-D"):
        fastgrad.cross_entropy_error(np.ones((2, 2, 2)), np.ones((2, 2, 2)))


def test_labels_out_of_range_and_not_integers():
    with pytest.raises(ValueError, match="label 3, out of range for 3 classes"):
        fastgrad.cross_entropy_error(Y, np.array([0, 3]))
    with pytest.raises(ValueError, match="label -1"):
        fastgrad.softmax_cross_entropy(Y, np.array([-1, 0]))
    with pytest.raises(TypeError, match="integer class labels"):
        fastgrad.cross_entropy_error(Y, np.array([0.0, 1.0]))


def test_integer_probabilities_refused():
    with pytest.raises(TypeError, match=r"y must be a floating-point array, got dtype int64"):
        fastgrad.cross_entropy_error(np.array([[0, 1]]), np.array([1]))


def test_nan_in_loss_inputs():
    bad = Y.copy()
    bad[0, 0] = np.nan
    for loss in (fastgrad.mean_squared_error, fastgrad.cross_entropy_error):
        with pytest.raises(ValueError, match=r"y holds nan at index \[0, 0\]"):
            loss(bad, np.eye(3)[[0, 1]])
    with pytest.raises(ValueError, match=r"logits holds nan at index \[0, 0\]"):
        fastgrad.softmax_cross_entropy(bad, np.array([0, 1]))
    with pytest.raises(ValueError, match="negative values"):
        fastgrad.cross_entropy_error(np.array([[-0.5, 1.5]]), np.array([0]))


def test_unknown_backend():
    with pytest.raises(
        BackendUnavailableError,
        match=r"unknown backend 'torch'; choose one of 'numpy', 'numba', 'cupy'",
    ):
        fastgrad.get_backend("torch")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        fastgrad.TwoLayerNet(2, 2, 2, backend="tensorflow")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        fastgrad.sigmoid(np.zeros(2), backend="jax")
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_model_input_errors():
    net = fastgrad.TwoLayerNet(4, 3, 2, seed=0)
    x = np.ones((5, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\)"):
        net.loss(np.ones((5, 3)), np.zeros(5, dtype=int))
    with pytest.raises(TypeError, match="x must be a floating-point array, got dtype uint8"):
        net.predict(np.ones((5, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="x holds 5 samples but t holds 4"):
        net.loss(x, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="not one-hot"):
        net.accuracy(x, np.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="label 2, out of range for 2 classes"):
        net.gradient(x, np.array([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="method must be one of"):
        net.numerical_gradient(x, np.zeros(5, dtype=int), method="slow")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        fastgrad.TwoLayerNet(4, 0, 2)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastgrad.TwoLayerNet(4, 3, 2, dtype=np.int32)


def test_model_methods_leave_inputs_and_params_alone():
    net = fastgrad.TwoLayerNet(4, 3, 2, seed=0)
    x = np.random.default_rng(0).random((5, 4))
    t = np.array([0, 1, 1, 0, 1])
    x_before, t_before = x.copy(), t.copy()
    params_before = {k: v.copy() for k, v in net.params.items()}
    net.numerical_gradient(x, t, method="naive")
    net.numerical_gradient(x, t)
    net.gradient(x, t)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(t, t_before)
    for name, value in params_before.items():
        np.testing.assert_array_equal(net.params[name], value)


BAD_MULTILAYER_ARGUMENTS = [
    ("input_size", 0),
    ("input_size", -3),
    ("input_size", 2.5),
    ("input_size", True),
    ("input_size", "13"),
    ("output_size", 0),
    ("output_size", None),
    ("hidden_size_list", [5, 0]),
    ("hidden_size_list", [5, 2.0]),
    ("hidden_size_list", 5),
    ("hidden_size_list", "55"),
    ("hidden_size_list", None),
    ("activation", "softmax"),
    ("activation", "ReLU"),
    ("activation", None),
    ("weight_decay_lambda", -0.1),
    ("weight_decay_lambda", float("nan")),
    ("weight_decay_lambda", float("inf")),
    ("weight_decay_lambda", "0.1"),
    ("weight_decay_lambda", True),
    ("weight_init_std", "gaussian"),
    ("weight_init_std", ""),
    ("weight_init_std", 0),
    ("weight_init_std", -0.01),
    ("weight_init_std", float("nan")),
    ("weight_init_std", None),
    ("weight_init_std", True),
]


@pytest.mark.parametrize(
    "argument, value",
    BAD_MULTILAYER_ARGUMENTS,
    ids=[f"{a}={v!r}" for a, v in BAD_MULTILAYER_ARGUMENTS],
)
def test_multilayer_net_arguments_are_checked_by_name(argument, value):
    settings = {
        "input_size": 13,
        "hidden_size_list": [5, 4],
        "output_size": 3,
        "activation": "relu",
        "weight_init_std": "relu",
        "weight_decay_lambda": 0.0,
        argument: value,
    }
    # A bad hidden size is named by its place in the list.
    named, shown = (f"{argument}[1]", value[1]) if isinstance(value, list) else (argument, value)
    with pytest.raises(ValueError) as caught:
        fastgrad.MultiLayerNet(**settings)
    message = str(caught.value)
    assert message.startswith(f"{named} must be"), message
    assert f"got {shown!r}" in message, message


def test_multilayer_net_method_arguments():
    net = fastgrad.MultiLayerNet(4, [3, 3], 2, seed=0)
    x, t = np.ones((5, 4)), np.array([0, 1, 1, 0, 1])
    with pytest.raises(ValueError, match="method must be one of"):
        net.numerical_gradient(x, t, method="central")
    for h in (0, -1e-4, float("nan"), True):
        with pytest.raises(ValueError, match="h must be a positive finite step"):
            net.numerical_gradient(x, t, h=h)
    X, labels = net.prepare(x, t)
    with pytest.raises(ValueError, match="gradient must be 'backprop' or 'numerical'"):
        net.sgd_steps(X, labels, np.zeros((1, 2), dtype=np.intp), 0.1, "magic")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\)"):
        net.predict(np.ones((5, 3)))
    with pytest.raises(ValueError, match="label 2, out of range for 2 classes"):
        net.loss(x, np.array([0, 1, 2, 0, 1]))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastgrad.MultiLayerNet(4, [3], 2, dtype=np.float16)


def test_deep_net_methods_leave_inputs_and_params_alone():
    net = fastgrad.MultiLayerNet(4, [3, 3, 2], 2, "tanh", weight_decay_lambda=0.1, seed=0)
    x = np.random.default_rng(0).random((5, 4))
    t = np.array([0, 1, 1, 0, 1])
    x_before, t_before = x.copy(), t.copy()
    params_before = {k: v.copy() for k, v in net.params.items()}
    net.numerical_gradient(x, t, method="naive")
    net.numerical_gradient(x, t)
    net.gradient(x, t)
    net.loss(x, t)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(t, t_before)
    for name, value in params_before.items():
        np.testing.assert_array_equal(net.params[name], value)
