"""The book's chapter-4 network and training loop, as the book writes them: the baseline.

This is the code a reader of *Deep Learning from Scratch* runs: plain NumPy,
a sigmoid hidden layer, its own softmax and its cross-entropy with the
``+1e-7`` guard, the per-element ``numerical_gradient`` loop, backprop as in
the chapter's ``gradient`` method, and the mini-batch loop of
``train_neuralnet.py`` (sample, gather, gradient, update, the extra ``loss``
after the update). The benchmarks compare every backend against it, so it
must stay as slow as the book's own code: do not optimise anything here.

Two deliberate departures, neither of which changes the cost: random numbers
come from a seeded :class:`numpy.random.Generator` instead of the global
``np.random`` state, and the accuracy evaluations of the book's loop are
optional (the benchmarks switch them off, as the issues' workloads say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BookTrainResult",
    "BookTwoLayerNet",
    "book_train",
    "cross_entropy_error",
    "numerical_gradient",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The book's ``1 / (1 + exp(-x))`` (it overflows for very negative x, as the book's does)."""
    return 1 / (1 + np.exp(-x))


def sigmoid_grad(x: np.ndarray) -> np.ndarray:
    return (1.0 - sigmoid(x)) * sigmoid(x)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; the book transposes a batch so that it works column-wise."""
    if x.ndim == 2:
        x = x.T
        x = x - np.max(x, axis=0)
        y = np.exp(x) / np.sum(np.exp(x), axis=0)
        return y.T
    x = x - np.max(x)
    return np.exp(x) / np.sum(np.exp(x))


def cross_entropy_error(y: np.ndarray, t: np.ndarray) -> float:
    """Batch-mean cross-entropy with the book's ``+1e-7`` guard; ``t`` one-hot or labels."""
    if y.ndim == 1:
        t = t.reshape(1, t.size)
        y = y.reshape(1, y.size)
    # One-hot targets are turned into label indices, as in the book.
    if t.size == y.size:
        t = t.argmax(axis=1)
    batch_size = y.shape[0]
    return -np.sum(np.log(y[np.arange(batch_size), t] + 1e-7)) / batch_size


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """The book's central-difference loop: two evaluations of ``f`` per element of ``x``.

    ``x`` is moved in place and restored; a strided view of a larger array is
    fine (the benchmarks time a fixed fraction of the parameters that way).
    """
    h = 1e-4
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]
        x[idx] = float(tmp_val) + h
        fxh1 = f(x)
        x[idx] = tmp_val - h
        fxh2 = f(x)
        grad[idx] = (fxh1 - fxh2) / (2 * h)
        x[idx] = tmp_val
        it.iternext()
    return grad


