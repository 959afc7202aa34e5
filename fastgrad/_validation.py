"""Checks at the public API, so kernels can trust their inputs: fastgrad's rules for values.

Each check turns a user mistake (wrong shape, integers where floats are
needed, labels out of range, NaN) into one clear error naming the argument.
The rules below hold at every public entry point: ``fastgrad.functions``,
``numerical_diff``/``numerical_gradient``/``gradient_descent``, the models'
``predict``/``loss``/``accuracy``/``gradient``/``numerical_gradient``,
``fastgrad.train.train``, and ``gradient_check``/``check_gradients`` (their
parameters and gradients, and the floating-point ``x``/``t`` they pass to
any model; other ``x``/``t`` are a hand-written model's own business). The
``prepared_*`` methods of the models and the backend kernels trust their
inputs and check nothing.

Non-finite values
    NaN or an infinity in an input array (``x``, ``t``, ``y``, ``logits``,
    ``init_x``, a model's parameters, the training and test sets) is refused
    with a ``ValueError`` naming the argument, the value and the index of the
    first bad element in C order: ``x holds nan at index [3, 1]``. No limit
    is computed, not even where one exists (``sigmoid(inf) = 1``): in a
    network's data an infinity is an upstream bug, and one rule for every
    entry point is easier to rely on than a table of exceptions. What ``f``
    returns to the numerical differences follows the same rule (an error
    naming the evaluation and the element), and so do results: a loss, a
    model's logits or gradients, or a difference quotient that overflows its
    dtype is a ``ValueError`` saying so, never an ``inf``. Finite inputs
    whose exact result is representable give it, even where an intermediate
    underflows (``softmax([1e308, -1e308]) = [1, 0]``). Values that a cast
    to the computation's dtype turns into infinities are refused as
    ``x (as float32)``; a float16 loss is computed in float32.
Complex values
    Refused with a ``TypeError``, never truncated to their real part; so is
    a complex value returned by ``f``.
Empty arrays
    What averages over a batch (the losses, a model's ``loss``,
    ``accuracy``, ``gradient`` and ``numerical_gradient``, ``train``)
    refuses an empty batch with a ``ValueError`` naming it, and so does a
    softmax over no classes. Maps that are exact on no elements (the
    activations, ``predict``, ``numerical_diff``, ``numerical_gradient``)
    return an empty result of the right shape.
Steps
    A step ``h`` that rounds to nothing (``x + h == x`` or ``x - h == x`` for
    some element, in ``x``'s dtype: float16, a tiny ``h``, a large ``|x|``)
    is refused with a ``ValueError`` naming the element and the smallest
    step that moves every element of ``x``; so is an ``h`` the dtype cannot
    hold, or one that moves an element beyond the dtype's range.
A changing ``x``
    An ``f`` that writes to the ``x`` being differentiated is a
    ``RuntimeError``; ``x`` is restored to the caller's values first.
Divergence
    ``gradient_descent`` stops with ``FloatingPointError`` when ``x`` becomes
    non-finite or too large for ``h`` to move; ``train`` stops with
    ``fastgrad.train.TrainingDivergedError`` by the rule stated in
    :mod:`fastgrad.train`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastgrad.backends import Backend

__all__ = [
    "as_batch_targets",
    "as_dtype",
    "as_float_array",
    "check_finite",
    "check_finite_result",
    "check_not_empty",
    "check_real",
    "check_step",
    "first_nonfinite",
    "is_float_dtype",
    "onehot_to_labels",
    "smallest_step",
]


def is_float_dtype(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def check_real(array: Any, name: str) -> None:
    """Refuse complex and non-numeric arrays with a ``TypeError`` naming ``name``."""
    kind = np.dtype(array.dtype).kind
    if kind == "c":
        raise TypeError(
            f"{name} is complex ({array.dtype}); fastgrad computes with real numbers only: "
            f"pass {name}.real if the imaginary part is meant to be dropped"
        )
    if kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")


def as_float_array(backend: Backend, value: Any, name: str) -> Any:
    """``value`` as a floating-point backend array.

    Python lists and scalars become float64; arrays must already be floating
    point, since silently casting an integer array hides a bug at the caller.
    Complex values are refused in either form.
    """
    if not hasattr(value, "dtype"):
        try:
            array = backend.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be an array of real numbers ({error})") from None
        check_real(array, name)
        return array.astype(np.float64, copy=False)
    array = backend.asarray(value)
    check_real(array, name)
    if not is_float_dtype(array.dtype):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {array.dtype}; "
            f"convert it first, e.g. {name}.astype(numpy.float64)"
        )
    return array


def first_nonfinite(backend: Backend, array: Any) -> tuple[int, ...] | None:
    """Index (C order) of the first NaN or infinity in ``array``, or None when all are finite."""
    xp = backend.xp
    if np.dtype(array.dtype).kind != "f" or bool(xp.isfinite(array).all()):
        return None
    flat = int(xp.argmax(~xp.isfinite(array).reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, tuple(array.shape)))


_DATA_REMEDY = "fastgrad refuses NaN and infinite inputs (clean or mask the data first)"


def check_finite(backend: Backend, array: Any, name: str, remedy: str = _DATA_REMEDY) -> None:
    """Refuse NaN and infinities in ``array``, naming ``name``, the value and its index."""
    index = first_nonfinite(backend, array)
    if index is not None:
        value = float(array[index])
        at = f" at index {list(index)}" if index else ""
        raise ValueError(f"{name} holds {value}{at}; {remedy}")


def as_dtype(backend: Backend, array: Any, dtype: Any, name: str) -> Any:
    """``array`` cast to ``dtype``, refusing values the cast turns into infinities."""
    with np.errstate(over="ignore"):
        cast = array.astype(dtype, copy=False)
    if cast is not array:
        check_finite(backend, cast, f"{name} (as {np.dtype(dtype).name})")
    return cast


def check_not_empty(array: Any, name: str, what: str = "a batch") -> None:
    """Refuse an array without elements, naming it: a mean over nothing is undefined."""
    if int(np.prod(array.shape)) == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(array.shape)}); {what} needs at least one sample"
        )


def check_finite_result(value: Any, what: str, dtype: Any) -> float:
    """``value`` as a float, or a ``ValueError`` when computing it overflowed ``dtype``.

    Called only with finite inputs, so a non-finite result means an overflow
    (or an ``inf - inf`` after one) in the dtype's range.
    """
    result = float(value)
    if not math.isfinite(result):
        limit = float(np.finfo(np.dtype(dtype)).max)
        raise ValueError(
            f"{what} overflows {np.dtype(dtype).name} (the result or an intermediate exceeds "
            f"{limit:.3g}); rescale the inputs"
        )
    return result


def smallest_step(x: Any, backend: Backend) -> float:
    """The smallest ``h`` with ``x + h != x`` and ``x - h != x`` for every element of ``x``.

    One unit in the last place of ``max |x|`` in ``x``'s dtype: adding or
    subtracting at least that always moves an element of at most that size.
    """
    xp = backend.xp
    dtype = np.dtype(x.dtype)
    largest = float(xp.max(xp.abs(x))) if int(np.prod(x.shape)) else 0.0
    with np.errstate(over="ignore"):  # inf: no step moves the dtype's largest value up
        return float(np.spacing(dtype.type(largest)))


def check_step(backend: Backend, x: Any, h: float, name: str = "x") -> None:
    """Refuse a step that rounds to nothing at some element of the float array ``x``.

    ``x + h`` is computed in ``x``'s dtype, as the numerical differences
    perturb it; where it rounds back to ``x`` (float16, a tiny ``h``, a large
    ``|x|``) the difference is 0 and the gradient silently wrong.
    """
    xp = backend.xp
    dtype = np.dtype(x.dtype)
    with np.errstate(over="ignore"):
        step = dtype.type(h)
    if not np.isfinite(step) or step == 0:
        raise ValueError(
            f"h={h} is not representable in {dtype.name} (it becomes {float(step)}); "
            f"use float64 {name}, or a step between {float(np.finfo(dtype).smallest_subnormal)} "
            f"and {float(np.finfo(dtype).max)}"
        )
    if int(np.prod(x.shape)) == 0:
        return
    with np.errstate(over="ignore"):
        plus, minus = x + step, x - step
    beyond = ~(xp.isfinite(plus) & xp.isfinite(minus))
    if bool(beyond.any()):
        flat = int(xp.argmax(beyond.reshape(-1)))
        index = [int(i) for i in np.unravel_index(flat, tuple(x.shape))]
        element = f"{name}{index}" if index else name
        raise ValueError(
            f"h={h} moves {element} = {float(x.reshape(-1)[flat]):.6g} beyond the range of "
            f"{dtype.name} (±{float(np.finfo(dtype).max):.3g}); use a smaller h or rescale {name}"
        )
    stuck = (plus == x) | (minus == x)
    if not bool(stuck.any()):
        return
    flat = int(xp.argmax(stuck.reshape(-1)))
    index = [int(i) for i in np.unravel_index(flat, tuple(x.shape))]
    element = f"{name}{index}" if index else name
    value = float(x.reshape(-1)[flat])
    needed = smallest_step(x, backend)
    if not math.isfinite(needed):
        raise ValueError(
            f"h={h} is too small for {dtype.name} {name}: {element} = {value:.6g} does not move "
            f"by ±h, and no step moves the largest {dtype.name} up without overflowing; rescale "
            f"{name}"
        )
    accurate = float(np.finfo(dtype).eps) ** (1 / 3) * max(1.0, float(xp.max(xp.abs(x))))
    remedy = "a larger h" if dtype.itemsize >= 8 else f"a larger h, or float64 {name}"
    raise ValueError(
        f"h={h} is too small for {dtype.name} {name}: {element} = {value:.6g} does not move by "
        f"±h; the smallest step that moves every element is {needed:.3g} (one unit in the last "
        f"place of max |{name}|), and about {accurate:.3g} gives the most accurate central "
        f"differences; use {remedy}"
    )


def check_labels(backend: Backend, labels: Any, num_classes: int, name: str) -> Any:
    """Integer class labels, each in ``[0, num_classes)``."""
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise TypeError(
            f"{name} must hold integer class labels (or one-hot rows), got dtype {labels.dtype}"
        )
    if labels.size:
        low = int(labels.min())
        high = int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} holds label {bad}, out of range for {num_classes} classes "
                f"(labels must be 0..{num_classes - 1})"
            )
    return labels


def as_batch_targets(backend: Backend, y: Any, t: Any, y_name: str = "y") -> tuple[Any, Any]:
    """Shape ``(y, t)`` as the loss kernels want them.

    ``y`` becomes ``(N, C)`` (a 1-D ``y`` is one sample); ``t`` becomes either
    integer labels ``(N,)`` or dense targets ``(N, C)`` of ``y``'s dtype. Both
    are checked against the rules of the module docstring: real, finite, and
    at least one sample of at least one class.
    """
    if y.ndim not in (1, 2):
        raise ValueError(f"{y_name} must be 1-D (one sample) or 2-D (a batch), got shape {y.shape}")
    single = y.ndim == 1
    Y = y.reshape(1, -1) if single else y
    if Y.shape[1] == 0:
        raise ValueError(f"{y_name} has shape {tuple(y.shape)}: no classes to compare t with")
    check_not_empty(Y, y_name)
    check_finite(backend, y, y_name)
    T = backend.asarray(t)
    check_real(T, "t")
    batch_size, num_classes = Y.shape
    if T.shape == y.shape:
        if T.dtype.kind == "b":
            raise TypeError(f"t must be numeric one-hot targets, got dtype {T.dtype}")
        check_finite(backend, T, "t")
        return Y, as_dtype(backend, T, Y.dtype, "t").reshape(Y.shape)
    label_shape: tuple[int, ...] = () if single else (batch_size,)
    if T.shape == label_shape or (single and T.shape == (1,)):
        labels = check_labels(backend, T.reshape(batch_size), num_classes, "t")
        return Y, labels
    raise ValueError(
        f"t has shape {T.shape}, which fits neither one-hot targets {tuple(y.shape)} "
        f"nor integer labels {label_shape} for {y_name} of shape {tuple(y.shape)}"
    )


def onehot_to_labels(backend: Backend, t: Any, num_classes: int, name: str = "t") -> Any:
    """Labels ``(N,)`` from labels or strict one-hot rows ``(N, C)``.

    Soft targets are refused rather than silently rounded by an argmax.
    """
    xp = backend.xp
    check_real(t, name)
    if t.ndim == 1:
        return check_labels(backend, t, num_classes, name).astype(xp.intp, copy=False)
    if t.ndim != 2 or t.shape[1] != num_classes:
        raise ValueError(
            f"{name} must be integer labels (N,) or one-hot rows (N, {num_classes}), "
            f"got shape {t.shape}"
        )
    check_finite(backend, t, name)
    is_binary = bool(xp.all((t == 0) | (t == 1)))
    if not is_binary or not bool(xp.all(t.sum(axis=1) == 1)):
        raise ValueError(
            f"{name} has rows that are not one-hot (exactly one 1, the rest 0); "
            "pass integer labels, or use fastgrad.softmax_cross_entropy for soft targets"
        )
    return xp.argmax(t, axis=1)
