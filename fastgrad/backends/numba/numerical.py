"""Numerical gradients on the Numba backend: of a user's compiled ``f``, in parallel.

Each thread perturbs its own copy of ``x`` (private scratch, no shared
writes inside ``prange``), so the caller's ``x`` is never written.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


# --------------------------------------------- black-box numerical gradient
# Not cached: these take the user's compiled ``f`` as an argument, so they
# are compiled once per ``f`` (and per dtype/ndim of ``x``) in each process.
@njit(parallel=True, nogil=True, error_model="numpy")
def parallel_numerical_gradient(f, x, step, h, central, base_value, chunks):
    """Central (or forward) differences of a compiled scalar ``f`` at ``x``.

    The elements are cut into per-thread chunks; every chunk perturbs its own
    private copy of ``x`` (so ``x`` itself is never written, and no thread
    sees another's perturbation) and writes only its own range of ``grad``.
    ``step`` is ``h`` in ``x``'s dtype (the perturbation, as ``x + h`` would
    round it); the quotient divides by the float64 ``h``, as the reference does.
    """
    size = x.size
    grad = np.empty(size, x.dtype)
    for chunk in prange(chunks):
        first = size * chunk // chunks
        last = size * (chunk + 1) // chunks
        work = x.copy()
        flat = work.reshape(size)
        for k in range(first, last):
            original = flat[k]
            flat[k] = original + step
            plus = np.float64(f(work))
            if central:
                flat[k] = original - step
                minus = np.float64(f(work))
                grad[k] = (plus - minus) / (2.0 * h)
            else:
                grad[k] = (plus - base_value) / h
            flat[k] = original
    return grad.reshape(x.shape)


@njit(parallel=True, nogil=True, error_model="numpy")
def parallel_numerical_gradient_batched(f, x, step, h, central, base_value, chunk_size):
    """Batched differences of a compiled ``f`` mapping ``(k, *x.shape) -> (k,)``.

    Chunk ``m`` stacks ``count`` copies of ``x``, copy ``r`` moved at element
    ``start + r``; chunks run in parallel, each on its own private stack, and
    write only their own range of ``grad``. Returns ``(grad, wrong_length)``:
    ``wrong_length`` is the length ``f`` returned when it was not ``count``
    (the chunk is then skipped and the caller raises), else -1.
    """
    flat = x.reshape(x.size)
    size = flat.shape[0]
    grad = np.zeros(size, x.dtype)
    chunks = (size + chunk_size - 1) // chunk_size
    wrong = np.full(chunks, -1, np.int64)
    for chunk in prange(chunks):
        start = chunk * chunk_size
        stop = min(start + chunk_size, size)
        count = stop - start
        stack = np.empty((count, size), x.dtype)
        for r in range(count):
            stack[r] = flat
            stack[r, start + r] = flat[start + r] + step
        plus = f(stack.reshape((count, *x.shape)))
        if plus.shape[0] != count:
            wrong[chunk] = plus.shape[0]
            continue
        if central:
            for r in range(count):
                stack[r, start + r] = flat[start + r] - step
            minus = f(stack.reshape((count, *x.shape)))
            if minus.shape[0] != count:
                wrong[chunk] = minus.shape[0]
                continue
            for r in range(count):
                grad[start + r] = (plus[r] - minus[r]) / (2.0 * h)
        else:
            for r in range(count):
                grad[start + r] = (plus[r] - base_value) / h
    return grad.reshape(x.shape), wrong.max()

