"""MultiLayerNet, TwoLayerNet and SimpleNet: numerical == analytic, fast == naive, outside oracles.

The oracles share no code with the library: the loops of ``tests/naive.py``
for the numerical gradients, PyTorch autograd for the losses and backprop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastgrad
from fastgrad.backends._base import ACTIVATIONS, Network
from tests import naive
from tests.conftest import host_network, mnist_like, net_with, random_network, to_host

# Depths 1..4 with odd widths; an empty list is a single affine layer.
HIDDEN = [[], [5], [4, 3], [5, 4, 3]]


def depth_id(hidden):
    return f"depth{len(hidden) + 1}"


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Run as training does: these products are small, and on 2 cores idle BLAS threads spin."""
    with fastgrad.get_backend("numpy").single_threaded_blas():
        yield


def norm_relative(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def naive_gradient_of(net, x, t, h=1e-4):
    """The loop oracle's numerical gradient of ``net`` by the book's names."""
    network = host_network(net)
    pairs = naive.multilayer_numerical_gradient(
        network.weights, network.biases, x, t, network.activation, network.weight_decay, h
    )
    return {
        name: grad
        for layer, pair in enumerate(pairs, start=1)
        for name, grad in zip((f"W{layer}", f"b{layer}"), pair, strict=True)
    }


# ------------------------------------------------------------- the chapter's net
@pytest.fixture
def chapter_batch():
    net = fastgrad.TwoLayerNet(784, 50, 10, seed=0)
    # Train a little so the gradients are not those of a symmetric start.
    rng = np.random.default_rng(5)
    x, t = mnist_like(100, 784), rng.integers(0, 10, 100)
    X, labels = net.prepare(x, t)
    net.sgd_steps(X, labels, np.tile(np.arange(100), (20, 1)), 0.5)
    # Labels drawn at random, as in a real mini-batch: class counts are uneven,
    # so no gradient is near zero by symmetry (which would make relative
    # errors measure only the O(h²) truncation term).
    return net, mnist_like(100, 784, seed=1), rng.integers(0, 10, 100)


def test_numerical_equals_backprop_on_the_chapters_net(chapter_batch):
    net, x, t = chapter_batch
    numerical = net.numerical_gradient(x, t)
    analytic = net.gradient(x, t)
    assert list(numerical) == list(analytic) == ["W1", "b1", "W2", "b2"]
    for name in net.params:
        assert norm_relative(numerical[name], analytic[name]) < 1e-6, name
        assert np.abs(numerical[name] - analytic[name]).max() <= 1e-9, name


def test_gradient_check_report(chapter_batch):
    net, x, t = chapter_batch
    report = fastgrad.gradient_check(net, x, t)
    assert report.passed and bool(report)
    assert report.max_abs_diff <= 1e-9
    text = str(report)
    assert "PASS" in text and "W1" in text and "b2" in text


def test_gradient_check_of_a_deep_net_with_weight_decay():
    net = fastgrad.MultiLayerNet(10, [6, 5, 4], 3, "tanh", weight_decay_lambda=0.1, seed=0)
    x, t = mnist_like(12, 10), np.arange(12) % 3
    report = fastgrad.gradient_check(net, x, t)
    assert report.passed, str(report)
    assert [check.name for check in report.parameters] == list(net.params)
    assert "W4" in str(report) and "b4" in str(report)


def test_gradient_check_finds_a_wrong_backprop(monkeypatch):
    net = fastgrad.MultiLayerNet(6, [4, 4], 3, "sigmoid", seed=0)
    x, t = mnist_like(10, 6), np.arange(10) % 3
    real = net.backend.affine_backward

    def wrong(dY, X, W, need_dX=True):
        dX, dW, db = real(dY, X, W, need_dX)
        # Only the first layer asks for no dX: its bias gradient comes out 1 % off.
        return dX, dW, db if need_dX else db * 1.01

    monkeypatch.setattr(net.backend, "affine_backward", wrong)
    report = fastgrad.gradient_check(net, x, t)
    assert not report.passed
    assert report.failed == ["b1"]


# ------------------------------------------------------- numerical: fast == naive
@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=depth_id)
def test_fast_numerical_gradient_equals_the_naive_loop(backend, hidden, activation, batch_size):
    network = random_network([6, *hidden, 3], activation, weight_decay=0.1, seed=len(hidden))
    net = net_with(network, backend)
    x, t = mnist_like(batch_size, 6, seed=batch_size), np.arange(batch_size) % 3
    xd, td = backend.asarray(x), backend.asarray(t)
    fast = net.numerical_gradient(xd, td, method="fast")
    slow = net.numerical_gradient(xd, td, method="naive")
    oracle = naive_gradient_of(net, x, t)
    assert list(fast) == list(slow) == list(oracle) == list(net.params)
    for name, expected in oracle.items():
        assert fast[name].dtype == slow[name].dtype == np.float64, name
        np.testing.assert_allclose(to_host(backend, fast[name]), expected, atol=1e-9, rtol=0)
        np.testing.assert_allclose(to_host(backend, slow[name]), expected, atol=1e-9, rtol=0)


