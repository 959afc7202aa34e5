"""TwoLayerNet and SimpleNet: numerical == analytic, fast == naive, and an outside oracle."""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad
from fastgrad.backends._base import PARAM_NAMES
from tests import naive
from tests.conftest import mnist_like


def norm_relative(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture
def chapter_batch():
    net = fastgrad.TwoLayerNet(784, 50, 10, seed=0)
    # Train a little so the gradients are not those of a symmetric start.
    rng = np.random.default_rng(5)
    x, t = mnist_like(100, 784), rng.integers(0, 10, 100)
    for _ in range(20):
        net.train_step(*net.prepare(x, t), 0.5)
    # Labels drawn at random, as in a real mini-batch: class counts are uneven,
    # so no gradient is near zero by symmetry (which would make relative
    # errors measure only the O(h²) truncation term).
    return net, mnist_like(100, 784, seed=1), rng.integers(0, 10, 100)


def test_numerical_equals_backprop_on_the_chapters_net(chapter_batch):
    net, x, t = chapter_batch
    numerical = net.numerical_gradient(x, t)
    analytic = net.gradient(x, t)
    for name in PARAM_NAMES:
        assert norm_relative(numerical[name], analytic[name]) < 1e-6, name
        assert np.abs(numerical[name] - analytic[name]).max() <= 1e-9, name


def test_gradient_check_report(chapter_batch):
    net, x, t = chapter_batch
    report = fastgrad.gradient_check(net, x, t)
    assert report.passed and bool(report)
    assert report.max_abs_diff <= 1e-9
    text = str(report)
    assert "PASS" in text and "W1" in text and "b2" in text
    broken = fastgrad.gradient_check(net, x, t, tolerance=1e-16)
    assert not broken.passed and "FAIL" in str(broken)


def test_gradient_check_finds_a_wrong_backprop(monkeypatch):
    net = fastgrad.TwoLayerNet(6, 4, 3, seed=0)
    x, t = mnist_like(10, 6), np.arange(10) % 3
    real = net.backend.two_layer_gradient

    def wrong(params, X, labels):
        loss, grads = real(params, X, labels)
        grads["b1"] = grads["b1"] * 1.01
        return loss, grads

    monkeypatch.setattr(net.backend, "two_layer_gradient", wrong)
    report = fastgrad.gradient_check(net, x, t)
    assert not report.passed
    assert [c.name for c in report.parameters if not c.passed] == ["b1"]


@pytest.mark.parametrize("batch_size", [1, 9])
def test_fast_equals_naive(backend, batch_size):
    net = fastgrad.TwoLayerNet(23, 7, 4, weight_init_std=0.5, seed=3, backend=backend)
    x, t = mnist_like(batch_size, 23, seed=batch_size), np.arange(batch_size) % 4
    X, labels = net.prepare(backend.asarray(x), backend.asarray(t))
    fast = net.numerical_gradient(X, labels, method="fast")
    slow = net.numerical_gradient(X, labels, method="naive")
    params = {k: backend.to_numpy(v) for k, v in net.params.items()}
    oracle = naive.two_layer_numerical_gradient(params, x, t)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(
            backend.to_numpy(fast[name]), backend.to_numpy(slow[name]), atol=1e-9, rtol=0
        )
        np.testing.assert_allclose(backend.to_numpy(slow[name]), oracle[name], atol=1e-9, rtol=0)


def test_float32_net_returns_float32_gradients_computed_in_float64():
    net64 = fastgrad.TwoLayerNet(12, 5, 3, seed=1)
    net32 = fastgrad.TwoLayerNet(12, 5, 3, seed=1, dtype=np.float32)
    x, t = mnist_like(8, 12).astype(np.float32), np.arange(8) % 3
    g32 = net32.numerical_gradient(x, t)
    assert all(g.dtype == np.float32 for g in g32.values())
    report = fastgrad.gradient_check(net32, x, t)
    assert report.passed and report.tolerance == 1e-5
    # the numerical side agrees with the float64 net to float32 rounding of params
    g64 = net64.numerical_gradient(x.astype(np.float64), t)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(g32[name], g64[name], atol=1e-6)


def test_book_api_numerical_gradient_through_params():
    net = fastgrad.TwoLayerNet(5, 3, 2, seed=0)
    x, t = mnist_like(4, 5), np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    loss_W = lambda W: net.loss(x, t)  # noqa: E731  (the book's idiom)
    by_hand = {name: fastgrad.numerical_gradient(loss_W, net.params[name]) for name in PARAM_NAMES}
    fast = net.numerical_gradient(x, t)
    for name in PARAM_NAMES:
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


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (fastgrad.TwoLayerNet(5, 4, 3, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    assert np.all(a.params["b1"] == 0) and a.params["W1"].std() < 0.05


def test_backprop_matches_pytorch_autograd():
    torch = pytest.importorskip("torch", reason="PyTorch is the independent oracle; not installed")
    net = fastgrad.TwoLayerNet(30, 9, 5, weight_init_std=0.3, seed=2)
    x, t = mnist_like(17, 30), np.arange(17) % 5
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    hidden = torch.sigmoid(torch.tensor(x) @ tensors["W1"] + tensors["b1"])
    logits = hidden @ tensors["W2"] + tensors["b2"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t))
    loss.backward()
    assert net.loss(x, t) == pytest.approx(loss.item(), rel=1e-12)
    ours = net.gradient(x, t)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(ours[name], tensors[name].grad.numpy(), rtol=1e-10, atol=1e-14)
