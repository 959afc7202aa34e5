"""The gradient checker on models written by hand, as the book's readers write them.

The layered network below is written here from scratch in the style of the
book's chapter 5 (``Affine``, ``Relu``, ``Sigmoid``, ``SoftmaxWithLoss``
objects holding references to the parameter arrays), so that the checker is
tested on code it has never seen, including backprop bugs injected on purpose.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import fastgrad
from fastgrad.testing import assert_function_gradients_close, assert_gradients_close
from tests.conftest import mnist_like, to_host


# ------------------------------------------------------- a network written by hand
class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout):
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


class Relu:
    def forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout = dout.copy()
        dout[self.mask] = 0
        return dout


class Sigmoid:
    def forward(self, x):
        self.out = 1 / (1 + np.exp(-x))
        return self.out

    def backward(self, dout):
        return dout * (1.0 - self.out) * self.out


class SoftmaxWithLoss:
    def forward(self, x, t):
        shifted = x - x.max(axis=1, keepdims=True)
        self.y = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        self.t = t
        batch_size = x.shape[0]
        log_y = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_y[np.arange(batch_size), t].sum() / batch_size

    def backward(self):
        batch_size = self.t.shape[0]
        dx = self.y.copy()
        dx[np.arange(batch_size), self.t] -= 1
        return dx / batch_size


class HandNet:
    """Affine-activation-...-Affine-SoftmaxWithLoss; layers keep references to ``params``."""

    def __init__(self, sizes, activation="relu", dtype=np.float64, seed=0, decay=0.0, bug=None):
        rng = np.random.default_rng(seed)
        self.params = {}
        self.layers = []
        self.decay = decay
        self.bug = bug
        for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            W = (np.sqrt(2.0 / fan_in) * rng.standard_normal((fan_in, fan_out))).astype(dtype)
            b = (0.1 * rng.standard_normal(fan_out)).astype(dtype)
            self.params[f"W{k}"], self.params[f"b{k}"] = W, b
            self.layers.append(Affine(W, b))
            if k < len(sizes) - 1:
                self.layers.append(Relu() if activation == "relu" else Sigmoid())
        self.last = SoftmaxWithLoss()

    def loss(self, x, t):
        return self._forward(x, t)

    def _forward(self, x, t):
        for layer in self.layers:
            x = layer.forward(x)
        loss = self.last.forward(x, t)
        if self.decay:
            loss += sum(0.5 * self.decay * np.sum(W**2) for k, W in self.params.items() if "W" in k)
        return loss

    def gradient(self, x, t):
        self._forward(x, t)
        dout = self.last.backward()
        if self.bug == "softmax off by one":
            dout = dout.copy()
            dout[np.arange(len(t)), (t + 1) % dout.shape[1]] -= 1 / len(t)
        for layer in reversed(self.layers):
            if self.bug == "relu mask ignored" and isinstance(layer, Relu):
                continue
            dout = layer.backward(dout)
        grads = {}
        affines = [layer for layer in self.layers if isinstance(layer, Affine)]
        for k, layer in enumerate(affines, start=1):
            grads[f"W{k}"] = layer.dW + (0.0 if self.bug == "decay forgotten" else self.decay) * (
                layer.W
            )
            grads[f"b{k}"] = layer.db
        return _inject(grads, self.bug)


def _inject(grads, bug):
    grads = {name: grad.copy() for name, grad in grads.items()}
    if bug == "one wrong element":
        grads["W1"][17 % grads["W1"].shape[0], 3] += 0.5 * np.abs(grads["W1"]).max() + 1e-3
    elif bug == "bias only":
        grads["b2"] *= 1.5
    elif bug == "sign of one weight":
        grads["W2"] = -grads["W2"]
    elif bug == "batch mean twice":
        for name in grads:
            grads[name] = grads[name] / 3.0
    elif bug == "bias as a zero":
        grads["b1"] = np.zeros_like(grads["b1"])
    return grads


def batch(sizes, n=4, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, sizes[0])), rng.integers(0, sizes[-1], n)


SMALL = (12, 9, 7, 5)


# ------------------------------------------------------------------ correct models
@pytest.mark.parametrize("mode", ["full", "sampled", "fast"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_correct_hand_written_net_passes_in_every_mode(mode, activation, dtype):
    net = HandNet(SMALL, activation, dtype=dtype, decay=0.05)
    x, t = batch(SMALL)
    report = fastgrad.gradient_check(net, x.astype(dtype), t, mode=mode)
    assert report.passed, str(report)
    assert report.mode == mode and report.dtype == np.dtype(dtype).name
    assert [check.name for check in report.parameters] == list(net.params)
    if dtype == np.float32:
        assert "own precision" in str(report)


def test_the_default_mode_follows_the_size_and_the_report_says_which_ran():
    net = HandNet(SMALL)
    x, t = batch(SMALL)
    assert fastgrad.gradient_check(net, x, t).mode == "full"
    big = HandNet((400, 260, 10))  # 106,870 parameters
    assert fastgrad.gradient_check(big, *batch((400, 260, 10), n=2)).mode == "fast"
    own = fastgrad.MultiLayerNet(400, [260], 10, seed=0)
    report = fastgrad.gradient_check(own, *batch((400, 260, 10), n=2))
    assert report.mode == "full" and report.passed and report.difference_dtype == "float64"


def test_fast_mode_costs_a_few_losses_whatever_the_size():
    sizes = (784, 100, 10)
    net = HandNet(sizes, "sigmoid")
    x, t = mnist_like(100, 784), np.arange(100) % 10
    calls = {"gradient": 0}
    real_gradient = net.gradient

    def counted(x, t):
        calls["gradient"] += 1
        return real_gradient(x, t)

    net.gradient = counted
    report = fastgrad.gradient_check(net, x, t, mode="fast")
    assert report.passed, str(report)
    assert report.loss_evaluations <= 40 and calls["gradient"] == 1


# ------------------------------------------------------------------- injected bugs
BUGS = [
    "one wrong element",
    "bias only",
    "sign of one weight",
    "batch mean twice",
    "bias as a zero",
    "relu mask ignored",
    "softmax off by one",
    "decay forgotten",
]
#: The parameters each bug makes wrong (the report must name exactly these).
WRONG = {
    "one wrong element": ["W1"],
    "bias only": ["b2"],
    "sign of one weight": ["W2"],
    "batch mean twice": ["W1", "b1", "W2", "b2", "W3", "b3"],
    "bias as a zero": ["b1"],
    "relu mask ignored": ["W1", "b1", "W2", "b2"],
    "softmax off by one": ["W1", "b1", "W2", "b2", "W3", "b3"],
    "decay forgotten": ["W1", "W2", "W3"],
}


@pytest.mark.parametrize("bug", BUGS)
def test_full_mode_catches_every_injected_bug_and_names_the_parameter(bug):
    sizes = (12, 9, 7, 5)
    net = HandNet(sizes, decay=0.1, bug=bug)
    x, t = batch(sizes, n=6)
    report = fastgrad.gradient_check(net, x, t, mode="full")
    assert not report.passed
    assert report.failed == WRONG[bug], str(report)
    if bug == "one wrong element":
        assert report.parameters[0].worst_index == (17 % sizes[0], 3)


@pytest.mark.parametrize("bug", [b for b in BUGS if b != "one wrong element"])
def test_fast_mode_catches_every_bug_that_moves_a_directional_derivative(bug):
    sizes = (12, 9, 7, 5)
    net = HandNet(sizes, decay=0.1, bug=bug)
    x, t = batch(sizes, n=6)
    report = fastgrad.gradient_check(net, x, t, mode="fast")
    assert not report.passed and set(report.failed) <= set(WRONG[bug]), str(report)
    # a failing parameter is localised, so the report still names an element
    assert all(c.worst_index for c in report.parameters if not c.passed)


def test_one_wrong_element_among_forty_thousand():
    sizes = (200, 200, 10)  # 42,210 parameters
    net = HandNet(sizes, "sigmoid", bug="one wrong element")
    x, t = batch(sizes, n=3)
    report = fastgrad.gradient_check(net, x, t)
    assert report.mode == "full" and report.failed == ["W1"], str(report)
    check = report.parameters[0]
    assert check.worst_index == (17, 3) and check.checked == 40_000


def test_a_float32_model_fails_when_wrong_under_the_defaults():
    net = HandNet(SMALL, dtype=np.float32, bug="bias only")
    x, t = batch(SMALL)
    report = fastgrad.gradient_check(net, x.astype(np.float32), t)
    assert report.failed == ["b2"], str(report)


# -------------------------------------------------------------------------- kinks
def test_relu_pre_activations_at_and_near_zero_are_kinks_not_failures():
    sizes = (6, 5, 3)
    net = HandNet(sizes, "relu")
    x, t = batch(sizes, n=4)
    # Put unit 0 of sample 0 exactly at zero and unit 1 of sample 1 just above it.
    pre = x @ net.params["W1"] + net.params["b1"]
    net.params["b1"][0] -= pre[0, 0]
    net.params["b1"][1] -= pre[1, 1] - 1e-9
    pre = x @ net.params["W1"] + net.params["b1"]
    assert abs(pre[0, 0]) < 1e-15 and 0 < pre[1, 1] < 1e-8
    report = fastgrad.gradient_check(net, x, t)
    assert report.passed, str(report)
    assert report.kinks > 0 and "kink" in str(report)
    assert report.parameters[1].kinks >= 1  # b1: both units sit at a kink


def test_own_relu_model_at_a_kink_passes_with_the_kink_reported():
    net = fastgrad.MultiLayerNet(6, [5], 3, activation="relu", seed=0)
    x, t = batch((6, 5, 3), n=4)
    pre = x @ net.params["W1"] + net.params["b1"]
    net.params["b1"][2] -= pre[3, 2]
    report = fastgrad.gradient_check(net, x, t)
    assert report.passed and report.kinks >= 1, str(report)


# ------------------------------------------------------- restoring the parameters
def test_params_are_restored_bytewise_also_when_loss_raises_midway():
    net = HandNet(SMALL)
    before = {name: array.tobytes() for name, array in net.params.items()}
    ids = {name: id(array) for name, array in net.params.items()}
    x, t = batch(SMALL)
    real_loss = net.loss
    calls = {"n": 0}

    def flaky(x, t):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("the simulator crashed")
        return real_loss(x, t)

    net.loss = flaky
    with pytest.raises(RuntimeError, match="simulator crashed"):
        fastgrad.gradient_check(net, x, t)
    assert {name: array.tobytes() for name, array in net.params.items()} == before
    assert {name: id(array) for name, array in net.params.items()} == ids
    net.loss = real_loss
    report = fastgrad.gradient_check(net, x, t, mode="fast")
    assert report.passed
    assert {name: array.tobytes() for name, array in net.params.items()} == before


# ------------------------------------------------------ report, errors, functional
def test_report_reads_as_a_table_and_as_html():
    report = fastgrad.gradient_check(HandNet(SMALL, bug="bias only"), *batch(SMALL))
    text = str(report)
    assert text.splitlines()[0].endswith("FAIL: b2")
    assert "worst" in text and "b2[" in text and "±" in text
    assert "<table>" in report._repr_html_()
    assert not report and report.max_abs_diff > 0


def test_raise_on_failure_and_the_pytest_assertion():
    net = HandNet(SMALL, bug="bias only")
    x, t = batch(SMALL)
    with pytest.raises(fastgrad.GradientCheckError) as caught:
        fastgrad.gradient_check(net, x, t, raise_on_failure=True)
    assert caught.value.report.failed == ["b2"] and "b2" in str(caught.value)
    with pytest.raises(AssertionError):
        assert_gradients_close(net, x, t)
    assert assert_gradients_close(HandNet(SMALL), x, t).passed


def test_check_gradients_on_a_function_of_a_dict_or_an_array():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5, 4))
    params = {"w": rng.standard_normal(4), "c": np.array([0.3])}

    def f():
        return float(np.sum(np.tanh(A @ params["w"] + params["c"]) ** 2))

    def grads():
        z = np.tanh(A @ params["w"] + params["c"])
        dz = 2 * z * (1 - z**2)
        return {"w": A.T @ dz, "c": np.array([dz.sum()])}

    for mode in ("full", "sampled", "fast"):
        assert fastgrad.check_gradients(f, params, grads(), mode=mode).passed
    wrong = grads()
    wrong["c"] = wrong["c"] * 2
    assert fastgrad.check_gradients(f, params, wrong).failed == ["c"]
    w = params["w"]
    assert assert_function_gradients_close(lambda: float(np.sum(w**4)), w, 4 * w**3).passed


@pytest.mark.parametrize(
    "model_change, error, match",
    [
        (
            lambda net: net.params.__setitem__("W1", net.params["W1"].astype(int)),
            TypeError,
            "dtype",
        ),
        (lambda net: setattr(net, "gradient", lambda x, t: {"W1": 0}), ValueError, "keys"),
        (
            lambda net: setattr(net, "gradient", lambda x, t: {k: np.zeros(3) for k in net.params}),
            ValueError,
            "shape",
        ),
        (lambda net: setattr(net, "loss", lambda x, t: np.ones(3)), TypeError, "scalar"),
        (lambda net: setattr(net, "loss", lambda x, t: float("nan")), ValueError, "nan"),
        (lambda net: setattr(net, "params", [1, 2]), TypeError, "dict"),
    ],
    ids=["integer params", "missing keys", "wrong shapes", "non-scalar loss", "NaN loss", "list"],
)
def test_bad_models_get_one_clear_error(model_change, error, match):
    net = HandNet(SMALL)
    model_change(net)
    with pytest.raises(error, match=match):
        fastgrad.gradient_check(net, *batch(SMALL))


def test_bad_options_and_objects():
    net = HandNet(SMALL)
    x, t = batch(SMALL)
    with pytest.raises(ValueError, match="mode"):
        fastgrad.gradient_check(net, x, t, mode="quick")
    with pytest.raises(ValueError, match="h must"):
        fastgrad.gradient_check(net, x, t, h=-1.0)
    with pytest.raises(ValueError, match="k must"):
        fastgrad.gradient_check(net, x, t, mode="sampled", k=0)
    with pytest.raises(TypeError, match="protocol"):
        fastgrad.gradient_check(object(), x, t)
    with pytest.raises(ValueError, match="rounds to nothing"):
        fastgrad.check_gradients(lambda: 0.0, np.array([1e10]), np.array([0.0]), h=1e-10)
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastgrad.check_gradients(lambda: float(frozen.sum()), frozen, np.ones(3))


# ------------------------------------------------------- non-finite inputs
NONFINITE = [np.nan, np.inf, -np.inf]
NONFINITE_IDS = ["nan", "inf", "-inf"]


class Regression:
    """Least squares in the book's protocol, with float targets; counts its calls."""

    def __init__(self):
        self.params = {"W": np.arange(6.0).reshape(3, 2) / 10, "b": np.array([0.5, -0.5])}
        self.calls = 0

    def loss(self, x, t):
        self.calls += 1
        return 0.5 * float(np.sum((np.asarray(x) @ self.params["W"] + self.params["b"] - t) ** 2))

    def gradient(self, x, t):
        self.calls += 1
        error = np.asarray(x) @ self.params["W"] + self.params["b"] - t
        return {"W": np.asarray(x).T @ error, "b": error.sum(axis=0)}


