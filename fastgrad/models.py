"""The networks: ``SimpleNet`` (2x3 weights), ``MultiLayerNet`` and ``TwoLayerNet``.

A model holds its parameters as arrays of its backend and checks what users
pass it; it is written once over the backend's layer primitives, and is the
only place that knows the names of its parameters. Losses are the exact
log-softmax cross-entropy (no ``+1e-7`` guard), so the numerical and the
backprop gradients describe the same function and agree to ~1e-10. The
public methods check their inputs and the parameters by the rules of
:mod:`fastgrad._validation`; the ``prepared_*`` fast paths trust theirs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastgrad._validation import (
    as_float_array,
    check_finite,
    check_not_empty,
    check_step,
    first_nonfinite,
    onehot_to_labels,
)
from fastgrad.backends import Backend, BackendLike, get_backend, resolve_backend
from fastgrad.backends._base import Network, SparseRows, check_activation
from fastgrad.gradient import numerical_gradient as _numerical_gradient

__all__ = ["MultiLayerNet", "SimpleNet", "TwoLayerNet"]

Params = dict[str, Any]
"""Parameters or gradients by the book's names: ``W1, b1, ..., WL, bL``."""

_GRADIENT_METHODS = ("fast", "naive")

_PARAMETER_REMEDY = (
    "the net's parameters must be finite (a diverged training run, a bad checkpoint, "
    "or an assignment to net.params)"
)


def _check_dtype(dtype: Any) -> np.dtype:
    resolved = np.dtype(dtype)
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


class SimpleNet:
    """The chapter's single 2x3 linear layer with a softmax cross-entropy loss.

    Parameters
    ----------
    W
        Initial weights (2, 3); drawn from a standard normal when omitted.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> net = fastgrad.SimpleNet(seed=0)
    >>> x, t = np.array([0.6, 0.9]), np.array([0, 0, 1])
    >>> dW = fastgrad.numerical_gradient(lambda W: net.loss(x, t), net.W)
    >>> dW.shape
    (2, 3)
    """

    def __init__(
        self,
        W: Any = None,
        *,
        seed: int | None = None,
        dtype: Any = np.float64,
        backend: BackendLike = None,
    ) -> None:
        self.backend = resolve_backend(backend, W) if W is not None else get_backend(backend)
        if W is None:
            rng = np.random.default_rng(seed)
            W = self.backend.random_normal((2, 3), 1.0, _check_dtype(dtype), rng)
        self.W = as_float_array(self.backend, W, "W").copy()
        if self.W.ndim != 2:
            raise ValueError(f"W must be a 2-D weight matrix, got shape {self.W.shape}")
        check_finite(self.backend, self.W, "W", _PARAMETER_REMEDY)

    def predict(self, x: Any) -> Any:
        """Scores ``x @ W`` (before the softmax)."""
        X = as_float_array(self.backend, x, "x")
        check_finite(self.backend, X, "x")
        check_finite(self.backend, self.W, "W", _PARAMETER_REMEDY)
        if X.ndim not in (1, 2) or X.shape[-1] != self.W.shape[0]:
            raise ValueError(
                f"x must have shape (N, {self.W.shape[0]}) or ({self.W.shape[0]},), "
                f"got {tuple(X.shape)}"
            )
        return X @ self.W

    def loss(self, x: Any, t: Any) -> float:
        """Exact cross-entropy of ``softmax(x @ W)`` against ``t`` (one-hot or label)."""
        from fastgrad.functions import softmax_cross_entropy

        X = as_float_array(self.backend, x, "x")
        check_not_empty(X, "x")
        return softmax_cross_entropy(self.predict(X), t, backend=self.backend)

    def numerical_gradient(self, x: Any, t: Any) -> Any:
        """Gradient of :meth:`loss` with respect to ``W``, by central differences."""
        return _numerical_gradient(lambda W: self.loss(x, t), self.W, backend=self.backend)


