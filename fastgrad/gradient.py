"""Numerical differentiation of the chapter: derivatives, gradients, descent.

``numerical_gradient`` keeps the book's black-box contract (``f`` takes the
array ``x`` and returns a scalar) and its in-place perturbation of ``x``, which
is always undone, even when ``f`` raises. Its ``batched=True`` form never
writes ``x`` and lets a vectorised ``f`` evaluate many perturbations at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from fastgrad._validation import is_float_dtype
from fastgrad.backends import Backend, BackendLike, resolve_backend
from fastgrad.errors import PrecisionWarning

__all__ = ["gradient_descent", "numerical_diff", "numerical_gradient", "tangent_line"]

_METHODS = ("central", "forward")


def numerical_diff(f: Callable[[Any], Any], x: Any, h: float = 1e-4) -> Any:
    """Central difference ``(f(x + h) - f(x - h)) / 2h``, the book's derivative.

    Examples
    --------
    >>> import fastgrad
    >>> fastgrad.numerical_diff(lambda x: 0.01 * x**2 + 0.1 * x, 5.0)
    0.1999999999990898
    """
    _check_step(h)
    return (f(x + h) - f(x - h)) / (2 * h)


def tangent_line(f: Callable[[Any], Any], x: float, h: float = 1e-4) -> Callable[[Any], Any]:
    """The tangent of ``f`` at ``x`` as a function ``t -> f(x) + f'(x) (t - x)``.

    Examples
    --------
    >>> import fastgrad
    >>> tangent = fastgrad.tangent_line(lambda x: 0.01 * x**2 + 0.1 * x, 5.0)
    >>> round(tangent(5.0), 6), round(tangent(6.0), 6)
    (0.75, 0.95)
    """
    slope = numerical_diff(f, x, h)
    intercept = f(x) - slope * x
    return lambda t: slope * t + intercept


def numerical_gradient(
    f: Callable[[Any], Any],
    x: Any,
    h: float = 1e-4,
    *,
    method: str = "central",
    batched: bool = False,
    chunk_size: int | None = None,
    backend: BackendLike = None,
) -> Any:
    """Gradient of the scalar function ``f`` at ``x``, by finite differences.

    Parameters
    ----------
    f
        Unbatched (default): called as ``f(x)`` with ``x`` perturbed in place,
        as in the book; it may ignore its argument and read ``x`` through a
        closure (``lambda W: net.loss(x, t)``). Batched: called with a stack of
        perturbed copies of shape ``(k, *x.shape)`` and returns shape ``(k,)``.
    x
        Floating-point array of any shape. Lists become a new float64 array.
        Integer arrays are refused: perturbing them by ``h`` rounds back to the
        same integers, so the book's loop silently returns wrong gradients.
    h
        Step. The default ``1e-4`` suits float64; float32 inputs warn.
    method
        ``"central"``: ``(f(x+h) - f(x-h)) / 2h`` (error O(h²)), or
        ``"forward"``: ``(f(x+h) - f(x)) / h`` (error O(h), half the calls).
    batched
        Evaluate ``chunk_size`` perturbations per call of ``f``; ``x`` is then
        never written. Chunks default to about 64 MiB of copies.
    backend
        Backend name or object; by default the current one (see
        :func:`fastgrad.get_backend`).

    Returns
    -------
    An array of ``x``'s shape and dtype.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> def function_2(x):
    ...     return x[0] ** 2 + x[1] ** 2
    >>> fastgrad.numerical_gradient(function_2, np.array([3.0, 4.0])).round(6).tolist()
    [6.0, 8.0]
    >>> stack_f = lambda xs: (xs ** 2).sum(axis=1)
    >>> fastgrad.numerical_gradient(stack_f, np.array([3.0, 4.0]), batched=True).round(6).tolist()
    [6.0, 8.0]
    """
    _check_step(h)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chosen = resolve_backend(backend, x)
    array = _differentiable_array(chosen, x, h)
    if batched:
        return chosen.numerical_gradient_batched(f, array, h, method, chunk_size)
    if hasattr(array, "flags") and not array.flags.writeable:
        raise ValueError(
            "x is read-only, but numerical_gradient perturbs it in place; pass a writable "
            "copy (x.copy()) or use batched=True"
        )
    return chosen.numerical_gradient(f, array, h, method)


def gradient_descent(
    f: Callable[[Any], Any],
    init_x: Any,
    lr: float = 0.01,
    step_num: int = 100,
    *,
    h: float = 1e-4,
    backend: BackendLike = None,
) -> tuple[Any, Any]:
    """Follow the numerical gradient of ``f`` downhill from ``init_x``.

    Unlike the book's version, ``init_x`` is not modified: the descent runs on a
    float copy. The history holds ``x`` before each step, shape
    ``(step_num, *init_x.shape)``.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> start = np.array([-3.0, 4.0])
    >>> x, history = fastgrad.gradient_descent(lambda x: np.sum(x**2), start, lr=0.1)
    >>> bool(np.allclose(x, 0.0, atol=1e-8)), history.shape, start.tolist()
    (True, (100, 2), [-3.0, 4.0])
    """
    if not isinstance(step_num, (int, np.integer)) or step_num < 0:
        raise ValueError(f"step_num must be a non-negative integer, got {step_num!r}")
    chosen = resolve_backend(backend, init_x)
    start = chosen.asarray(init_x)
    dtype = start.dtype if is_float_dtype(start.dtype) else np.float64
    x = start.astype(dtype, copy=True)
    history = chosen.zeros((step_num, *x.shape), dtype=dtype)
    for step in range(step_num):
        history[step] = x
        x -= lr * numerical_gradient(f, x, h, backend=chosen)
    return x, history


def _check_step(h: float) -> None:
    if not (isinstance(h, (float, int, np.floating)) and 0 < h < float("inf")):
        raise ValueError(f"h must be a positive finite step, got {h!r}")


def _differentiable_array(backend: Backend, x: Any, h: float) -> Any:
    if not hasattr(x, "dtype"):
        return backend.asarray(x, dtype=np.float64)
    array = backend.asarray(x)
    if not is_float_dtype(array.dtype):
        raise TypeError(
            f"numerical_gradient needs a floating-point x, got dtype {array.dtype}: "
            "x + h would round back to the same integers and give wrong gradients; "
            "convert it with x.astype(numpy.float64)"
        )
    if np.dtype(array.dtype).itemsize < 8:
        warnings.warn(
            f"numerical gradient of a {array.dtype} array: with h={h} the rounding "
            "error of this precision swamps the difference; use float64",
            PrecisionWarning,
            stacklevel=3,
        )
    return array