def refused(call, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value).startswith(message), str(caught.value)


def holds(name: str, value: float, index: list[int]) -> str:
    return f"{name} holds {float(value)} at index {index}; "


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_nonfinite_x_and_t_of_a_hand_written_model_are_named(value):
    model = Regression()
    x, t = np.ones((4, 3)), np.zeros((4, 2))
    bad_x, bad_t = x.copy(), t.copy()
    bad_x[2, 1] = bad_x[3, 0] = value  # the first in C order is named
    bad_t[1, 0] = value
    refused(
        lambda: fastgrad.gradient_check(model, bad_x, t),
        holds("x", value, [2, 1]) + "fastgrad refuses NaN and infinite inputs",
    )
    refused(lambda: fastgrad.gradient_check(model, x, bad_t), holds("t", value, [1, 0]))
    listed = bad_x.tolist()
    refused(lambda: fastgrad.gradient_check(model, listed, t), holds("x", value, [2, 1]))
    assert model.calls == 0  # refused before the model runs
    np.testing.assert_array_equal(bad_x[2], [1.0, value, 1.0])
    np.testing.assert_array_equal(x, np.ones((4, 3)))


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_nonfinite_parameters_of_a_hand_written_model_are_named(value):
    model = Regression()
    model.params["W"][1, 0] = value
    before = {name: array.copy() for name, array in model.params.items()}
    refused(
        lambda: fastgrad.gradient_check(model, np.ones((4, 3)), np.zeros((4, 2))),
        holds("model.params['W']", value, [1, 0]) + "a gradient check needs finite parameters",
    )
    assert model.calls == 0
    for name, array in model.params.items():
        np.testing.assert_array_equal(array, before[name])


