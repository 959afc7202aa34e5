"""Checks at the public API, so kernels can trust their inputs.

Each check turns a user mistake (wrong shape, integers where floats are
needed, labels out of range, NaN) into one clear error naming the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastgrad.backends import Backend


def is_float_dtype(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def as_float_array(backend: Backend, value: Any, name: str) -> Any:
    """``value`` as a floating-point backend array.

    Python lists and scalars become float64; arrays must already be floating
    point, since silently casting an integer array hides a bug at the caller.
    """
    if not hasattr(value, "dtype"):
        return backend.asarray(value, dtype=np.float64)
    array = backend.asarray(value)
    if not is_float_dtype(array.dtype):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {array.dtype}; "
            f"convert it first, e.g. {name}.astype(numpy.float64)"
        )
    return array


def check_no_nan(backend: Backend, array: Any, name: str) -> None:
    if bool(backend.xp.isnan(array).any()):
        raise ValueError(f"{name} contains NaN; the loss would be NaN")


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
    integer labels ``(N,)`` or dense targets ``(N, C)`` of ``y``'s dtype.
    """
    if y.ndim not in (1, 2):
        raise ValueError(f"{y_name} must be 1-D (one sample) or 2-D (a batch), got shape {y.shape}")
    single = y.ndim == 1
    Y = y.reshape(1, -1) if single else y
    T = backend.asarray(t)
    batch_size, num_classes = Y.shape
    if T.shape == y.shape:
        if not (is_float_dtype(T.dtype) or np.issubdtype(np.dtype(T.dtype), np.integer)):
            raise TypeError(f"t must be numeric one-hot targets, got dtype {T.dtype}")
        return Y, T.reshape(Y.shape).astype(Y.dtype, copy=False)
    label_shape: tuple[int, ...] = () if single else (batch_size,)
    if T.shape == label_shape or (single and T.shape == (1,)):
        labels = check_labels(backend, T.reshape(batch_size), num_classes, "t")
        return Y, labels
    raise ValueError(
        f"t has shape {T.shape}, which fits neither one-hot targets {tuple(y.shape)} "
        f"nor integer labels {label_shape} for {y_name} of shape {tuple(y.shape)}"
    )


def onehot_to_labels(backend: Backend, t: Any, num_classes: int) -> Any:
    """Labels ``(N,)`` from labels or strict one-hot rows ``(N, C)``.

    Soft targets are refused rather than silently rounded by an argmax.
    """
    xp = backend.xp
    if t.ndim == 1:
        return check_labels(backend, t, num_classes, "t").astype(xp.intp, copy=False)
    if t.ndim != 2 or t.shape[1] != num_classes:
        raise ValueError(
            f"t must be integer labels (N,) or one-hot rows (N, {num_classes}), got shape {t.shape}"
        )
    is_binary = bool(xp.all((t == 0) | (t == 1)))
    if not is_binary or not bool(xp.all(t.sum(axis=1) == 1)):
        raise ValueError(
            "t has rows that are not one-hot (exactly one 1, the rest 0); "
            "pass integer labels, or use fastgrad.softmax_cross_entropy for soft targets"
        )
    return xp.argmax(t, axis=1)