class MultiLayerNet:
    """A fully connected network of any depth, as in the book's later chapters.

    ``Affine -> activation`` for each hidden layer, then ``Affine -> softmax
    cross-entropy``; the loss adds ``0.5 * weight_decay_lambda * sum(W**2)``
    over every weight matrix. Written once over the backend's layer
    primitives, so every depth and activation runs on every backend.

    Parameters
    ----------
    input_size, hidden_size_list, output_size
        Layer widths, e.g. ``784, [100, 100, 100], 10`` for MNIST; an empty
        ``hidden_size_list`` is a single affine layer (softmax regression).
    activation
        Of every hidden layer: ``"relu"``, ``"sigmoid"``, ``"tanh"`` or
        ``"identity"``.
    weight_init_std
        A positive number (the standard deviation of every weight matrix), or
        ``"relu"``/``"he"`` for ``sqrt(2 / fan_in)`` per layer, or
        ``"sigmoid"``/``"xavier"`` for ``sqrt(1 / fan_in)``. Biases start at 0.
    weight_decay_lambda
        The L2 penalty ``λ`` (0 for none).
    dtype
        float64 (default) or float32 for the parameters.
    seed
        Seeds the initial weights; the same seed gives the same weights on
        every backend.
    backend
        Where the parameters live and the kernels run; the current default
        backend when omitted.

    Attributes
    ----------
    params : dict
        ``W1, b1, ..., WL, bL`` (``L = len(hidden_size_list) + 1``): ``Wl`` of
        shape ``(fan_in, fan_out)`` and ``bl`` of shape ``(fan_out,)``, as
        arrays of the backend, as in the book.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> net = fastgrad.MultiLayerNet(4, [5, 3], 2, activation="relu", seed=0)
    >>> sorted(net.params)
    ['W1', 'W2', 'W3', 'b1', 'b2', 'b3']
    >>> x, t = np.random.default_rng(0).random((6, 4)), np.arange(6) % 2
    >>> numerical, analytic = net.numerical_gradient(x, t), net.gradient(x, t)
    >>> bool(np.allclose(numerical["W1"], analytic["W1"], atol=1e-9))
    True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size_list: Sequence[int],
        output_size: int,
        activation: str = "relu",
        weight_init_std: float | str = "relu",
        weight_decay_lambda: float = 0.0,
        *,
        dtype: Any = np.float64,
        seed: int | None = None,
        backend: BackendLike = None,
    ) -> None:
        hidden = _check_hidden_sizes(hidden_size_list)
        sizes = [_check_size("input_size", input_size), *hidden]
        sizes.append(_check_size("output_size", output_size))
        self.activation = check_activation(activation)
        self.weight_decay_lambda = _check_weight_decay(weight_decay_lambda)
        scales = _init_scales(weight_init_std, sizes)
        resolved = _check_dtype(dtype)
        self.backend: Backend = get_backend(backend)
        rng = np.random.default_rng(seed)
        self.params: Params = {}
        # Every weight matrix is drawn before any bias, in layer order, so a
        # seed gives the book's TwoLayerNet draws (W1 then W2) on every backend.
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            self.params[f"W{layer}"] = self.backend.random_normal(
                (fan_in, fan_out), scales[layer - 1], resolved, rng
            )
            self.params[f"b{layer}"] = self.backend.zeros(fan_out, dtype=resolved)

    # -- structure, read from the parameters so it can never disagree
    @property
    def depth(self) -> int:
        """Number of affine layers, ``len(hidden_size_list) + 1``."""
        return len(self.params) // 2

    def _names(self) -> list[tuple[str, str]]:
        return [(f"W{layer}", f"b{layer}") for layer in range(1, self.depth + 1)]

    @property
    def layer_sizes(self) -> list[int]:
        """``[input_size, *hidden_size_list, output_size]``."""
        weights = [self.params[W] for W, _ in self._names()]
        return [int(weights[0].shape[0])] + [int(W.shape[1]) for W in weights]

    @property
    def input_size(self) -> int:
        return self.layer_sizes[0]

    @property
    def hidden_size_list(self) -> list[int]:
        return self.layer_sizes[1:-1]

    @property
    def output_size(self) -> int:
        return self.layer_sizes[-1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.params["W1"].dtype)

    @property
    def num_params(self) -> int:
        return sum(int(array.size) for array in self.params.values())

    @property
    def architecture(self) -> dict[str, Any]:
        """What defines the function the net computes, apart from its parameters.

        Checkpoints record it and refuse to load into a different one.
        """
        return {
            "layer_sizes": self.layer_sizes,
            "activation": self.activation,
            "weight_decay_lambda": self.weight_decay_lambda,
        }

    def __repr__(self) -> str:
        return (
            f"MultiLayerNet({self.input_size}, {self.hidden_size_list}, {self.output_size}, "
            f"activation={self.activation!r}, weight_decay_lambda={self.weight_decay_lambda}, "
            f"dtype={self.dtype.name}, backend={self.backend.name!r})"
        )

    def network(self) -> Network:
        """The parameters as the backend kernels take them (the same arrays, not copies)."""
        names = self._names()
        return Network(
            weights=tuple(self.params[W] for W, _ in names),
            biases=tuple(self.params[b] for _, b in names),
            activation=self.activation,
            weight_decay=self.weight_decay_lambda,
        )

    def _gradient_dict(self, pairs: Sequence[tuple[Any, Any]]) -> Params:
        grads: Params = {}
        for (W, b), (dW, db) in zip(self._names(), pairs, strict=True):
            grads[W], grads[b] = dW, db
        return grads

    # -- the book's methods
    # Each checks its inputs and the parameters, computes with overflow
    # warnings off, and refuses a result that overflowed (see _validation).
    def predict(self, x: Any) -> Any:
        """Scores (logits) of the last affine layer, before the softmax, as the book's."""
        X, single = self._inputs(x)
        self._check_params()
        logits = self._checked_logits(X)
        return logits[0] if single else logits

    def loss(self, x: Any, t: Any) -> float:
        """Exact batch-mean cross-entropy plus the weight decay; ``t`` labels or one-hot."""
        X, labels = self._batch(x, t)
        self._check_params()
        return self._checked_loss(X, labels)

    def accuracy(self, x: Any, t: Any) -> float:
        """Fraction of samples whose highest score is the target's class."""
        X, labels = self._batch(x, t)
        self._check_params()
        xp = self.backend.xp
        return float(xp.mean(xp.argmax(self._checked_logits(X), axis=1) == labels))

    def gradient(self, x: Any, t: Any) -> Params:
        """Gradients of :meth:`loss` by backpropagation (the fast, exact way)."""
        X, labels = self._batch(x, t)
        self._check_params()
        with np.errstate(over="ignore", invalid="ignore"):
            loss, pairs = self._backprop(X, labels)
        grads = self._gradient_dict(pairs)
        if not math.isfinite(float(loss)):
            self._overflowed("the loss", X)
        for name, grad in grads.items():
            if first_nonfinite(self.backend, grad) is not None:
                self._overflowed(f"the gradient of {name}", X)
        return grads

    def numerical_gradient(self, x: Any, t: Any, method: str = "fast", h: float = 1e-4) -> Params:
        """Gradients of :meth:`loss` by central differences, in float64.

        ``"naive"`` is the book's loop: two full losses per parameter.
        ``"fast"`` computes the same differences from only what each
        perturbation changes (see ``Backend.network_numerical_gradient``);
        it agrees with ``"naive"`` to ~1e-12 and is hundreds to thousands of
        times faster. Either way the arithmetic runs in float64 on copies of
        the parameters, which are never touched, and the result comes back in
        the parameters' dtype.
        """
        if method not in _GRADIENT_METHODS:
            raise ValueError(f"method must be one of {_GRADIENT_METHODS}, got {method!r}")
        if isinstance(h, bool) or not (
            isinstance(h, (float, int, np.floating)) and 0 < h < float("inf")
        ):
            raise ValueError(f"h must be a positive finite step, got {h!r}")
        X, labels = self._batch(x, t)
        self._check_params()
        self._checked_loss(X, labels)
        for name, array in self.params.items():
            # The differences run in float64, so the step must move float64 copies.
            check_step(self.backend, array.astype(np.float64), h, f"params[{name!r}]")
        # Overflows show up as non-finite differences, refused just below.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            grads = self.numerical_gradient_float64(X, labels, method, h)
        for name, grad in grads.items():
            bad = first_nonfinite(self.backend, grad)
            if bad is not None:
                xp = self.backend.xp
                moved = h * max(1.0, float(xp.max(xp.abs(X))))
                raise ValueError(
                    f"the numerical gradient of {name} is {float(grad[bad])} at index "
                    f"{list(bad)} with h={h}: the differences overflow float64 (a step moves a "
                    f"pre-activation by up to {moved:.3g}); use a smaller h"
                )
        return {name: grad.astype(self.dtype, copy=False) for name, grad in grads.items()}

    # -- the fast paths used by training and gradient checks (prepared inputs)
    def prepare(self, x: Any, t: Any, *, names: tuple[str, str] = ("x", "t")) -> tuple[Any, Any]:
        """``(X, labels)`` checked and converted once for repeated fast calls.

        ``names`` are what error messages call ``x`` and ``t`` (``train``
        passes ``("x_train", "t_train")``).
        """
        return self._batch(x, t, names)

    def training_inputs(self, X: Any) -> Any:
        """Prepared ``X`` in the form the backend's training steps read fastest (once a run)."""
        return self.backend.training_inputs(X)

    def prepared_loss(self, X: Any, labels: Any, network: Network | None = None) -> Any:
        """:meth:`loss` of prepared inputs, a backend scalar; of ``network``'s arrays if given."""
        network = network or self.network()
        loss = self.backend.softmax_cross_entropy(self._logits(X, network), labels)
        return loss + self._decay_penalty(network) if network.weight_decay else loss

    def prepared_accuracy(self, X: Any, labels: Any) -> Any:
        """:meth:`accuracy` of prepared inputs, as a backend scalar."""
        xp = self.backend.xp
        return xp.mean(xp.argmax(self._logits(X), axis=1) == labels)

    def prepared_gradient(self, X: Any, labels: Any) -> tuple[Any, Params]:
        """``(loss, gradients)`` by backprop for prepared inputs."""
        loss, pairs = self._backprop(X, labels)
        return loss, self._gradient_dict(pairs)

    def numerical_gradient_float64(
        self, X: Any, labels: Any, method: str = "fast", h: float = 1e-4
    ) -> Params:
        """Float64 numerical gradients for inputs already prepared by :meth:`prepare`."""
        with self.backend.single_threaded_blas():
            if method == "fast":
                pairs = self.backend.network_numerical_gradient(self.network(), X, labels, h)
                return self._gradient_dict(pairs)
            return self._naive_numerical_gradient(X, labels, h)

    def _naive_numerical_gradient(self, X: Any, labels: Any, h: float) -> Params:
        backend = self.backend
        xp = backend.xp
        network = self.network()
        copies = Network(
            weights=tuple(xp.array(W, dtype=np.float64) for W in network.weights),
            biases=tuple(xp.array(b, dtype=np.float64) for b in network.biases),
            activation=network.activation,
            weight_decay=network.weight_decay,
        )
        X64 = xp.asarray(X.dense if isinstance(X, SparseRows) else X, dtype=np.float64)

        def loss(_: Any) -> Any:
            return self.prepared_loss(X64, labels, copies)

        # The base class's loop, on purpose: "naive" is the reference, whatever
        # faster loop a backend may offer for compiled functions.
        pairs = [
            tuple(Backend.numerical_gradient(backend, loss, array, h, "central") for array in pair)
            for pair in zip(copies.weights, copies.biases, strict=True)
        ]
        return self._gradient_dict(pairs)

    def sgd_steps(
        self, X: Any, labels: Any, batch_indices: Any, lr: float, gradient: str = "backprop"
    ) -> Any:
        """Run ``len(batch_indices)`` SGD steps; step ``s`` trains on rows ``batch_indices[s]``.

        ``X`` (prepared, or :meth:`training_inputs` of it) and ``labels`` are
        the whole training set on the backend, ``batch_indices`` an integer
        ``(steps, batch_size)`` backend array. ``gradient`` is ``"backprop"``
        or ``"numerical"`` (the fast central differences). A backend with a
        fused kernel for this network runs all steps in one call; otherwise
        each step runs the primitives. Updates ``params`` in place; returns
        the ``(steps,)`` float64 batch losses (backend array), each measured
        before its step's update.
        """
        if gradient not in ("backprop", "numerical"):
            raise ValueError(f"gradient must be 'backprop' or 'numerical', got {gradient!r}")
        shape = tuple(getattr(batch_indices, "shape", ()))
        if len(shape) != 2 or shape[1] == 0:
            raise ValueError(
                "batch_indices must be an integer array (steps, batch_size) with batch_size >= 1, "
                f"got shape {shape}"
            )
        backend = self.backend
        network = self.network()
        fused = backend.fused_sgd_steps(network, X, labels, batch_indices, lr, gradient)
        if fused is not None:
            return fused
        xp = backend.xp
        dense = X.dense if isinstance(X, SparseRows) else X
        losses = xp.empty(batch_indices.shape[0], dtype=np.float64)
        for step in range(batch_indices.shape[0]):
            rows = batch_indices[step]
            X_batch, labels_batch = dense[rows], labels[rows]
            if gradient == "backprop":
                loss, pairs = self._backprop(X_batch, labels_batch)
            else:
                loss = self.prepared_loss(X_batch, labels_batch)
                pairs = backend.network_numerical_gradient(network, X_batch, labels_batch, 1e-4)
            losses[step] = loss
            backend.sgd_update(network.arrays, [g for pair in pairs for g in pair], lr)
        return losses

    # -- forward and backward over the primitives
    def _logits(self, X: Any, network: Network | None = None) -> Any:
        backend = self.backend
        network = network or self.network()
        H = X
        for layer in range(network.depth):
            A = backend.affine_forward(H, network.weights[layer], network.biases[layer])
            last = layer == network.depth - 1
            H = A if last else backend.activation_forward(A, network.activation)
        return H

    def _decay_penalty(self, network: Network) -> Any:
        xp = self.backend.xp
        total = sum(xp.sum(W * W) for W in network.weights)
        return 0.5 * network.weight_decay * total

    def _backprop(self, X: Any, labels: Any) -> tuple[Any, list[tuple[Any, Any]]]:
        """The loss and ``(dW, db)`` of every layer, by backpropagation."""
        backend = self.backend
        network = self.network()
        depth = network.depth
        inputs, pre = [X], []
        for layer in range(depth):
            A = backend.affine_forward(inputs[layer], network.weights[layer], network.biases[layer])
            pre.append(A)
            if layer < depth - 1:
                inputs.append(backend.activation_forward(A, self.activation))
        loss, dY = backend.softmax_cross_entropy_with_grad(pre[-1], labels)
        pairs: list[tuple[Any, Any]] = [None] * depth  # type: ignore[list-item]
        for layer in reversed(range(depth)):
            W = network.weights[layer]
            dX, dW, db = backend.affine_backward(dY, inputs[layer], W, need_dX=layer > 0)
            if self.weight_decay_lambda:
                dW = dW + self.weight_decay_lambda * W
            pairs[layer] = (dW, db)
            if layer > 0:
                dY = backend.activation_backward(dX, pre[layer - 1], inputs[layer], self.activation)
        if self.weight_decay_lambda:
            loss = loss + self._decay_penalty(network)
        return loss, pairs

    # -- argument and result checks
    def _checked_logits(self, X: Any) -> Any:
        with np.errstate(over="ignore", invalid="ignore"):
            logits = self._logits(X)
        if first_nonfinite(self.backend, logits) is not None:
            self._overflowed("the logits", X)
        return logits

    def _checked_loss(self, X: Any, labels: Any) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            loss = float(self.prepared_loss(X, labels))
        if not math.isfinite(loss):
            self._overflowed("the loss", X)
        return loss

    def _overflowed(self, what: str, X: Any) -> None:
        xp = self.backend.xp
        largest_x = float(xp.max(xp.abs(X)))
        largest_param = max(float(xp.max(xp.abs(array))) for array in self.params.values())
        raise ValueError(
            f"{what} overflow {self.dtype.name} (max |x| = {largest_x:.3g}, max |parameter| = "
            f"{largest_param:.3g}); scale the inputs down"
        )

    def _check_params(self) -> None:
        for name, array in self.params.items():
            check_finite(self.backend, array, f"params[{name!r}]", _PARAMETER_REMEDY)

    def _inputs(self, x: Any, name: str = "x") -> tuple[Any, bool]:
        X = as_float_array(self.backend, _own(self.backend, x, name), name)
        single = X.ndim == 1
        if X.ndim not in (1, 2) or X.shape[-1] != self.input_size:
            raise ValueError(
                f"{name} must have shape (N, {self.input_size}) or ({self.input_size},), "
                f"got {tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)}"
            )
        # Checked before the reshape, so that the index is the caller's.
        check_finite(self.backend, X, name)
        with np.errstate(over="ignore"):
            cast = X.astype(self.dtype, copy=False)
        if cast is not X:
            # A float64 value beyond float32's range becomes inf in a float32 net.
            check_finite(self.backend, cast, f"{name} (as {self.dtype.name})")
        return (cast.reshape(1, -1) if single else cast), single

    def _batch(self, x: Any, t: Any, names: tuple[str, str] = ("x", "t")) -> tuple[Any, Any]:
        x_name, t_name = names
        X, single = self._inputs(x, x_name)
        check_not_empty(X, x_name)
        T = self.backend.asarray(_own(self.backend, t, t_name))
        if single and T.ndim <= 1 and T.size in (1, self.output_size):
            T = T.reshape(1, -1) if T.size == self.output_size else T.reshape(1)
        labels = onehot_to_labels(self.backend, T, self.output_size, t_name)
        if labels.shape[0] != X.shape[0]:
            raise ValueError(
                f"{x_name} holds {X.shape[0]} samples but {t_name} holds {labels.shape[0]} targets"
            )
        return X, labels