def with_relu_kinks(network: Network, X: np.ndarray, offset: float) -> tuple[Network, list]:
    """``network`` with biases moved so that ``A_l[n, j] = offset`` at one (n, j) per hidden layer.

    Layers are set in order (moving b_l changes every later A), each kink at
    another sample; returns the new network and the kinks ``(layer, n, j)``.
    """
    weights = list(network.weights)
    biases = [b.copy() for b in network.biases]
    kinks = []
    H = X
    for layer in range(len(weights) - 1):
        n, j = layer % X.shape[0], layer % weights[layer].shape[1]
        A = H @ weights[layer] + biases[layer]
        biases[layer][j] += offset - A[n, j]
        A = H @ weights[layer] + biases[layer]
        assert A[n, j] == pytest.approx(offset, abs=1e-15)
        kinks.append((layer, n, j))
        H = np.maximum(A, 0)
    return Network(tuple(weights), tuple(biases), "relu", network.weight_decay), kinks


@pytest.mark.parametrize("hidden", [[5], [4, 3], [5, 4, 3]], ids=depth_id)
def test_relu_pre_activation_within_h_of_zero(backend, hidden):
    """A ReLU input at 0.3e-4 crosses zero under a ±1e-4 step: the differences must see it."""
    h = 1e-4
    x, t = mnist_like(5, 6, seed=3), np.arange(5) % 3
    network, kinks = with_relu_kinks(
        random_network([6, *hidden, 3], "relu", weight_decay=0.1, seed=4), x, 0.3 * h
    )
    net = net_with(network, backend)
    xd, td = backend.asarray(x), backend.asarray(t)
    fast = net.numerical_gradient(xd, td, method="fast", h=h)
    oracle = naive_gradient_of(net, x, t, h)
    for name, expected in oracle.items():
        np.testing.assert_allclose(to_host(backend, fast[name]), expected, atol=1e-9, rtol=0)
    # The kinks matter: there the central differences are not the derivative.
    analytic = net.gradient(xd, td)
    gaps = [
        abs(float(to_host(backend, analytic[f"b{layer + 1}"])[j]) - oracle[f"b{layer + 1}"][j])
        for layer, _, j in kinks
    ]
    assert max(gaps) > 1e-6, gaps


