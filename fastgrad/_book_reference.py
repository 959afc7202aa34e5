"""The book's networks and training loop, as the book writes them: the baselines.

This is the code a reader of *Deep Learning from Scratch* runs: plain NumPy,
its own softmax and its cross-entropy with the ``+1e-7`` guard, the
per-element ``numerical_gradient`` loop, and the mini-batch loop of
``train_neuralnet.py`` (sample, gather, gradient, update, the extra ``loss``
after the update). Two networks: chapter 4's ``TwoLayerNet`` (a sigmoid
hidden layer, backprop written out as in its ``gradient`` method) and
chapter 6's ``MultiLayerNet`` (any depth, built from the layer classes of
``common/layers.py``: ``Affine``, ``Relu``/``Sigmoid``, ``SoftmaxWithLoss``).
The benchmarks compare every backend against them, so they must stay as
slow as the book's own code: do not optimise anything here.

Two deliberate departures, neither of which changes the cost: random numbers
come from a seeded :class:`numpy.random.Generator` instead of the global
``np.random`` state, and the accuracy evaluations of the book's loop are
optional (the benchmarks switch them off, as the issues' workloads say).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Affine",
    "BookMultiLayerNet",
    "BookTrainResult",
    "BookTwoLayerNet",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
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


# ----------------------------------------------- chapter 5's layers, chapter 6's net
class Relu:
    """The book's ReLU layer: a mask of ``x <= 0``; its backward zeroes ``dout`` in place."""

    def __init__(self) -> None:
        self.mask: Any = None  # set by forward, read by backward

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dout[self.mask] = 0
        dx = dout
        return dx


class Sigmoid:
    """The book's sigmoid layer: keeps its output for the backward pass."""

    def __init__(self) -> None:
        self.out: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = sigmoid(x)
        self.out = out
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx = dout * (1.0 - self.out) * self.out
        return dx


class Affine:
    """The book's affine layer; it holds the net's own ``W`` and ``b`` arrays (not copies)."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        self.W = W
        self.b = b
        self.x: Any = None
        self.original_x_shape: Any = None
        self.dW: Any = None
        self.db: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.original_x_shape = x.shape
        x = x.reshape(x.shape[0], -1)
        self.x = x
        out = np.dot(self.x, self.W) + self.b
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx = np.dot(dout, self.W.T)
        self.dW = np.dot(self.x.T, dout)
        self.db = np.sum(dout, axis=0)
        dx = dx.reshape(*self.original_x_shape)
        return dx


class SoftmaxWithLoss:
    """The book's softmax + cross-entropy (``+1e-7`` guard) output layer."""

    def __init__(self) -> None:
        self.loss: Any = None
        self.y: Any = None
        self.t: Any = None

    def forward(self, x: np.ndarray, t: np.ndarray) -> float:
        self.t = t
        self.y = softmax(x)
        self.loss = cross_entropy_error(self.y, self.t)
        return self.loss

    def backward(self, dout: float = 1) -> np.ndarray:
        batch_size = self.t.shape[0]
        if self.t.size == self.y.size:
            dx = (self.y - self.t) / batch_size
        else:
            dx = self.y.copy()
            dx[np.arange(batch_size), self.t] -= 1
            dx = dx / batch_size
        return dx