class TwoLayerNet(MultiLayerNet):
    """The chapter's affine-sigmoid-affine-softmax network: a one-hidden-layer MultiLayerNet.

    Parameters
    ----------
    input_size, hidden_size, output_size
        Layer widths, e.g. 784, 50, 10 for MNIST.
    weight_init_std
        Standard deviation of the initial weights (biases start at zero).
    dtype
        float64 (default) or float32 for the parameters.
    seed
        Seeds the initial weights; the same seed gives the same weights on
        every backend.
    backend
        Where the parameters live and the kernels run; the current default
        backend when omitted.

    Attributes
    ----------
    params : dict
        ``W1 (D, H)``, ``b1 (H,)``, ``W2 (H, C)``, ``b2 (C,)`` as arrays of the
        backend, as in the book.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> net = fastgrad.TwoLayerNet(4, 3, 2, seed=0)
    >>> x, t = np.ones((5, 4)), np.array([0, 1, 0, 1, 1])
    >>> numerical = net.numerical_gradient(x, t)
    >>> analytic = net.gradient(x, t)
    >>> bool(np.allclose(numerical["W1"], analytic["W1"], atol=1e-9))
    True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        weight_init_std: float = 0.01,
        *,
        dtype: Any = np.float64,
        seed: int | None = None,
        backend: BackendLike = None,
    ) -> None:
        super().__init__(
            input_size,
            [_check_size("hidden_size", hidden_size)],
            output_size,
            activation="sigmoid",
            weight_init_std=weight_init_std,
            dtype=dtype,
            seed=seed,
            backend=backend,
        )

    @property
    def hidden_size(self) -> int:
        return self.hidden_size_list[0]

    def __repr__(self) -> str:
        return (
            f"TwoLayerNet({self.input_size}, {self.hidden_size}, {self.output_size}, "
            f"dtype={self.dtype.name}, backend={self.backend.name!r})"
        )

    def predict(self, x: Any) -> Any:
        """Class probabilities ``softmax(sigmoid(x W1 + b1) W2 + b2)``, as the chapter's."""
        X, single = self._inputs(x)
        self._check_params()
        probabilities = self.backend.softmax(self._checked_logits(X))
        return probabilities[0] if single else probabilities