# ------------------------------------------------------------ PyTorch as oracle
def torch_loss(torch, network, x, t, onehot=False):
    """The loss of ``network`` by PyTorch, and its parameters as leaf tensors."""
    activation = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "identity": lambda a: a,
    }[network.activation]
    tensors = [torch.tensor(array, requires_grad=True) for array in network.arrays]
    H = torch.tensor(x)
    depth = network.depth
    for layer in range(depth):
        A = H @ tensors[2 * layer] + tensors[2 * layer + 1]
        H = A if layer == depth - 1 else activation(A)
    target = torch.tensor(np.eye(H.shape[1])[t] if onehot else t)
    loss = torch.nn.functional.cross_entropy(H, target)
    loss = loss + 0.5 * network.weight_decay * sum((W * W).sum() for W in tensors[::2])
    return loss, tensors


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("hidden", HIDDEN, ids=depth_id)
def test_loss_and_backprop_match_pytorch_autograd(backend, hidden, activation, weight_decay):
    torch = pytest.importorskip("torch", reason="PyTorch is the independent oracle; not installed")
    network = random_network([30, *hidden, 5], activation, scale=0.5, weight_decay=weight_decay)
    net = net_with(network, backend)
    x, t = mnist_like(17, 30), np.arange(17) % 5
    loss, tensors = torch_loss(torch, network, x, t)
    loss.backward()
    xd, td = backend.asarray(x), backend.asarray(t)
    assert net.loss(xd, td) == pytest.approx(loss.item(), rel=1e-12)
    onehot_loss, _ = torch_loss(torch, network, x, t, onehot=True)
    assert net.loss(xd, backend.asarray(np.eye(5)[t])) == pytest.approx(
        onehot_loss.item(), rel=1e-12
    )
    ours = net.gradient(xd, td)
    assert len(ours) == len(tensors)
    for (name, grad), tensor in zip(ours.items(), tensors, strict=True):
        np.testing.assert_allclose(
            to_host(backend, grad), tensor.grad.numpy(), rtol=1e-10, atol=1e-14, err_msg=name
        )


def test_chapter_net_matches_pytorch_autograd():
    torch = pytest.importorskip("torch", reason="PyTorch is the independent oracle; not installed")
    net = fastgrad.TwoLayerNet(30, 9, 5, weight_init_std=0.3, seed=2)
    x, t = mnist_like(17, 30), np.arange(17) % 5
    loss, tensors = torch_loss(torch, host_network(net), x, t)
    loss.backward()
    assert net.loss(x, t) == pytest.approx(loss.item(), rel=1e-12)
    for (name, grad), tensor in zip(net.gradient(x, t).items(), tensors, strict=True):
        np.testing.assert_allclose(grad, tensor.grad.numpy(), rtol=1e-10, atol=1e-14, err_msg=name)


# --------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "rule, gain", [("relu", 2.0), ("he", 2.0), ("sigmoid", 1.0), ("xavier", 1.0)]
)
def test_weight_init_rules_draw_the_stated_std(rule, gain):
    net = fastgrad.MultiLayerNet(600, [400, 200], 10, weight_init_std=rule, seed=0)
    for layer, fan_in in enumerate([600, 400, 200], start=1):
        W = net.params[f"W{layer}"]
        expected = math.sqrt(gain / fan_in)
        # The sample std of n normal draws has a relative standard error 1/sqrt(2n):
        # 5 of them still tell sqrt(2/fan_in) from sqrt(1/fan_in) apart (41 %).
        assert W.std() == pytest.approx(expected, rel=5 / math.sqrt(2 * W.size)), layer
        assert abs(W.mean()) < 5 * expected / math.sqrt(W.size), layer
        np.testing.assert_array_equal(net.params[f"b{layer}"], 0.0)


def test_default_weight_init_is_he():
    default = fastgrad.MultiLayerNet(20, [8], 3, seed=4)
    he = fastgrad.MultiLayerNet(20, [8], 3, weight_init_std="he", seed=4)
    for name in default.params:
        np.testing.assert_array_equal(default.params[name], he.params[name])


@pytest.mark.parametrize("std", [0.05, 1, np.float32(0.25)])
def test_weight_init_number_is_the_std_of_every_layer(std):
    net = fastgrad.MultiLayerNet(500, [300, 100], 40, weight_init_std=std, seed=1)
    for layer in (1, 2, 3):
        W = net.params[f"W{layer}"]
        assert W.std() == pytest.approx(float(std), rel=5 / math.sqrt(2 * W.size)), layer


