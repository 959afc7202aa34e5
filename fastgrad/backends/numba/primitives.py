"""Layer primitives of the Numba backend: elementwise, losses, affine, activations.

Rule of this module: every kernel is a plain serial ``@njit`` loop over NumPy
arrays of one float dtype, compiled once per dtype and cached on disk; one,
``affine_rows``, runs blocks of rows on Numba's threads. The
backend (``fastgrad.backends.numba``) prepares the arguments and falls back
to the reference for anything these do not take.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from fastgrad.backends.numba._jit import parallel as _parallel
from fastgrad.backends.numba._jit import serial as _serial
from fastgrad.backends.numba.vector_math import sigmoid as _sigmoid


# ------------------------------------------------------------- elementwise
@_serial
def sigmoid(x, out):
    """``out[k] = sigmoid(x[k])`` on flat contiguous arrays."""
    for k in range(x.shape[0]):
        out[k] = _sigmoid(np.float64(x[k]))


@_serial
def sigmoid_grad(x, out):
    for k in range(x.shape[0]):
        s = _sigmoid(np.float64(x[k]))
        out[k] = (1.0 - s) * s


@_serial
def softmax(x, out):
    """Row softmax of a 2-D array, shifted by the row maximum."""
    rows, cols = x.shape
    for n in range(rows):
        top = -np.inf
        for c in range(cols):
            top = max(top, np.float64(x[n, c]))
        total = 0.0
        for c in range(cols):
            e = math.exp(np.float64(x[n, c]) - top)
            out[n, c] = e
            total += e
        scale = 1.0 / total
        for c in range(cols):
            out[n, c] = np.float64(out[n, c]) * scale


# ------------------------------------------------------------------ losses
# All losses accumulate in float64 whatever the input dtype, and return a
# Python float.
@_serial
def mean_squared_error(y, t):
    total = 0.0
    for k in range(y.shape[0]):
        d = np.float64(y[k]) - np.float64(t[k])
        total += d * d
    return 0.5 * total


@_serial
def cross_entropy_labels(y, labels, guard):
    total = 0.0
    for n in range(y.shape[0]):
        total += np.log(np.float64(y[n, labels[n]]) + guard)
    return -total / y.shape[0]


@_serial
def cross_entropy_dense(y, t, guard):
    total = 0.0
    for n in range(y.shape[0]):
        for c in range(y.shape[1]):
            # math.log raises on negatives in nopython mode; np.log gives NaN
            # like the reference (the public API turns NaN into a ValueError).
            total += np.float64(t[n, c]) * np.log(np.float64(y[n, c]) + guard)
    return -total / y.shape[0]


@_serial
def _shift_and_log_total(z, n):
    """``(max_c z[n, c], log sum_c exp(z[n, c] - max))``: row ``n``'s log-sum-exp in two parts.

    The loss of class ``c`` is ``(max - z[n, c]) + log_total``. Adding the
    parts first and subtracting ``z[n, c]`` after (``lse - z``) would cancel:
    with logits of 1e5 the sum ``max + log_total`` keeps only ~11 digits of
    ``log_total``, and the loss, of order 1, loses the rest.
    """
    top = -np.inf
    for c in range(z.shape[1]):
        top = max(top, np.float64(z[n, c]))
    total = 0.0
    for c in range(z.shape[1]):
        total += math.exp(np.float64(z[n, c]) - top)
    return top, math.log(total)


@_serial
def softmax_cross_entropy_labels(z, labels):
    total = 0.0
    for n in range(z.shape[0]):
        top, log_total = _shift_and_log_total(z, n)
        total += (top - np.float64(z[n, labels[n]])) + log_total
    return total / z.shape[0]


@_serial
def softmax_cross_entropy_dense(z, t):
    total = 0.0
    for n in range(z.shape[0]):
        top, log_total = _shift_and_log_total(z, n)
        for c in range(z.shape[1]):
            total += np.float64(t[n, c]) * ((top - np.float64(z[n, c])) + log_total)
    return total / z.shape[0]


@_serial
def softmax_cross_entropy_grad_labels(z, labels, dz):
    """Loss; ``dz`` gets ``(softmax(z) - onehot) / N``."""
    batch_size = z.shape[0]
    inv_batch = 1.0 / batch_size
    total = 0.0
    for n in range(batch_size):
        top, log_total = _shift_and_log_total(z, n)
        label = labels[n]
        total += (top - np.float64(z[n, label])) + log_total
        for c in range(z.shape[1]):
            p = math.exp((np.float64(z[n, c]) - top) - log_total)
            dz[n, c] = ((p - 1.0) if c == label else p) * inv_batch
    return total * inv_batch


@_serial
def softmax_cross_entropy_grad_dense(z, t, dz):
    batch_size = z.shape[0]
    inv_batch = 1.0 / batch_size
    total = 0.0
    for n in range(batch_size):
        top, log_total = _shift_and_log_total(z, n)
        mass = 0.0
        for c in range(z.shape[1]):
            mass += np.float64(t[n, c])
        for c in range(z.shape[1]):
            target = np.float64(t[n, c])
            log_p = (np.float64(z[n, c]) - top) - log_total
            total -= target * log_p
            # soft targets: d/dz of -sum_c t_c log p_c is p * sum(t) - t
            dz[n, c] = (math.exp(log_p) * mass - target) * inv_batch
    return total * inv_batch


# ------------------------------------------------------ sparse inputs (CSR)
@_serial
def _compact_row(x, n, col_row, val_row):
    """Non-zeros of ``x[n]`` into ``col_row/val_row``; returns how many.

    Branch-free: every element is written and the cursor moves only past
    non-zeros (mispredicted branches on pixel edges cost more).
    """
    count = 0
    for i in range(x.shape[1]):
        v = x[n, i]
        col_row[count] = i
        val_row[count] = v
        count += v != 0
    return count


@_serial
def _csr_of(x, rows):
    """CSR (``starts``, ``columns``, ``values``) of ``x[rows]``, row ``k`` from ``x[rows[k]]``."""
    features = x.shape[1]
    starts = np.empty(rows.shape[0] + 1, np.int64)
    starts[0] = 0
    for k in range(rows.shape[0]):
        n = rows[k]
        count = 0
        for i in range(features):
            count += x[n, i] != 0
        starts[k + 1] = starts[k] + count
    total = starts[rows.shape[0]]
    # One slot of slack: _compact_row writes every element, zeros included,
    # at the cursor, which reaches ``total`` on the last row's trailing zeros.
    columns = np.empty(total + 1, np.int32)
    values = np.empty(total + 1, x.dtype)
    for k in range(rows.shape[0]):
        _compact_row(x, rows[k], columns[starts[k] :], values[starts[k] :])
    return starts, columns[:total], values[:total]


@_serial
def csr_rows(x):
    """All non-zeros of ``x`` row by row: ``starts (rows+1,)``, ``columns`` (int32), ``values``."""
    return _csr_of(x, np.arange(x.shape[0]))


@_serial
def drawn_rows_csr(x, batch_indices):
    """CSR of the distinct rows ``batch_indices`` draws from dense ``x``, in first-use order.

    Returns ``starts, columns, values, used, local``: listed row ``r`` is
    ``x[used[r]]`` and ``local`` is ``batch_indices`` renumbered to listed
    rows. A call that samples an epoch from a large ``x`` lists only the
    rows it draws; callers that run many calls on the same ``x`` build
    ``csr_rows(x)`` once instead.
    """
    steps, batch_size = batch_indices.shape
    position = np.full(x.shape[0], -1, np.int64)
    used = np.empty(steps * batch_size, np.int64)
    local = np.empty((steps, batch_size), np.int64)
    distinct = 0
    for step in range(steps):
        for b in range(batch_size):
            n = batch_indices[step, b]
            if position[n] < 0:
                position[n] = distinct
                used[distinct] = n
                distinct += 1
            local[step, b] = position[n]
    used = used[:distinct]
    starts, columns, values = _csr_of(x, used)
    return starts, columns, values, used, local


# ------------------------------------------------------------------ affine
@_parallel
def affine_rows(x, W, b, out, blocks):
    """``out = x @ W + b`` in ``blocks`` blocks of rows, one ``np.dot`` (BLAS) each.

    For a forward pass over many rows (an evaluation of the training set),
    called with BLAS limited to one thread: Numba's threads run the blocks,
    and no BLAS thread is left spinning for the next ~0.1 s, as OpenBLAS's
    own are after a threaded call, beside the training steps that follow
    (which then ran 1.6x slower on two cores).
    """
    rows = x.shape[0]
    for block in prange(blocks):
        first = rows * np.int64(block) // blocks
        last = rows * (np.int64(block) + 1) // blocks
        if first < last:
            part = out[first:last]
            np.dot(x[first:last], W, part)
            for r in range(part.shape[0]):
                for j in range(part.shape[1]):
                    part[r, j] += b[j]
