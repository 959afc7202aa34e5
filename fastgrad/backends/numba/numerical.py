"""Numerical gradients on the Numba backend: of a user's compiled ``f``, in parallel.

Each thread perturbs its own copy of ``x`` (private scratch, no shared
writes inside ``prange``), so the caller's ``x`` is never written.

Rule of this module: nothing that goes wrong inside the threads is lost or
turned into a number. An exception that ``f`` raises cannot cross Numba's
parallel region (it would leave the gradient uninitialised), so every call
of ``f`` is guarded, and each chunk stops at its first failure and records
it in its row of ``codes`` and ``values``: what went wrong (one of the
codes below), at which element, and the values needed to say so. The
backend then raises the error the reference loop raises for the same
failure; for an exception, by calling ``f`` again at that element outside
the threads, so that the user's own exception and message come out.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# What a chunk found, column 0 of its row of ``codes``.
OK = 0
#: ``f`` raised an exception.
RAISED = 1
#: ``f`` returned NaN or an infinity (``values[0]``).
NOT_FINITE = 2
#: After the call the perturbed element held ``values[0]``, not ``values[1]``.
ELEMENT_CHANGED = 3
#: Element ``codes[3]`` of the copy held ``values[0]``, not ``x``'s ``values[1]``.
X_CHANGED = 4
#: The difference quotient ``values[0]`` lies beyond the range of ``x``'s dtype.
OUT_OF_RANGE = 5
#: A batched ``f`` returned ``codes[3]`` values instead of one per row.
WRONG_LENGTH = 6

# Columns of ``codes``: the code, the element (flat index; for a batched f
# the chunk's first element), the evaluation (0: ``x + h``, 1: ``x - h``)
# and an extra index (the changed element, or the length f returned).
CODE_COLUMNS = 4
# Columns of ``values``: the value found and the value expected.
VALUE_COLUMNS = 2


def failure_table(chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, values)``: one row per chunk, every chunk ``OK`` until it fails."""
    return np.zeros((chunks, CODE_COLUMNS), np.int64), np.zeros((chunks, VALUE_COLUMNS))


# Not cached: these take the user's compiled ``f`` as an argument, so they
# are compiled once per ``f`` (and per dtype/ndim of ``x``) in each process.
@njit(nogil=True, error_model="numpy")
def _evaluate(f, work):
    """``(float(f(work)), True)``, or ``(0.0, False)`` where ``f`` raises."""
    try:
        return np.float64(f(work)), True
    except Exception:  # the backend calls f again outside the threads to raise it
        return 0.0, False


@njit(nogil=True, error_model="numpy")
def _evaluate_stack(f, stack):
    """``(copy of f(stack), True)``, or ``(empty, False)`` where ``f`` raises.

    A copy, since ``f`` may return a view of its argument, which the next
    stack overwrites.
    """
    try:
        return np.asarray(f(stack)).astype(np.float64), True
    except Exception:  # the backend calls f again outside the threads to raise it
        return np.empty(0), False


@njit(nogil=True, error_model="numpy")
def _record(codes, values, code, element, evaluation, other, found, expected):
    codes[0] = code
    codes[1] = element
    codes[2] = evaluation
    codes[3] = other
    values[0] = found
    values[1] = expected


@njit(nogil=True, error_model="numpy")
def _same(a, b):
    """Equal, or both NaN (a NaN never equals itself, and ``f`` did not change it)."""
    return a == b or (a != a and b != b)


@njit(nogil=True, error_model="numpy")
def _first_change(flat, original):
    """The first flat index where ``flat`` differs from ``original``, or -1."""
    for i in range(flat.shape[0]):
        if not _same(flat[i], original[i]):
            return i
    return -1


@njit(nogil=True, error_model="numpy")
def _checked_value(f, work, flat, k, moved, evaluation, codes, values):
    """``f(work)`` with element ``k`` moved to ``moved``; ``(value, ok)``.

    Not ok when ``f`` raised, returned a non-finite value, or left another
    value at element ``k`` (recorded in ``codes``/``values``).
    """
    value, ok = _evaluate(f, work)
    if not ok:
        _record(codes, values, RAISED, k, evaluation, -1, 0.0, 0.0)
        return value, False
    if not math.isfinite(value):
        _record(codes, values, NOT_FINITE, k, evaluation, -1, value, 0.0)
        return value, False
    if not _same(flat[k], moved):
        _record(codes, values, ELEMENT_CHANGED, k, evaluation, -1, flat[k], moved)
        return value, False
    return value, True