def test_two_layer_net_is_the_one_hidden_layer_sigmoid_multilayer_net(backend):
    two = fastgrad.TwoLayerNet(13, 7, 4, seed=0, backend=backend)
    multi = fastgrad.MultiLayerNet(13, [7], 4, "sigmoid", 0.01, seed=0, backend=backend)
    assert list(two.params) == list(multi.params) == ["W1", "b1", "W2", "b2"]
    for name in two.params:
        np.testing.assert_array_equal(to_host(backend, two.params[name]), multi.params[name])
    assert two.architecture == multi.architecture
    assert two.activation == "sigmoid" and two.hidden_size == 7 and two.depth == 2
    x, t = backend.asarray(mnist_like(6, 13)), backend.asarray(np.arange(6) % 4)
    # The chapter's predict gives probabilities, the book's later nets logits.
    np.testing.assert_allclose(
        to_host(backend, two.predict(x)),
        to_host(backend, backend.softmax(multi.predict(x))),
        rtol=1e-15,
        atol=1e-15,
    )
    assert two.loss(x, t) == multi.loss(x, t)
    for name, grad in two.gradient(x, t).items():
        np.testing.assert_array_equal(to_host(backend, grad), multi.gradient(x, t)[name])


def test_same_seed_same_weights_on_every_backend(backend):
    here = fastgrad.MultiLayerNet(9, [5, 4], 3, "tanh", seed=11, dtype=np.float32, backend=backend)
    there = fastgrad.MultiLayerNet(9, [5, 4], 3, "tanh", seed=11, dtype=np.float32, backend="numpy")
    for name in there.params:
        assert here.params[name].dtype == np.float32
        np.testing.assert_array_equal(to_host(backend, here.params[name]), there.params[name])


def test_structure_of_a_multilayer_net():
    net = fastgrad.MultiLayerNet(13, (9, np.int64(4)), 5, "tanh", weight_decay_lambda=0.1, seed=0)
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert [net.params[f"W{k}"].shape for k in (1, 2, 3)] == [(13, 9), (9, 4), (4, 5)]
    assert net.depth == 3 and net.layer_sizes == [13, 9, 4, 5] and net.hidden_size_list == [9, 4]
    assert (net.input_size, net.output_size) == (13, 5)
    assert net.num_params == 13 * 9 + 9 + 9 * 4 + 4 + 4 * 5 + 5
    assert net.dtype == np.float64 and net.activation == "tanh" and net.weight_decay_lambda == 0.1
    assert net.architecture == {
        "layer_sizes": [13, 9, 4, 5],
        "activation": "tanh",
        "weight_decay_lambda": 0.1,
    }
    assert repr(net).startswith("MultiLayerNet(13, [9, 4], 5, activation='tanh'")
    network = net.network()
    assert network.depth == 3 and network.activation == "tanh" and network.weight_decay == 0.1
    # The model's own arrays, not copies: in-place updates reach the model.
    assert all(a is net.params[name] for a, name in zip(network.arrays, net.params, strict=True))
    network.weights[0][0, 0] = 42.0
    assert net.params["W1"][0, 0] == 42.0


def test_empty_hidden_list_is_softmax_regression():
    net = fastgrad.MultiLayerNet(13, [], 4, seed=0)
    assert net.depth == 1 and list(net.params) == ["W1", "b1"]
    assert net.layer_sizes == [13, 4] and net.hidden_size_list == []
    x, t = mnist_like(6, 13), np.arange(6) % 4
    W, b = net.params["W1"], net.params["b1"]
    np.testing.assert_allclose(net.predict(x), x @ W + b, rtol=1e-15)
    probabilities = naive.softmax_rows(x @ W + b)
    np.testing.assert_allclose(
        net.gradient(x, t)["W1"], x.T @ (probabilities - np.eye(4)[t]) / 6, atol=1e-15
    )