class BookTwoLayerNet:
    """The book's ``TwoLayerNet`` (affine, sigmoid, affine, softmax).

    ``dtype`` casts the initial parameters (the book's are float64); the
    inputs decide the rest, as NumPy's promotion rules do in the book.

    Examples
    --------
    >>> import numpy as np
    >>> from fastgrad._book_reference import BookTwoLayerNet
    >>> net = BookTwoLayerNet(4, 3, 2, rng=np.random.default_rng(0))
    >>> x, t = np.ones((5, 4)), np.eye(2)[[0, 1, 0, 1, 1]]
    >>> grads = net.gradient(x, t)
    >>> bool(np.allclose(grads["W1"], net.numerical_gradient(x, t)["W1"], atol=1e-6))
    True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        weight_init_std: float = 0.01,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float64,
    ) -> None:
        rng = np.random.default_rng() if rng is None else rng
        self.params: dict[str, np.ndarray] = {}
        self.params["W1"] = (
            weight_init_std * rng.standard_normal((input_size, hidden_size))
        ).astype(dtype)
        self.params["b1"] = np.zeros(hidden_size, dtype=dtype)
        self.params["W2"] = (
            weight_init_std * rng.standard_normal((hidden_size, output_size))
        ).astype(dtype)
        self.params["b2"] = np.zeros(output_size, dtype=dtype)

    def predict(self, x: np.ndarray) -> np.ndarray:
        W1, W2 = self.params["W1"], self.params["W2"]
        b1, b2 = self.params["b1"], self.params["b2"]
        a1 = np.dot(x, W1) + b1
        z1 = sigmoid(a1)
        a2 = np.dot(z1, W2) + b2
        return softmax(a2)

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        y = self.predict(x)
        return cross_entropy_error(y, t)

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float:
        y = np.argmax(self.predict(x), axis=1)
        t = np.argmax(t, axis=1)
        return float(np.sum(y == t) / float(x.shape[0]))

    def numerical_gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """All four gradients by the book's loop: 2·P full forward passes."""

        def loss_W(W: np.ndarray) -> float:
            return self.loss(x, t)

        return {name: numerical_gradient(loss_W, self.params[name]) for name in self.params}

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Backprop as the chapter's ``gradient`` method writes it; ``t`` is one-hot."""
        W1, W2 = self.params["W1"], self.params["W2"]
        b1, b2 = self.params["b1"], self.params["b2"]
        grads: dict[str, np.ndarray] = {}

        batch_num = x.shape[0]

        # forward
        a1 = np.dot(x, W1) + b1
        z1 = sigmoid(a1)
        a2 = np.dot(z1, W2) + b2
        y = softmax(a2)

        # backward
        dy = (y - t) / batch_num
        grads["W2"] = np.dot(z1.T, dy)
        grads["b2"] = np.sum(dy, axis=0)

        da1 = np.dot(dy, W2.T)
        dz1 = sigmoid_grad(a1) * da1
        grads["W1"] = np.dot(x.T, dz1)
        grads["b1"] = np.sum(dz1, axis=0)

        return grads


@dataclass
class BookTrainResult:
    """What the book's loop leaves behind: the loss after every update, and accuracies."""

    train_loss_list: list[float] = field(default_factory=list)
    train_acc_list: list[float] = field(default_factory=list)
    test_acc_list: list[float] = field(default_factory=list)


def book_train(
    network: BookTwoLayerNet,
    x_train: np.ndarray,
    t_train: np.ndarray,
    iters_num: int = 10000,
    batch_size: int = 100,
    learning_rate: float = 0.1,
    *,
    rng: np.random.Generator | None = None,
    batch_masks: Sequence[np.ndarray] | np.ndarray | None = None,
    evaluate: tuple[np.ndarray, np.ndarray] | None = None,
) -> BookTrainResult:
    """The chapter's mini-batch loop (``train_neuralnet.py``), backprop gradients.

    ``t_train`` is one-hot, as the book loads it. ``batch_masks`` replays
    given batches (so the book and a backend can train on the same rows);
    otherwise each batch is ``rng.choice(train_size, batch_size)``, like the
    book's ``np.random.choice``. ``evaluate=(x_test, t_test)`` adds the
    book's once-per-epoch accuracy evaluations; the benchmarks leave it off.
    """
    rng = np.random.default_rng() if rng is None else rng
    result = BookTrainResult()
    train_size = x_train.shape[0]
    iter_per_epoch = max(train_size / batch_size, 1)

    for i in range(iters_num):
        batch_mask = rng.choice(train_size, batch_size) if batch_masks is None else batch_masks[i]
        x_batch = x_train[batch_mask]
        t_batch = t_train[batch_mask]

        grad = network.gradient(x_batch, t_batch)

        for key in ("W1", "b1", "W2", "b2"):
            network.params[key] -= learning_rate * grad[key]

        loss = network.loss(x_batch, t_batch)
        result.train_loss_list.append(float(loss))

        if evaluate is not None and i % iter_per_epoch == 0:
            x_test, t_test = evaluate
            result.train_acc_list.append(network.accuracy(x_train, t_train))
            result.test_acc_list.append(network.accuracy(x_test, t_test))

    return result
