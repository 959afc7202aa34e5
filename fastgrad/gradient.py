"""Numerical differentiation of the chapter: derivatives, gradients, descent.

``numerical_gradient`` keeps the book's black-box contract (``f`` takes the
array ``x`` and returns a scalar) and its in-place perturbation of ``x``, which
is always undone, even when ``f`` raises. Its ``batched=True`` form never
writes ``x`` and lets a vectorised ``f`` evaluate many perturbations at once.
With ``client=`` the same differences run on a Dask cluster
(:mod:`fastgrad.distributed`), on the workers' copies of ``x``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from fastgrad._validation import (
    as_float_array,
    check_finite,
    check_real,
    check_step,
    first_nonfinite,
    is_float_dtype,
)
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
    backend = resolve_backend(None, x)
    point = backend.asarray(x)
    check_real(point, "x")
    if not is_float_dtype(point.dtype):
        point = point.astype(np.float64)  # x + h promotes integers to float64
    check_finite(backend, point, "x")
    check_step(backend, point, h)
    plus = _finite_values(backend, f(x + h), "f(x + h)")
    minus = _finite_values(backend, f(x - h), "f(x - h)")
    with np.errstate(over="ignore"):
        slope = (plus - minus) / (2 * h)
    if first_nonfinite(backend, backend.asarray(slope)) is not None:
        raise ValueError(
            "(f(x + h) - f(x - h)) / 2h overflows: f changes by more than its dtype can hold "
            "over 2h; rescale f, or compute it in float64"
        )
    return slope


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
    client: Any = None,
    elements_per_task: int | None = None,
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
    client
        A ``distributed.Client``: the evaluations of ``f`` run on its Dask
        workers, in chunks of elements, and the result is the local one bit
        for bit; ``x`` is then never written, not even temporarily. ``f`` and
        ``x`` must pickle (cloudpickle) and the workers need fastgrad and the
        backend. Pays off when ``f`` is expensive (see :mod:`fastgrad.distributed`,
        which has a runnable example). Needs ``pip install 'fastgrad[dask]'``.
    elements_per_task
        With ``client``: perturbed elements per Dask task. By default sized
        from the workers and the time of one call of ``f`` (timed once here):
        a few tasks per worker thread, each a second or more.

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
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    if elements_per_task is not None:
        if client is None:
            raise ValueError("elements_per_task sizes Dask tasks; it needs client= as well")
        elements_per_task = _positive_int(elements_per_task, "elements_per_task")
    if client is not None:
        # Imported here: fastgrad.distributed, and Dask behind it, only when asked for.
        from fastgrad.distributed import check_client

        check_client(client)
    chosen = resolve_backend(backend, x)
    array = _differentiable_array(chosen, x, h)
    if not batched and hasattr(array, "flags") and not array.flags.writeable:
        # Refused with a client too, so that one rule holds: the workers perturb
        # their copies in place, and a read-only array unpickles read-only.
        raise ValueError(
            "x is read-only, but numerical_gradient perturbs it in place; pass a writable "
            "copy (x.copy()) or use batched=True"
        )
    if client is not None:
        from fastgrad.distributed import gradient_on_cluster

        grad = gradient_on_cluster(
            chosen, f, array, h, method, batched, chunk_size, client, elements_per_task
        )
    elif batched:
        grad = chosen.numerical_gradient_batched(f, array, h, method, chunk_size)
    else:
        grad = chosen.numerical_gradient(f, array, h, method)
    bad = first_nonfinite(chosen, grad)
    if bad is not None:
        raise ValueError(
            f"the numerical gradient is {float(grad[bad])} at index {list(bad)}: f is infinite "
            f"near x there, or its difference over 2h overflows {array.dtype}; check f, or "
            "differentiate in float64"
        )
    return grad


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
    if isinstance(step_num, bool) or not isinstance(step_num, (int, np.integer)) or step_num < 0:
        raise ValueError(f"step_num must be a non-negative integer, got {step_num!r}")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float, np.integer, np.floating))
        or not 0 < float(lr) < float("inf")
    ):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    _check_step(h)
    chosen = resolve_backend(backend, init_x)
    start = chosen.asarray(init_x)
    check_real(start, "init_x")
    dtype = start.dtype if is_float_dtype(start.dtype) else np.float64
    x = start.astype(dtype, copy=True)
    check_finite(chosen, x, "init_x")
    check_step(chosen, x, h, "init_x")
    history = chosen.zeros((step_num, *x.shape), dtype=dtype)
    for step in range(step_num):
        history[step] = x
        grad = numerical_gradient(f, x, h, backend=chosen)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            x -= lr * grad
        _check_descent(chosen, x, h, lr, step + 1, step_num)
    return x, history


def _check_descent(backend: Backend, x: Any, h: float, lr: float, step: int, steps: int) -> None:
    """Stop a descent whose ``x`` became non-finite, or too large for ``h`` to move it."""
    where = f"gradient_descent diverged at step {step} of {steps} (lr={lr})"
    bad = first_nonfinite(backend, x)
    if bad is not None:
        raise FloatingPointError(
            f"{where}: x{list(bad)} became {float(x[bad])}; try a smaller lr"
        )
    try:
        check_step(backend, x, h)
    except ValueError as error:
        raise FloatingPointError(f"{where}: {error}; or try a smaller lr") from None


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _finite_values(backend: Backend, value: Any, what: str) -> Any:
    """``value`` (a scalar or an array ``f`` returned) if it is real and finite."""
    array = backend.asarray(value)
    if array.dtype.kind == "c":
        raise TypeError(f"{what} returned a complex value; f must return real numbers")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must return numbers, got {type(value).__name__}")
    bad = first_nonfinite(backend, array)
    if bad is not None:
        at = f" at index {list(bad)}" if bad else ""
        raise ValueError(f"{what} is {float(array[bad])}{at}; a derivative needs finite values")
    return value


def _check_step(h: float) -> None:
    if not (isinstance(h, (float, int, np.floating)) and 0 < h < float("inf")):
        raise ValueError(f"h must be a positive finite step, got {h!r}")


def _differentiable_array(backend: Backend, x: Any, h: float) -> Any:
    if not hasattr(x, "dtype"):
        array = as_float_array(backend, x, "x")
    else:
        array = backend.asarray(x)
        check_real(array, "x")
        if not is_float_dtype(array.dtype):
            raise TypeError(
                f"numerical_gradient needs a floating-point x, got dtype {array.dtype}: "
                "x + h would round back to the same integers and give wrong gradients; "
                "convert it with x.astype(numpy.float64)"
            )
    check_finite(backend, array, "x")
    check_step(backend, array, h)
    if np.dtype(array.dtype).itemsize < 8:
        warnings.warn(
            f"numerical gradient of a {array.dtype} array: with h={h} the rounding "
            "error of this precision swamps the difference; use float64",
            PrecisionWarning,
            stacklevel=3,
        )
    return array