def test_inputs_a_hand_written_model_interprets_itself_are_passed_as_they_are():
    # integer token ids, or objects only the model understands: not fastgrad's to check
    model = Regression()
    report = fastgrad.gradient_check(model, np.ones((4, 3), dtype=np.int64), np.zeros((4, 2)))
    assert report.passed


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_check_gradients_names_nonfinite_params_and_grads(backend, value):
    w = backend.asarray(np.array([1.0, -2.0, 3.0]))
    grads = 3 * w**2

    def f():
        return float((w**3).sum())

    for params, gradients, name in (
        (with_value(backend, w, 1, value), grads, "params"),
        ({"w": with_value(backend, w, 1, value)}, {"w": grads}, "params['w']"),
        (w, with_value(backend, grads, 2, value), "grads"),
        ({"w": w}, {"w": with_value(backend, grads, 2, value)}, "grads['w']"),
    ):
        index = [2] if name.startswith("grads") else [1]
        refused(lambda: fastgrad.check_gradients(f, params, gradients), holds(name, value, index))
    np.testing.assert_array_equal(to_host(backend, w), [1.0, -2.0, 3.0])
    assert fastgrad.check_gradients(f, w, grads).passed


def test_a_step_beyond_the_dtype_is_refused_naming_the_element():
    w = np.array([1.0, 3.39e38], dtype=np.float32)
    with pytest.raises(ValueError) as caught:
        fastgrad.check_gradients(lambda: float(np.sum(w.astype(np.float64))), w, np.ones(2))
    assert str(caught.value).startswith(
        # a single array is the report's parameter "x"
        "the step 1.66841e+36 moves x[1] = 3.39e+38 beyond the range of float32 (±3.4e+38); "
    ), str(caught.value)
    big = np.full(200_001, 3.39e38, dtype=np.float32)  # fast mode: random directions
    with pytest.raises(ValueError, match=r"moves x \(along a random direction\) beyond"):
        fastgrad.check_gradients(lambda: float(big.astype(np.float64).sum()), big, np.ones(200_001))
    np.testing.assert_array_equal(w, np.array([1.0, 3.39e38], dtype=np.float32))
    assert (big == np.float32(3.39e38)).all()