def _check_size(name: str, size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        kind = " (a bool, not a size)" if isinstance(size, (bool, np.bool_)) else ""
        raise ValueError(f"{name} must be a positive integer, got {size!r}{kind}")
    return int(size)


def _check_hidden_sizes(sizes: Any) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ValueError(
            f"hidden_size_list must be a list of positive integers, e.g. [100, 100], got {sizes!r}"
        )
    return [_check_size(f"hidden_size_list[{k}]", size) for k, size in enumerate(sizes)]


def _check_weight_decay(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not 0 <= float(value) < float("inf")
    ):
        raise ValueError(f"weight_decay_lambda must be a finite number >= 0, got {value!r}")
    return float(value)


_INIT_RULES = {"relu": 2.0, "he": 2.0, "sigmoid": 1.0, "xavier": 1.0}


def _init_scales(weight_init_std: Any, sizes: Sequence[int]) -> list[float]:
    """The standard deviation of each weight matrix (see ``MultiLayerNet``)."""
    fan_ins = sizes[:-1]
    if isinstance(weight_init_std, str):
        rule = _INIT_RULES.get(weight_init_std.lower())
        if rule is None:
            raise ValueError(
                f"weight_init_std must be a positive number or one of {sorted(_INIT_RULES)}, "
                f"got {weight_init_std!r}"
            )
        return [math.sqrt(rule / fan_in) for fan_in in fan_ins]
    if (
        isinstance(weight_init_std, bool)
        or not isinstance(weight_init_std, (int, float, np.floating, np.integer))
        or not 0 < float(weight_init_std) < float("inf")
    ):
        raise ValueError(
            f"weight_init_std must be a positive number or one of {sorted(_INIT_RULES)}, "
            f"got {weight_init_std!r}"
        )
    return [float(weight_init_std)] * len(fan_ins)


def _own(backend: Backend, value: Any, name: str) -> Any:
    """Refuse arrays that live on another device than the model's parameters."""
    resolve_backend(backend, value)
    return value
