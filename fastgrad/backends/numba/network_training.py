"""Fused SGD steps by backprop for a network of any depth, activation and weight decay.

One compiled call runs every step: at batch 100 the per-step overhead of a
loop of primitives is much of a step. The first layer reads its input by
the non-zeros (CSR, ``primitives.csr_rows``): ``X @ W_1`` and the update by
``X.T @ dA_1`` cost a fifth of the dense products on MNIST (~81 % zeros).
The other layers' products go to BLAS (``np.dot``, through SciPy), which
ran them 2-7x faster than plain loops here.

Each step is two parallel loops over a few chunks (``prange``), one chunk
per thread. First every chunk takes its own rows of the batch through the
forward pass, the loss and the backward pass (a row's activations and its
``dL/dA`` need no other row), writes its rows' share of every gradient of
``W_2..W_L`` into its own slab, and lists its rows' non-zeros by input
feature. Then every chunk updates its own rows of every weight matrix: of
``W_2..W_L`` from the slabs, summed in chunk order, and of ``W_1`` (its
share of the input features) from the lists, ``X.T @ dA_1`` feature by
feature. So no two chunks write the same memory in either loop (the end of
a ``prange`` is the only synchronisation), and the results are bitwise
reproducible for a given number of chunks, whatever the threads. Other
chunk counts add the batch's gradient in other groups (rounding only).

Rule of this module: ``@njit`` kernels in the parameters' own dtype (losses
in float64), the arithmetic of the model's primitive loop up to the order of
its sums.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from fastgrad.backends.numba._jit import parallel as _parallel
from fastgrad.backends.numba._jit import serial as _serial
from fastgrad.backends.numba.network import (
    activate,
    bias_vector,
    multiply_by_slope,
    weight_matrix,
)


@_serial
def _rows(flat, batch_size, layers, layer, first, last):
    """Rows ``first:last`` of layer ``layer``'s ``(batch_size, width)`` block of ``flat``."""
    width = layers.sizes[layer + 1]
    start = batch_size * layers.unit_starts[layer]
    return flat[start + first * width : start + last * width].reshape((last - first, width))


@_serial
def _touch(starts, columns, values, rows):
    """Read one element per cache line of the non-zeros of ``X[rows]``; returns their sum.

    The rows are scattered over the training set in memory; these loads do
    not depend on one another, so the core has many misses in flight at
    once, where the sort that follows would wait for them one row at a
    time (the sort of 100 MNIST rows took 170 us without, 100 us with this
    pass, on one thread). The sum is stored by the caller, so that the
    loads are not optimised away.
    """
    total = 0.0
    for s in range(rows.shape[0]):
        for k in range(starts[rows[s]], starts[rows[s] + 1], 8):
            total += values[k] + columns[k]
    return total


@_serial
def _list_by_feature(starts, columns, values, rows, first_row, first_of, row_of, value_of):
    """The non-zeros of ``X[rows]`` grouped by input feature (a counting sort).

    Feature ``i``'s are ``row_of/value_of[first_of[i]:first_of[i + 1]]``,
    in row order; ``row_of`` holds batch rows, ``first_row + s`` for
    ``rows[s]``.
    """
    features = first_of.shape[0] - 1
    for i in range(features + 1):
        first_of[i] = 0
    for s in range(rows.shape[0]):
        for k in range(starts[rows[s]], starts[rows[s] + 1]):
            first_of[columns[k] + 1] += 1
    for i in range(features):
        first_of[i + 1] += first_of[i]
    # first_of[i] serves as feature i's cursor, which ends where feature
    # i + 1 starts; shifted back after
    for s in range(rows.shape[0]):
        for k in range(starts[rows[s]], starts[rows[s] + 1]):
            i = columns[k]
            row_of[first_of[i]] = first_row + s
            value_of[first_of[i]] = values[k]
            first_of[i] += 1
    for i in range(features, 0, -1):
        first_of[i] = first_of[i - 1]
    first_of[0] = 0


