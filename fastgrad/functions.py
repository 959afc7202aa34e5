"""Activations and losses of the chapter, under the book's names, on any backend.

Each function checks its arguments once (by the rules of
:mod:`fastgrad._validation`: real, finite, a non-empty batch for the losses),
picks the backend (see :mod:`fastgrad.backends`) and calls that backend's
kernel. Losses return Python floats, as the book's do; float16 inputs are
computed in float32, since the book's ``1e-7`` guard does not exist in float16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastgrad._validation import (
    as_batch_targets,
    as_dtype,
    as_float_array,
    check_finite,
    check_finite_result,
    check_not_empty,
    check_real,
)
from fastgrad.backends import Backend, BackendLike, resolve_backend

__all__ = [
    "cross_entropy_error",
    "identity",
    "mean_squared_error",
    "relu",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
    "softmax_cross_entropy",
]


def _activation_input(x: Any, backend: BackendLike) -> tuple[Backend, Any]:
    chosen = resolve_backend(backend, x)
    try:
        array = chosen.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"x must be an array of real numbers ({error})") from None
    check_real(array, "x")
    if array.dtype.kind in "biu":
        # Activations make a new array, so promoting integers loses nothing.
        array = array.astype("float64")
    check_finite(chosen, array, "x")
    return chosen, array


def _loss_precision(array: Any) -> Any:
    # float16 cannot hold the book's 1e-7 guard (log(0) = -inf) nor sums of a
    # few thousand terms; a loss is returned as a Python float anyway.
    return array.astype(np.float32) if array.dtype.itemsize < 4 else array


def sigmoid(x: Any, *, backend: BackendLike = None) -> Any:
    """Logistic function ``1 / (1 + exp(-x))``, overflow-safe.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> fastgrad.sigmoid(np.array([-1.0, 1.0, 2.0])).round(4).tolist()
    [0.2689, 0.7311, 0.8808]
    """
    chosen, array = _activation_input(x, backend)
    return chosen.sigmoid(array)


def sigmoid_grad(x: Any, *, backend: BackendLike = None) -> Any:
    """Derivative of :func:`sigmoid` at ``x``: ``(1 - sigmoid(x)) * sigmoid(x)``.

    Examples
    --------
    >>> import fastgrad
    >>> float(fastgrad.sigmoid_grad(0.0))
    0.25
    """
    chosen, array = _activation_input(x, backend)
    return chosen.sigmoid_grad(array)


def relu(x: Any, *, backend: BackendLike = None) -> Any:
    """``max(x, 0)`` elementwise.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> fastgrad.relu(np.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    chosen, array = _activation_input(x, backend)
    return chosen.relu(array)


def identity(x: Any, *, backend: BackendLike = None) -> Any:
    """The output activation of regression: returns ``x`` unchanged.

    Examples
    --------
    >>> import fastgrad
    >>> fastgrad.identity([1.0, 2.0]).tolist()
    [1.0, 2.0]
    """
    chosen, array = _activation_input(x, backend)
    return chosen.identity(array)


def softmax(x: Any, *, backend: BackendLike = None) -> Any:
    """Softmax along the last axis (each row of a batch), overflow-safe.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> fastgrad.softmax(np.array([1010.0, 1000.0, 990.0])).round(5).tolist()
    [0.99995, 5e-05, 0.0]
    """
    chosen, array = _activation_input(x, backend)
    if array.ndim == 0:
        raise ValueError("softmax needs at least one axis; got a scalar")
    if array.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(array.shape)}: a softmax needs at least one class")
    # A row spanning more than the dtype's range makes x - max(x) overflow to
    # -inf, whose exp is 0: the correctly rounded probability, not an error.
    with np.errstate(over="ignore"):
        return chosen.softmax(array)


def mean_squared_error(y: Any, t: Any, *, backend: BackendLike = None) -> float:
    """The book's sum of squares error ``0.5 * sum((y - t) ** 2)`` (not averaged).

    Examples
    --------
    >>> import fastgrad
    >>> t = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    >>> y = [0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0]
    >>> round(fastgrad.mean_squared_error(y, t), 4)
    0.0975
    """
    chosen = resolve_backend(backend, y, t)
    Y = _loss_precision(as_float_array(chosen, y, "y"))
    T = chosen.asarray(t)
    check_real(T, "t")
    if T.shape != Y.shape:
        raise ValueError(f"y and t must have the same shape, got {Y.shape} and {T.shape}")
    check_not_empty(Y, "y", "a loss")
    check_finite(chosen, Y, "y")
    check_finite(chosen, T, "t")
    T = as_dtype(chosen, T, Y.dtype, "t")
    with np.errstate(over="ignore", invalid="ignore"):
        value = chosen.mean_squared_error(Y, T)
    return check_finite_result(value, "mean_squared_error", Y.dtype)


def cross_entropy_error(y: Any, t: Any, *, backend: BackendLike = None) -> float:
    """The book's cross-entropy ``-sum(t * log(y + 1e-7))``, averaged over the batch.

    ``y`` holds probabilities, one sample (1-D) or a batch (2-D); ``t`` holds
    one-hot rows of the same shape or integer labels. The ``1e-7`` guard is
    the book's and gives its values; for training use
    :func:`softmax_cross_entropy`, which is exact.

    Examples
    --------
    >>> import fastgrad
    >>> y = [0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0]
    >>> round(fastgrad.cross_entropy_error(y, 2), 9)
    0.510825457
    """
    chosen = resolve_backend(backend, y, t)
    Y = _loss_precision(as_float_array(chosen, y, "y"))
    Y, T = as_batch_targets(chosen, Y, t)
    if bool((Y < 0).any()):
        raise ValueError("y holds negative values; cross_entropy_error expects probabilities")
    with np.errstate(over="ignore", invalid="ignore"):
        value = chosen.cross_entropy_error(Y, T)
    return check_finite_result(value, "cross_entropy_error", Y.dtype)


def softmax_cross_entropy(logits: Any, t: Any, *, backend: BackendLike = None) -> float:
    """Cross-entropy of ``softmax(logits)``, fused and exact (log-sum-exp).

    Accepts the same targets as :func:`cross_entropy_error`, soft targets too,
    and never overflows or takes ``log(0)``.

    Examples
    --------
    >>> import fastgrad
    >>> round(fastgrad.softmax_cross_entropy([0.0, 0.0], 1), 6)
    0.693147
    """
    chosen = resolve_backend(backend, logits, t)
    Z = _loss_precision(as_float_array(chosen, logits, "logits"))
    Z, T = as_batch_targets(chosen, Z, t, "logits")
    # Logits spanning more than the dtype's range overflow in the shift by the
    # row maximum; the probability is then 0 and the result checked below.
    with np.errstate(over="ignore", invalid="ignore"):
        value = chosen.softmax_cross_entropy(Z, T)
    return check_finite_result(value, "softmax_cross_entropy", Z.dtype)