@njit(nogil=True, error_model="numpy")
def _chunk_differences(f, x, step, h, central, base_value, first, last, every, largest, grad, out):
    """Differences of elements ``first:last`` on a private copy of ``x`` (C-contiguous).

    As the reference loop: after every evaluation the perturbed element must
    still hold its perturbed value, and every ``every`` elements (and at the
    chunk's end) the whole copy is compared with ``x``. ``out`` is the
    chunk's ``(codes, values)`` rows; the chunk stops at its first failure.
    """
    codes, values = out
    original = x.reshape(x.size)
    work = x.copy()
    flat = work.reshape(work.size)
    for k in range(first, last):
        kept = flat[k]
        moved = kept + step
        flat[k] = moved
        plus, ok = _checked_value(f, work, flat, k, moved, 0, codes, values)
        if not ok:
            return
        if central:
            moved = kept - step
            flat[k] = moved
            minus, ok = _checked_value(f, work, flat, k, moved, 1, codes, values)
            if not ok:
                return
            slope = (plus - minus) / (2.0 * h)
        else:
            slope = (plus - base_value) / h
        if not -largest <= slope <= largest:
            _record(codes, values, OUT_OF_RANGE, k, 0, -1, slope, 0.0)
            return
        grad[k] = slope
        flat[k] = kept
        if (k + 1 - first) % every == 0 or k == last - 1:
            changed = _first_change(flat, original)
            if changed >= 0:
                _record(codes, values, X_CHANGED, k, 0, changed, flat[changed], original[changed])
                return


@njit(parallel=True, nogil=True, error_model="numpy")
def parallel_numerical_gradient(f, x, step, h, central, base_value, every, largest, codes, values):
    """Central (or forward) differences of a compiled scalar ``f`` at ``x``.

    The elements are cut into one chunk per row of ``codes``; every chunk
    perturbs its own private copy of ``x`` (so ``x`` itself is never
    written, and no thread sees another's perturbation) and writes only its
    own range of ``grad`` and its own row of ``codes``/``values``. ``step``
    is ``h`` in ``x``'s dtype (the perturbation, as ``x + h`` would round
    it); the quotient divides by the float64 ``h``, as the reference does.
    ``largest`` is the largest value of ``x``'s dtype. ``x`` must be
    C-contiguous. Elements after a chunk's failure are left unset.
    """
    size = x.size
    chunks = codes.shape[0]
    grad = np.empty(size, x.dtype)
    for chunk in prange(chunks):
        first = size * chunk // chunks
        last = size * (chunk + 1) // chunks
        _chunk_differences(
            f,
            x,
            step,
            h,
            central,
            base_value,
            first,
            last,
            every,
            largest,
            grad,
            (codes[chunk], values[chunk]),
        )
    return grad.reshape(x.shape)


@njit(nogil=True, error_model="numpy")
def _stack_differences(f, x, step, h, central, base_value, start, stop, grad, out):
    """Batched differences of elements ``start:stop`` of ``x`` (C-contiguous), one chunk.

    Row ``r`` of the stack is ``x`` moved at element ``start + r``. The
    ``-h`` stack is rebuilt from ``x``, since ``f`` may have written to the
    ``+h`` one (its own argument), as the reference does.
    """
    codes, values = out
    flat = x.reshape(x.size)
    size = flat.shape[0]
    count = stop - start
    stack = np.empty((count, size), x.dtype)
    evaluations = 2 if central else 1
    sign = 1.0
    plus = np.empty(0)
    for evaluation in range(evaluations):
        for r in range(count):
            stack[r] = flat
            stack[r, start + r] = flat[start + r] + sign * step
        moved, ok = _evaluate_stack(f, stack.reshape((count, *x.shape)))
        if not ok:
            _record(codes, values, RAISED, start, evaluation, -1, 0.0, 0.0)
            return
        if moved.shape[0] != count:
            _record(codes, values, WRONG_LENGTH, start, evaluation, moved.shape[0], 0.0, 0.0)
            return
        for r in range(count):
            if not math.isfinite(moved[r]):
                _record(codes, values, NOT_FINITE, start + r, evaluation, -1, moved[r], 0.0)
                return
        if evaluation == 0:
            plus = moved
        else:
            for r in range(count):
                grad[start + r] = (plus[r] - moved[r]) / (2.0 * h)
        sign = -1.0
    if not central:
        for r in range(count):
            grad[start + r] = (plus[r] - base_value) / h


@njit(parallel=True, nogil=True, error_model="numpy")
def parallel_numerical_gradient_batched(
    f, x, step, h, central, base_value, chunk_size, codes, values
):
    """Batched differences of a compiled ``f`` mapping ``(k, *x.shape) -> (k,)``.

    Chunk ``m`` (one per row of ``codes``) stacks ``chunk_size`` copies of
    ``x``; chunks run in parallel, each on its own private stack, and write
    only their own range of ``grad`` and their own row of ``codes`` and
    ``values``. A difference beyond ``x``'s
    dtype becomes an infinity, which the caller refuses. ``x`` must be
    C-contiguous.
    """
    size = x.size
    chunks = codes.shape[0]
    grad = np.zeros(size, x.dtype)
    for chunk in prange(chunks):
        start = chunk * chunk_size
        stop = min(start + chunk_size, size)
        _stack_differences(
            f, x, step, h, central, base_value, start, stop, grad, (codes[chunk], values[chunk])
        )
    return grad.reshape(x.shape)