@_serial
def _first_forward(starts, columns, values, rows, W, b, code, pre, post):
    """``pre = X[rows] @ W + b`` over the listed non-zeros of each row; ``post = act(pre)``.

    Four inputs at a time, summed in pairs, so that each output row is
    loaded and stored once per four inputs rather than once per input
    (1.5x on MNIST, where each row of ``W`` comes from the L2 cache).
    """
    width = W.shape[1]
    for s in range(pre.shape[0]):
        out = pre[s]
        for j in range(width):
            out[j] = b[j]
        _add_rows(out, W, columns, values, starts[rows[s]], starts[rows[s] + 1])
        activate(code, out, post[s])


@_serial
def _softmax_cross_entropy(logits, labels, rows, dlogits, inv_batch):
    """The summed loss (float64) of ``logits`` of rows ``rows``, with labels ``labels[rows]``.

    ``dlogits`` gets ``(softmax - onehot) * inv_batch``.
    """
    count, classes = logits.shape
    total = 0.0
    for r in range(count):
        top = -np.inf
        for c in range(classes):
            top = max(top, np.float64(logits[r, c]))
        s = 0.0
        for c in range(classes):
            s += math.exp(np.float64(logits[r, c]) - top)
        log_s = math.log(s)
        label = labels[rows[r]]
        # (max - z_label) + log Σ exp(z - max): top + log_s first would cancel
        # against z_label for large logits
        total += (top - np.float64(logits[r, label])) + log_s
        for c in range(classes):
            p = math.exp((np.float64(logits[r, c]) - top) - log_s)
            dlogits[r, c] = ((p - 1.0) if c == label else p) * inv_batch
    return total


@_serial
def _column_sums(dY, out):
    for j in range(out.shape[0]):
        out[j] = 0
    for r in range(dY.shape[0]):
        for j in range(out.shape[0]):
            out[j] += dY[r, j]


@_serial
def _decay_penalty(weights, decay):
    total = 0.0
    for k in range(weights.shape[0]):
        w = np.float64(weights[k])
        total += w * w
    return 0.5 * decay * total


@_serial
def _forward_backward(starts, columns, values, labels, rows, layers, code, chunk, chunks, buffers):
    """Chunk ``chunk``'s rows of the batch ``rows``: forward, loss, backward; its shares.

    ``buffers`` are ``(pre, post, delta, grads, grad_biases, first_of,
    row_of, value_of, sums, touched)``: per layer, every row's pre-activations,
    activations and ``dL/dA`` (this chunk writes its rows only); then
    per chunk (this one writes row ``chunk``) the slabs of the gradients
    of ``W_2..W_L`` and of every bias, and its rows' non-zeros by feature
    (``_list_by_feature``); ``sums`` is the update's scratch and
    ``touched[chunk]`` gets ``_touch``'s sum. Returns the rows' summed loss.
    """
    pre, post, delta, grads, grad_biases, first_of, row_of, value_of, _, touched = buffers
    depth = layers.sizes.shape[0] - 1
    unit_starts = layers.unit_starts
    batch_size = rows.shape[0]
    first = batch_size * chunk // chunks
    last = batch_size * (chunk + 1) // chunks
    touched[chunk] = _touch(starts, columns, values, rows[first:last])
    _list_by_feature(
        starts,
        columns,
        values,
        rows[first:last],
        first,
        first_of[chunk],
        row_of[chunk],
        value_of[chunk],
    )
    _first_forward(
        starts,
        columns,
        values,
        rows[first:last],
        weight_matrix(layers, 0),
        bias_vector(layers, 0),
        code,
        _rows(pre, batch_size, layers, 0, first, last),
        _rows(post, batch_size, layers, 0, first, last),
    )
    for layer in range(1, depth):
        A = _rows(pre, batch_size, layers, layer, first, last)
        below = _rows(post, batch_size, layers, layer - 1, first, last)
        np.dot(below, weight_matrix(layers, layer), A)
        b = bias_vector(layers, layer)
        H = _rows(post, batch_size, layers, layer, first, last)
        for s in range(A.shape[0]):
            for j in range(A.shape[1]):
                A[s, j] += b[j]
            activate(code, A[s], H[s])
    dY = _rows(delta, batch_size, layers, depth - 1, first, last)
    logits = _rows(pre, batch_size, layers, depth - 1, first, last)
    loss = _softmax_cross_entropy(logits, labels, rows[first:last], dY, 1.0 / batch_size)
    for layer in range(depth - 1, 0, -1):
        W = weight_matrix(layers, layer)
        fan_in, fan_out = W.shape
        offset = layers.weight_starts[layer] - layers.weight_starts[1]
        H = _rows(post, batch_size, layers, layer - 1, first, last)
        np.dot(H.T, dY, grads[chunk, offset : offset + fan_in * fan_out].reshape((fan_in, fan_out)))
        _column_sums(dY, grad_biases[chunk, unit_starts[layer] : unit_starts[layer + 1]])
        # dL/dH below from W before its update (the update runs after every chunk is here)
        dX = _rows(delta, batch_size, layers, layer - 1, first, last)
        np.dot(dY, W.T, dX)
        A = _rows(pre, batch_size, layers, layer - 1, first, last)
        for s in range(dX.shape[0]):
            multiply_by_slope(code, A[s], H[s], dX[s])
        dY = dX
    _column_sums(dY, grad_biases[chunk, 0 : unit_starts[1]])
    return loss