def with_value(backend, array, index, value):
    copy = np.array(to_host(backend, array), copy=True)
    copy[index] = value
    return backend.asarray(copy)


def test_sampled_mode_is_seeded_and_includes_the_largest_entries():
    sizes = (30, 20, 5)
    net = HandNet(sizes)
    x, t = batch(sizes)
    one = fastgrad.gradient_check(net, x, t, mode="sampled", k=7, seed=3)
    two = fastgrad.gradient_check(net, x, t, mode="sampled", k=7, seed=3)
    strip = [dataclasses.replace(c, error_estimate=0.0) for c in one.parameters]
    assert strip == [dataclasses.replace(c, error_estimate=0.0) for c in two.parameters]
    assert one.parameters[0].checked <= 10


# ----------------------------------------------------------- an outside oracle
def test_verdicts_agree_with_torch_gradcheck():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 4))

    def forward(w):
        return np.sum(np.log1p(np.exp(A @ w)))

    def right(w):
        return A.T @ (1 / (1 + np.exp(-(A @ w))))

    def wrong(w):
        return A.T @ (1 / (1 + np.exp(-(A @ w)))) * np.array([1.0, 1.0, 1.1, 1.0])

    for vjp, expected in ((right, True), (wrong, False)):

        class Softplus(torch.autograd.Function):
            @staticmethod
            def forward(ctx, w):
                ctx.save_for_backward(w)
                return torch.tensor(forward(w.detach().numpy()), dtype=torch.float64)

            @staticmethod
            def backward(ctx, grad_output, vjp=vjp):
                (w,) = ctx.saved_tensors
                return grad_output * torch.from_numpy(vjp(w.detach().numpy()))

        w0 = rng.standard_normal(4)
        w_torch = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
        theirs = torch.autograd.gradcheck(Softplus.apply, (w_torch,), raise_exception=False)
        w = w0.copy()
        ours = fastgrad.check_gradients(lambda w=w: forward(w), w, vjp(w)).passed
        assert theirs == ours == expected