class BookMultiLayerNet:
    """The book's ``MultiLayerNet`` (chapter 6): affine and activation layers, softmax loss.

    ``activation`` is ``"relu"`` or ``"sigmoid"``; ``weight_init_std`` a
    number, ``"relu"``/``"he"`` or ``"sigmoid"``/``"xavier"``, as the book's.
    The layers hold the arrays of ``params``: load other values into them in
    place (``params[name][...] = value``), not by replacing the dict.

    Examples
    --------
    >>> import numpy as np
    >>> from fastgrad._book_reference import BookMultiLayerNet
    >>> net = BookMultiLayerNet(4, [3, 3], 2, rng=np.random.default_rng(0))
    >>> x, t = np.random.default_rng(1).random((5, 4)), np.eye(2)[[0, 1, 0, 1, 1]]
    >>> grads = net.gradient(x, t)
    >>> bool(np.allclose(grads["W1"], net.numerical_gradient(x, t)["W1"], atol=1e-6))
    True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size_list: Sequence[int],
        output_size: int,
        activation: str = "relu",
        weight_init_std: float | str = "relu",
        weight_decay_lambda: float = 0,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float64,
    ) -> None:
        self.input_size = input_size
        self.output_size = output_size
        self.hidden_size_list = list(hidden_size_list)
        self.hidden_layer_num = len(hidden_size_list)
        self.weight_decay_lambda = weight_decay_lambda
        self.params: dict[str, np.ndarray] = {}

        self.__init_weight(weight_init_std, np.random.default_rng() if rng is None else rng, dtype)

        activation_layer = {"sigmoid": Sigmoid, "relu": Relu}
        self.layers: OrderedDict[str, Any] = OrderedDict()
        for idx in range(1, self.hidden_layer_num + 1):
            self.layers["Affine" + str(idx)] = Affine(
                self.params["W" + str(idx)], self.params["b" + str(idx)]
            )
            self.layers["Activation_function" + str(idx)] = activation_layer[activation]()

        idx = self.hidden_layer_num + 1
        self.layers["Affine" + str(idx)] = Affine(
            self.params["W" + str(idx)], self.params["b" + str(idx)]
        )

        self.last_layer = SoftmaxWithLoss()

    def __init_weight(
        self, weight_init_std: float | str, rng: np.random.Generator, dtype: Any
    ) -> None:
        all_size_list = [self.input_size, *self.hidden_size_list, self.output_size]
        for idx in range(1, len(all_size_list)):
            scale: Any = weight_init_std
            if str(weight_init_std).lower() in ("relu", "he"):
                scale = np.sqrt(2.0 / all_size_list[idx - 1])
            elif str(weight_init_std).lower() in ("sigmoid", "xavier"):
                scale = np.sqrt(1.0 / all_size_list[idx - 1])
            self.params["W" + str(idx)] = (
                scale * rng.standard_normal((all_size_list[idx - 1], all_size_list[idx]))
            ).astype(dtype)
            self.params["b" + str(idx)] = np.zeros(all_size_list[idx], dtype=dtype)

    def predict(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers.values():
            x = layer.forward(x)

        return x

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        y = self.predict(x)

        weight_decay = 0
        for idx in range(1, self.hidden_layer_num + 2):
            W = self.params["W" + str(idx)]
            weight_decay += 0.5 * self.weight_decay_lambda * np.sum(W**2)

        return self.last_layer.forward(y, t) + weight_decay

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float:
        y = self.predict(x)
        y = np.argmax(y, axis=1)
        if t.ndim != 1:
            t = np.argmax(t, axis=1)

        accuracy = np.sum(y == t) / float(x.shape[0])
        return float(accuracy)

    def numerical_gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Every gradient by the book's loop: 2·P full forward passes."""

        def loss_W(W: np.ndarray) -> float:
            return self.loss(x, t)

        grads = {}
        for idx in range(1, self.hidden_layer_num + 2):
            grads["W" + str(idx)] = numerical_gradient(loss_W, self.params["W" + str(idx)])
            grads["b" + str(idx)] = numerical_gradient(loss_W, self.params["b" + str(idx)])

        return grads

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Backprop through the layers, as the book's; ``t`` one-hot or labels."""
        # forward
        self.loss(x, t)

        # backward
        dout: Any = 1
        dout = self.last_layer.backward(dout)

        layers = list(self.layers.values())
        layers.reverse()
        for layer in layers:
            dout = layer.backward(dout)

        grads = {}
        for idx in range(1, self.hidden_layer_num + 2):
            affine = self.layers["Affine" + str(idx)]
            grads["W" + str(idx)] = affine.dW + self.weight_decay_lambda * affine.W
            grads["b" + str(idx)] = affine.db

        return grads


class BookNet(Protocol):
    """What the book's loop needs of a network: either of the book's two."""

    params: dict[str, np.ndarray]

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]: ...

    def loss(self, x: np.ndarray, t: np.ndarray) -> float: ...

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float: ...


# ------------------------------------------------------------------------ the loop
@dataclass
class BookTrainResult:
    """What the book's loop leaves behind: the loss after every update, and accuracies."""

    train_loss_list: list[float] = field(default_factory=list)
    train_acc_list: list[float] = field(default_factory=list)
    test_acc_list: list[float] = field(default_factory=list)


def book_train(
    network: BookNet,
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

    ``network`` is either of the book's nets. ``t_train`` is one-hot, as the
    book loads it. ``batch_masks`` replays given batches (so the book and a
    backend can train on the same rows); otherwise each batch is
    ``rng.choice(train_size, batch_size)``, like the
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

        # Chapter 4 names its four parameters here; chapter 6's SGD optimizer
        # walks params.keys(), the same update for any depth.
        for key in network.params:
            network.params[key] -= learning_rate * grad[key]

        loss = network.loss(x_batch, t_batch)
        result.train_loss_list.append(float(loss))

        if evaluate is not None and i % iter_per_epoch == 0:
            x_test, t_test = evaluate
            result.train_acc_list.append(network.accuracy(x_train, t_train))
            result.test_acc_list.append(network.accuracy(x_test, t_test))

    return result