@_serial
def _update(layers, batch_size, chunk, chunks, buffers, rate, decay):
    """Chunk ``chunk``'s share of the update: its rows of every ``W``, its share of the biases.

    ``W -= rate * (gradient + decay * W)`` as the model's loop, where the
    gradient of ``W_l`` (``l >= 2``) is the sum of the chunks' slabs and
    that of ``W_1`` is ``X.T @ dA_1`` over the batch's non-zeros, feature by
    feature (so that each row of ``W_1`` is read and written once a step),
    rows in batch order. An input that is zero in the whole batch gets no
    product at all (nor any change without decay), as ``W -= rate * 0``
    leaves it.
    """
    _, _, delta, grads, grad_biases, first_of, row_of, value_of, sums, _ = buffers
    depth = layers.sizes.shape[0] - 1
    # (Loops index from 0 over slices: an index from a non-zero start would
    # compile Numba's negative-index wrap-around in, and stop vectorisation.)
    for layer in range(1, depth):
        W = weight_matrix(layers, layer)
        fan_in, fan_out = W.shape
        offset = layers.weight_starts[layer] - layers.weight_starts[1]
        for i in range(fan_in * chunk // chunks, fan_in * (chunk + 1) // chunks):
            _step_row(W[i], grads, offset + i * fan_out, sums[chunk, :fan_out], rate, decay)
    units = layers.unit_starts[depth]
    first = units * chunk // chunks
    last = units * (chunk + 1) // chunks
    no_decay = rate * 0  # (a variable: a literal 0 would compile _step_row again)
    _step_row(
        layers.biases[first:last], grad_biases, first, sums[chunk, : last - first], rate, no_decay
    )
    W = weight_matrix(layers, 0)
    width = W.shape[1]
    first, last = _feature_share(first_of, chunk, chunks)
    dA = _rows(delta, batch_size, layers, 0, 0, batch_size)
    total = sums[chunk, :width]
    for i in range(first, last):
        listed = False
        for other in range(chunks):
            listed |= first_of[other, i] < first_of[other, i + 1]
        if not listed and decay == 0:
            continue  # W -= rate * 0
        total[:] = 0
        for other in range(chunks):
            _add_rows(
                total,
                dA,
                row_of[other],
                value_of[other],
                first_of[other, i],
                first_of[other, i + 1],
            )
        w = W[i]
        for j in range(width):
            w[j] -= rate * (total[j] + decay * w[j])


@_serial
def _feature_share(first_of, chunk, chunks):
    """The input features ``first:last`` whose rows of ``W_1`` chunk ``chunk`` updates.

    Cut so that every chunk gets about as many of the batch's non-zeros
    (MNIST's are in the middle of the image).
    """
    features = first_of.shape[1] - 1
    total = 0
    for other in range(chunks):
        total += first_of[other, features]
    bounds = np.empty(2, np.int64)
    for side in range(2):
        target = total * (chunk + side)
        if chunk + side == 0:
            bounds[side] = 0
        elif chunk + side == chunks:
            bounds[side] = features
        else:
            seen = 0
            i = 0
            while i < features and seen * chunks < target:
                for other in range(chunks):
                    seen += first_of[other, i + 1] - first_of[other, i]
                i += 1
            bounds[side] = i
    return bounds[0], bounds[1]


@_serial
def _add_rows(total, rows, row_of, value_of, first, last):
    """``total += sum_e value_of[e] * rows[row_of[e]]`` for ``e`` in ``first:last``.

    Four at a time, summed in pairs, so that ``total`` is loaded and stored
    once per four rows.
    """
    width = total.shape[0]
    e = first
    while e + 4 <= last:
        v0, v1, v2, v3 = value_of[e], value_of[e + 1], value_of[e + 2], value_of[e + 3]
        d0, d1 = rows[row_of[e]], rows[row_of[e + 1]]
        d2, d3 = rows[row_of[e + 2]], rows[row_of[e + 3]]
        for j in range(width):
            total[j] += (v0 * d0[j] + v1 * d1[j]) + (v2 * d2[j] + v3 * d3[j])
        e += 4
    while e < last:
        v = value_of[e]
        d = rows[row_of[e]]
        for j in range(width):
            total[j] += v * d[j]
        e += 1


@_serial
def _step_row(w, slabs, offset, total, rate, decay):
    """``w -= rate * (sum of the slabs' rows at offset + decay * w)``, slabs in order."""
    width = total.shape[0]
    first = slabs[0, offset : offset + width]
    for j in range(width):
        total[j] = first[j]
    for other in range(1, slabs.shape[0]):
        row = slabs[other, offset : offset + width]
        for j in range(width):
            total[j] += row[j]
    for j in range(width):
        w[j] -= rate * (total[j] + decay * w[j])


@_parallel
def sgd_steps(
    starts, columns, values, labels, batch_indices, layers, code, decay, lr, losses, chunks
):
    """``len(batch_indices)`` SGD steps by backprop, updating ``layers`` in place.

    The training rows are ``columns/values[starts[n]:starts[n + 1]]``
    (CSR); step ``s`` trains on rows ``batch_indices[s]``. ``losses[s]``
    gets the batch loss (float64, weight decay included) before step ``s``'s
    update, as the model's loop records it. ``chunks`` (at least 1, at most
    the batch size) is how many parts each step is cut into; one per thread.
    """
    steps, batch_size = batch_indices.shape
    depth = layers.sizes.shape[0] - 1
    dtype = layers.weights.dtype
    rate = dtype.type(lr)
    shrink = dtype.type(decay)
    units = layers.unit_starts[depth]
    features = layers.sizes[0]
    widest = 1
    for layer in range(depth):
        widest = max(widest, layers.sizes[layer + 1])
    listed = (batch_size // chunks + 1) * features
    buffers = (
        np.empty(batch_size * units, dtype),
        np.empty(batch_size * units, dtype),
        np.empty(batch_size * units, dtype),
        np.empty((chunks, layers.weight_starts[depth] - layers.weight_starts[1]), dtype),
        np.empty((chunks, units), dtype),
        np.empty((chunks, features + 1), np.int64),
        np.empty((chunks, listed), np.int64),
        np.empty((chunks, listed), dtype),
        np.empty((chunks, max(widest, units)), dtype),
        np.empty(chunks),
    )
    losses_of_chunks = np.empty(chunks)
    for step in range(steps):
        rows = batch_indices[step]
        for chunk in prange(chunks):
            # (prange numbers the chunks as unsigned in the parallel body, as
            # signed outside it: one type for both compiles each callee once)
            part = np.int64(chunk)
            losses_of_chunks[part] = _forward_backward(
                starts, columns, values, labels, rows, layers, code, part, chunks, buffers
            )
        total = 0.0
        for chunk in range(chunks):
            total += losses_of_chunks[chunk]
        losses[step] = total / batch_size
        if decay != 0:
            losses[step] += _decay_penalty(layers.weights, decay)
        for chunk in prange(chunks):
            _update(layers, batch_size, np.int64(chunk), chunks, buffers, rate, shrink)
