"""The chapter's networks: ``SimpleNet`` (2x3 weights) and ``TwoLayerNet``.

A model holds its parameters as arrays of its backend and checks what users
pass it; the arithmetic lives in the backend's kernels. Losses are the exact
log-softmax cross-entropy (no ``+1e-7`` guard), so the numerical and the
backprop gradients describe the same function and agree to ~1e-10.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastgrad._validation import as_float_array, onehot_to_labels
from fastgrad.backends import Backend, BackendLike, get_backend, resolve_backend
from fastgrad.backends._base import PARAM_NAMES, Params
from fastgrad.gradient import numerical_gradient as _numerical_gradient

__all__ = ["SimpleNet", "TwoLayerNet"]

_GRADIENT_METHODS = ("fast", "naive")


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

    def predict(self, x: Any) -> Any:
        """Scores ``x @ W`` (before the softmax)."""
        return as_float_array(self.backend, x, "x") @ self.W

    def loss(self, x: Any, t: Any) -> float:
        """Exact cross-entropy of ``softmax(x @ W)`` against ``t`` (one-hot or label)."""
        from fastgrad.functions import softmax_cross_entropy

        return softmax_cross_entropy(self.predict(x), t, backend=self.backend)

    def numerical_gradient(self, x: Any, t: Any) -> Any:
        """Gradient of :meth:`loss` with respect to ``W``, by central differences."""
        return _numerical_gradient(lambda W: self.loss(x, t), self.W, backend=self.backend)


class TwoLayerNet:
    """The chapter's affine-sigmoid-affine-softmax network.

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
        sizes = {"input_size": input_size, "hidden_size": hidden_size, "output_size": output_size}
        for name, size in sizes.items():
            if not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        resolved = _check_dtype(dtype)
        self.backend: Backend = get_backend(backend)
        rng = np.random.default_rng(seed)
        draw = self.backend.random_normal
        self.params: Params = {
            "W1": draw((input_size, hidden_size), weight_init_std, resolved, rng),
            "b1": self.backend.zeros(hidden_size, dtype=resolved),
            "W2": draw((hidden_size, output_size), weight_init_std, resolved, rng),
            "b2": self.backend.zeros(output_size, dtype=resolved),
        }

    # -- shape facts, read from the parameters so they can never disagree
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.params["W1"].dtype)

    @property
    def input_size(self) -> int:
        return int(self.params["W1"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.params["W1"].shape[1])

    @property
    def output_size(self) -> int:
        return int(self.params["W2"].shape[1])

    @property
    def num_params(self) -> int:
        return sum(int(self.params[name].size) for name in PARAM_NAMES)

    def __repr__(self) -> str:
        return (
            f"TwoLayerNet({self.input_size}, {self.hidden_size}, {self.output_size}, "
            f"dtype={self.dtype.name}, backend={self.backend.name!r})"
        )

    # -- the book's methods
    def predict(self, x: Any) -> Any:
        """Class probabilities ``softmax(sigmoid(x W1 + b1) W2 + b2)``, as the book's."""
        X, single = self._inputs(x)
        probabilities = self.backend.softmax(self.backend.two_layer_logits(self.params, X))
        return probabilities[0] if single else probabilities

    def loss(self, x: Any, t: Any) -> float:
        """Exact batch-mean cross-entropy; ``t`` holds labels or one-hot rows."""
        X, labels = self._batch(x, t)
        return float(self.backend.two_layer_loss(self.params, X, labels))

    def accuracy(self, x: Any, t: Any) -> float:
        """Fraction of samples whose most probable class is the target."""
        X, labels = self._batch(x, t)
        return float(self.backend.two_layer_accuracy(self.params, X, labels))

    def gradient(self, x: Any, t: Any) -> Params:
        """Gradients of :meth:`loss` by backpropagation (the fast, exact way)."""
        X, labels = self._batch(x, t)
        return self.backend.two_layer_gradient(self.params, X, labels)[1]

    def numerical_gradient(self, x: Any, t: Any, method: str = "fast", h: float = 1e-4) -> Params:
        """Gradients of :meth:`loss` by central differences, in float64.

        ``"naive"`` is the book's loop: two full losses per parameter.
        ``"fast"`` computes the same differences from only what each
        perturbation changes (see the backend's
        ``two_layer_numerical_gradient``); it agrees with ``"naive"`` to
        ~1e-12 and is thousands of times faster. Either way the arithmetic
        runs in float64 on copies of the parameters, which are never touched,
        and the result comes back in the parameters' dtype.
        """
        if method not in _GRADIENT_METHODS:
            raise ValueError(f"method must be one of {_GRADIENT_METHODS}, got {method!r}")
        if not (isinstance(h, (float, int)) and 0 < h < float("inf")):
            raise ValueError(f"h must be a positive finite step, got {h!r}")
        X, labels = self._batch(x, t)
        grads = self.numerical_gradient_float64(X, labels, method, h)
        return {name: grad.astype(self.dtype, copy=False) for name, grad in grads.items()}

    # -- the fast paths used by training and gradient checks (prepared inputs)
    def numerical_gradient_float64(
        self, X: Any, labels: Any, method: str = "fast", h: float = 1e-4
    ) -> Params:
        """Float64 numerical gradients for inputs already prepared by the caller."""
        with self.backend.single_threaded_blas():
            return self._numerical_gradient_float64(X, labels, method, h)

    def _numerical_gradient_float64(self, X: Any, labels: Any, method: str, h: float) -> Params:
        backend = self.backend
        if method == "fast":
            return backend.two_layer_numerical_gradient(self.params, X, labels, h)
        xp = backend.xp
        params64 = {name: xp.array(self.params[name], dtype=np.float64) for name in PARAM_NAMES}
        X64 = xp.asarray(X, dtype=np.float64)

        def loss(_: Any) -> Any:
            return backend.two_layer_loss(params64, X64, labels)

        # The base class's loop, on purpose: "naive" is the reference, whatever
        # faster loop a backend may offer for compiled functions.
        return {
            name: Backend.numerical_gradient(backend, loss, params64[name], h, "central")
            for name in PARAM_NAMES
        }

    def train_step(self, X: Any, labels: Any, lr: float) -> Any:
        """One SGD step by backprop on prepared inputs; returns the batch loss.

        ``X`` must be a backend array of the net's dtype and ``labels`` integer
        labels; the training loop prepares both once, so nothing is checked here.
        """
        return self.backend.two_layer_sgd_step(self.params, X, labels, lr)

    def prepare(self, x: Any, t: Any) -> tuple[Any, Any]:
        """``(X, labels)`` checked and converted once for repeated fast calls."""
        return self._batch(x, t)

    # -- argument checks
    def _inputs(self, x: Any) -> tuple[Any, bool]:
        X = as_float_array(self.backend, _own(self.backend, x, "x"), "x")
        single = X.ndim == 1
        if single:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise ValueError(
                f"x must have shape (N, {self.input_size}) or ({self.input_size},), "
                f"got {tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)}"
            )
        return X.astype(self.dtype, copy=False), single

    def _batch(self, x: Any, t: Any) -> tuple[Any, Any]:
        X, single = self._inputs(x)
        T = self.backend.asarray(_own(self.backend, t, "t"))
        if single and T.ndim <= 1 and T.size in (1, self.output_size):
            T = T.reshape(1, -1) if T.size == self.output_size else T.reshape(1)
        labels = onehot_to_labels(self.backend, T, self.output_size)
        if labels.shape[0] != X.shape[0]:
            raise ValueError(f"x holds {X.shape[0]} samples but t holds {labels.shape[0]} targets")
        return X, labels


def _own(backend: Backend, value: Any, name: str) -> Any:
    """Refuse arrays that live on another device than the model's parameters."""
    resolve_backend(backend, value)
    return value