# ----------------------------------------------------------------- book's API
def test_float32_net_returns_float32_gradients_computed_in_float64():
    net64 = fastgrad.MultiLayerNet(12, [5, 4], 3, "sigmoid", seed=1)
    net32 = fastgrad.MultiLayerNet(12, [5, 4], 3, "sigmoid", seed=1, dtype=np.float32)
    x, t = mnist_like(8, 12).astype(np.float32), np.arange(8) % 3
    g32 = net32.numerical_gradient(x, t)
    assert all(g.dtype == np.float32 for g in g32.values())
    assert all(g.dtype == np.float32 for g in net32.gradient(x, t).values())
    assert fastgrad.gradient_check(net32, x, t).passed
    # the numerical side agrees with the float64 net to float32 rounding of params
    g64 = net64.numerical_gradient(x.astype(np.float64), t)
    for name in net64.params:
        np.testing.assert_allclose(g32[name], g64[name], atol=1e-6)


@pytest.mark.parametrize("net", ["two-layer", "multilayer"])
def test_book_api_numerical_gradient_through_params(net):
    if net == "two-layer":
        model = fastgrad.TwoLayerNet(5, 3, 2, seed=0)
    else:
        model = fastgrad.MultiLayerNet(5, [3, 4], 2, "tanh", weight_decay_lambda=0.1, seed=0)
    x, t = mnist_like(4, 5), np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    loss_W = lambda W: model.loss(x, t)  # noqa: E731  (the book's idiom)
    by_hand = {
        name: fastgrad.numerical_gradient(loss_W, model.params[name]) for name in model.params
    }
    fast = model.numerical_gradient(x, t)
    for name in model.params:
        np.testing.assert_allclose(by_hand[name], fast[name], atol=1e-9)


def test_predict_loss_accuracy_book_semantics():
    net = fastgrad.TwoLayerNet(4, 3, 2, seed=0)
    x = mnist_like(6, 4)
    probabilities = net.predict(x)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    t = probabilities.argmax(axis=1)
    assert net.accuracy(x, t) == 1.0
    assert net.accuracy(x, np.eye(2, dtype=int)[t]) == 1.0
    assert net.loss(x, t) == pytest.approx(
        naive.log_softmax_cross_entropy(np.log(probabilities), t)
    )
    single = net.predict(x[0])
    assert single.shape == (2,)
    assert net.loss(x[0], int(t[0])) == pytest.approx(-np.log(probabilities[0, t[0]]))
    assert net.num_params == 4 * 3 + 3 + 3 * 2 + 2
    assert "TwoLayerNet(4, 3, 2" in repr(net)


def test_multilayer_predict_of_one_sample_and_weight_decay_in_the_loss():
    net = fastgrad.MultiLayerNet(4, [3], 2, "relu", weight_decay_lambda=0.5, seed=0)
    plain = fastgrad.MultiLayerNet(4, [3], 2, "relu", seed=0)
    x, t = mnist_like(6, 4), np.arange(6) % 2
    assert net.predict(x[0]).shape == (2,)
    np.testing.assert_allclose(net.predict(x[0]), net.predict(x)[0], rtol=1e-15, atol=1e-16)
    penalty = 0.25 * sum(float((net.params[W] ** 2).sum()) for W in ("W1", "W2"))
    assert net.loss(x, t) == pytest.approx(plain.loss(x, t) + penalty, rel=1e-14)
    grads, plain_grads = net.gradient(x, t), plain.gradient(x, t)
    for name in net.params:
        decay = 0.5 * net.params[name] if name.startswith("W") else 0.0
        np.testing.assert_allclose(grads[name], plain_grads[name] + decay, rtol=1e-14, atol=1e-16)


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (fastgrad.TwoLayerNet(5, 4, 3, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    assert np.all(a.params["b1"] == 0) and a.params["W1"].std() < 0.05
