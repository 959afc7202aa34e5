"""The fast numerical gradient of a network of any depth and activation, in float64.

The differences of ``Backend.network_numerical_gradient`` (its docstring
states the mathematics), computed unit by unit: a perturbation of
``W_l[i, j]`` or ``b_l[j]`` moves column ``j`` of ``A_l`` only, for the samples
whose input ``H_{l-1}[n, i]`` is non-zero, and layers ``l+1..L`` are
recomputed from that column exactly (the activation of every moved
pre-activation is evaluated, so a ReLU crossing zero within ``h`` gives the
naive loop's value). For one unit and one sample, all of its perturbations
(``±h`` times each non-zero input, and ``±h`` for the bias) move the network
together, as the columns of small matrices, so that each later layer is a
matrix product over them.

Rule of this module: plain ``@njit`` loops; the one parallel loop hands each
chunk whole units, whose gradient rows only it writes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from fastgrad.backends.numba._jit import parallel as _parallel
from fastgrad.backends.numba._jit import serial as _serial
from fastgrad.backends.numba.network import (
    activate,
    activate_moved,
    bias_vector,
    weight_matrix,
)
from fastgrad.backends.numba.vector_math import exp_nonpositive

# expm1 and log1p by their Taylor series where every argument of a block is
# below this: the loops over a block then vectorise (libm's expm1 is a call
# per element). At 2**-7 the terms dropped (x**8/8! of expm1, x**9/9 of
# log1p) are below 1e-17 relative; h = 1e-4 times inputs and weights of
# order 1 stays far below it, and a block beyond it calls libm instead.
SERIES_BELOW = 2.0**-7

# Largest logit change whose loss change is formed with log1p/expm1; beyond
# it, from the log-softmax of the moved logits (no overflow, nothing
# cancels). The bound of the reference, ``_base.SMALL_LOGIT_SHIFT``, repeated
# here because a cached kernel does not see a constant of another file change.
SMALL_LOGIT_SHIFT = 1.0

# A block holds up to this many floats per buffer (two per chunk): blocks of
# a few hundred perturbations, a sample's worth on MNIST, ran 2-4x faster
# than blocks of 16-64 (each block pays a pass over every later layer).
TILE_FLOATS = 32768


@_serial
def _expm1_series(x):
    """``expm1(x)`` for ``|x| <= SERIES_BELOW`` (Horner, degree 7)."""
    return x * (
        1.0
        + x
        * (
            1.0 / 2
            + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 + x * (1.0 / 5040)))))
        )
    )


@_serial
def _log1p_series(s):
    """``log1p(s)`` for ``|s| <= SERIES_BELOW`` (Horner, degree 8)."""
    return s * (
        1.0
        + s
        * (
            -1.0 / 2
            + s
            * (
                1.0 / 3
                + s * (-1.0 / 4 + s * (1.0 / 5 + s * (-1.0 / 6 + s * (1.0 / 7 + s * (-1.0 / 8)))))
            )
        )
    )


@_serial
def forward(x, labels, layers, code, pre, post):
    """float64 forward pass: ``pre[n, unit_starts[l] + j]`` is ``A_l``, ``post`` is ``H_l``.

    For the output layer ``post`` holds the softmax probabilities. The first
    layer's product runs over the non-zeros of ``x`` only. Returns the
    batch-mean loss.
    """
    batch_size = x.shape[0]
    depth = layers.sizes.shape[0] - 1
    starts = layers.unit_starts
    loss = 0.0
    for n in range(batch_size):
        for layer in range(depth):
            W = weight_matrix(layers, layer)
            b = bias_vector(layers, layer)
            width = W.shape[1]
            out = pre[n, starts[layer] : starts[layer] + width]
            for j in range(width):
                out[j] = b[j]
            for i in range(W.shape[0]):
                v = x[n, i] if layer == 0 else post[n, starts[layer - 1] + i]
                if v != 0:
                    for j in range(width):
                        out[j] += v * W[i, j]
            if layer < depth - 1:
                activate(code, out, post[n, starts[layer] : starts[layer] + width])
        first = starts[depth - 1]
        classes = layers.sizes[depth]
        top = -np.inf
        for c in range(classes):
            top = max(top, pre[n, first + c])
        total = 0.0
        for c in range(classes):
            post[n, first + c] = exp_nonpositive(pre[n, first + c] - top)
            total += post[n, first + c]
        for c in range(classes):
            post[n, first + c] /= total
        # (max - z_label) + log Σ exp(z - max), which does not cancel for large logits
        loss += (top - pre[n, first + labels[n]]) + math.log(total)
    return loss / batch_size


@_serial
def _listed_inputs(x, post, layers):
    """The non-zero inputs of every layer, sample by sample (CSR).

    Layer ``l``'s inputs of sample ``n`` are ``columns/values[starts[l, n]:
    starts[l, n + 1]]``; layer 0's are ``x[n]``, layer ``l``'s ``H_{l-1}[n]``.
    """
    batch_size = x.shape[0]
    depth = layers.sizes.shape[0] - 1
    capacity = 0
    for layer in range(depth):
        capacity += batch_size * layers.sizes[layer]
    starts = np.empty((depth, batch_size + 1), np.int64)
    columns = np.empty(capacity, np.int64)
    values = np.empty(capacity)
    count = 0
    for layer in range(depth):
        offset = layers.unit_starts[layer - 1] if layer > 0 else 0
        for n in range(batch_size):
            starts[layer, n] = count
            for i in range(layers.sizes[layer]):
                v = x[n, i] if layer == 0 else post[n, offset + i]
                if v != 0:
                    columns[count] = i
                    values[count] = v
                    count += 1
        starts[layer, batch_size] = count
    return starts, columns, values


@_serial
def _propagate(code, W, pre_row, post_row, source, tile, count, target, row):
    """``target = W.T @ (act(pre_row + source) - post_row)`` for one block of perturbations.

    ``source`` holds the changes of a layer's pre-activations, unit ``u`` at
    ``source[u * tile : u * tile + count]`` (one column per perturbation);
    ``target`` gets the next layer's in the same layout. Units whose output
    does not move (a ReLU that stays off) add nothing and are skipped.
    """
    fan_in, fan_out = W.shape
    for c in range(fan_out):
        target[c * tile : c * tile + count] = 0.0
    for u in range(fan_in):
        if activate_moved(code, pre_row[u], post_row[u], source[u * tile :], row[:count]):
            for c in range(fan_out):
                weight = W[u, c]
                out = target[c * tile : c * tile + count]
                for t in range(count):
                    out[t] += weight * row[t]


@_serial
def _log_normaliser(base):
    """``(top, log_total)`` of a row of logits: ``log p_c = (base[c] - top) - log_total``."""
    top = -np.inf
    for c in range(base.shape[0]):
        top = max(top, base[c])
    total = 0.0
    for c in range(base.shape[0]):
        total += math.exp(base[c] - top)
    return top, math.log(total)


@_serial
def _large_loss_changes(base, label, logits, tile, count, changes):
    """``_loss_changes`` where a logit moves by more than ``SMALL_LOGIT_SHIFT``.

    ``log(sum_c p_c e^{d_c}) = logsumexp_c(log p_c + d_c)``, shifted by its
    maximum: no ``expm1`` to overflow, no ``1 + sum`` to cancel, and the
    classes whose ``p_c`` underflowed still count. Its rounding error
    (~eps·max|d|) is no larger than that of the change itself.
    """
    classes = base.shape[0]
    top, log_total = _log_normaliser(base)
    for t in range(count):
        moved_top = -np.inf
        for c in range(classes):
            moved_top = max(moved_top, (base[c] - top) + logits[c * tile + t])
        total = 0.0
        for c in range(classes):
            total += math.exp((base[c] - top) + logits[c * tile + t] - moved_top)
        moved = moved_top + math.log(total) - log_total
        changes[t] = moved - logits[label * tile + t]


@_serial
def _loss_changes(probabilities, base, label, logits, tile, count, sums, changes):
    """``changes[t] = log1p(sum_c p_c expm1(d_c)) - d_label``, ``d_c = logits[c * tile + t]``.

    ``base`` are the sample's logits (whose softmax is ``probabilities``).
    """
    classes = probabilities.shape[0]
    largest = 0.0
    for c in range(classes):
        for t in range(count):
            largest = max(largest, abs(logits[c * tile + t]))
    if largest > SMALL_LOGIT_SHIFT:
        _large_loss_changes(base, label, logits, tile, count, changes)
        return
    for t in range(count):
        sums[t] = 0.0
    for c in range(classes):
        p = probabilities[c]
        moved = logits[c * tile : c * tile + count]
        if largest <= SERIES_BELOW:
            for t in range(count):
                sums[t] += p * _expm1_series(moved[t])
        else:
            for t in range(count):
                sums[t] += p * math.expm1(moved[t])
    smallest_sum = 0.0
    for t in range(count):
        smallest_sum = max(smallest_sum, abs(sums[t]))
    on_label = logits[label * tile : label * tile + count]
    if smallest_sum <= SERIES_BELOW:
        for t in range(count):
            changes[t] = _log1p_series(sums[t]) - on_label[t]
    else:
        for t in range(count):
            changes[t] = math.log1p(sums[t]) - on_label[t]


@_serial
def _moved_log_partition(base, k, d):
    """``log(sum_c p_c e^{d [c == k]})`` for logits ``base``, from the log-softmax (no overflow)."""
    top, log_total = _log_normaliser(base)
    moved_top = -np.inf
    for c in range(base.shape[0]):
        moved_top = max(moved_top, (base[c] - top) + (d if c == k else 0.0))
    total = 0.0
    for c in range(base.shape[0]):
        total += math.exp((base[c] - top) + (d if c == k else 0.0) - moved_top)
    return moved_top + math.log(total) - log_total


@_serial
def _block_changes(layers, code, pre, post, label, n, layer, j, shifts, count, scratch):
    """The loss change of sample ``n`` for each shift of ``A_layer[n, j]`` by ``shifts[t]``.

    Returns them in ``changes = scratch[0]``, ``[:count]``; ``scratch`` is
    one chunk's private buffers.
    """
    changes, first_moves, buffer, other, row, sums = scratch
    depth = layers.sizes.shape[0] - 1
    starts = layers.unit_starts
    tile = row.shape[0]
    out = starts[depth - 1]
    classes = layers.sizes[depth]
    unit = starts[layer] + j
    if layer == depth - 1:
        p = post[n, unit]
        on_label = label == j
        base = pre[n, out : out + classes]
        for t in range(count):
            d = shifts[t]
            if abs(d) <= SMALL_LOGIT_SHIFT:
                moved = math.log1p(p * math.expm1(d))
            else:
                moved = _moved_log_partition(base, j, d)
            changes[t] = moved - (d if on_label else 0.0)
        return
    if not activate_moved(code, pre[n, unit], post[n, unit], shifts, first_moves[:count]):
        for t in range(count):  # a unit that stays off: no loss moves
            changes[t] = 0.0
        return
    # layer + 1 moves by first_moves * W_{layer+1}[j, :], one column per shift
    W = weight_matrix(layers, layer + 1)
    width = W.shape[1]
    for c in range(width):
        weight = W[j, c]
        target = buffer[c * tile : c * tile + count]
        for t in range(count):
            target[t] = weight * first_moves[t]
    for later in range(layer + 1, depth - 1):
        first = starts[later]
        width = layers.sizes[later + 1]
        _propagate(
            code,
            weight_matrix(layers, later + 1),
            pre[n, first : first + width],
            post[n, first : first + width],
            buffer,
            tile,
            count,
            other,
            row,
        )
        buffer, other = other, buffer
    _loss_changes(
        post[n, out : out + classes],
        pre[n, out : out + classes],
        label,
        buffer,
        tile,
        count,
        sums,
        changes,
    )


@_serial
def _unit_gradient(layers, code, labels, pre, post, listed, h, layer, j, shifts, scratch, grad_row):
    """Sum over samples of the central differences of ``W_layer[:, j]`` and ``b_layer[j]``.

    ``grad_row`` (``W_layer[:, j]``'s, zeroed) gets the sums; returns ``b``'s.
    Shifts come in pairs, ``+h·v`` then ``-h·v``, a block of them at a time.
    """
    starts, columns, values = listed
    pairs = shifts.shape[0] // 2
    bias_total = 0.0
    for n in range(pre.shape[0]):
        first, last = starts[layer, n], starts[layer, n + 1]
        inputs = last - first + 1  # the listed non-zeros, then the bias's input of 1
        for block in range(0, inputs, pairs):
            size = min(pairs, inputs - block)
            for q in range(size):
                k = first + block + q
                v = values[k] if k < last else 1.0
                shifts[2 * q] = h * v
                shifts[2 * q + 1] = -h * v
            _block_changes(
                layers, code, pre, post, labels[n], n, layer, j, shifts, 2 * size, scratch
            )
            changes = scratch[0]
            for q in range(size):
                k = first + block + q
                difference = changes[2 * q] - changes[2 * q + 1]
                if k < last:
                    grad_row[columns[k]] += difference
                else:
                    bias_total += difference
    return bias_total


@_parallel
def numerical_gradient(x, labels, layers, code, h, chunks, tile, grad_weights_t, grad_biases):
    """Central differences of every parameter of ``layers`` at ``(x, labels)``, float64.

    ``grad_weights_t`` (zeros, laid out as ``layers.weights`` but each
    ``W_l`` transposed, ``(fan_out, fan_in)``) and ``grad_biases`` get the
    gradients of the batch-mean loss (weight decay not included).

    The units of all layers are dealt round-robin to ``chunks`` chunks (so
    every chunk gets a share of the expensive first layers). Each chunk has
    private scratch and writes only the gradients of its own units: row
    ``j`` of ``W_l.T`` and ``b_l[j]``, which no other chunk touches. So
    there is no race and no reduction across threads, and the result does
    not depend on the number of threads.
    """
    batch_size = x.shape[0]
    depth = layers.sizes.shape[0] - 1
    units = layers.unit_starts[depth]
    widest = 1
    for layer in range(depth):
        widest = max(widest, layers.sizes[layer + 1])
    pre = np.empty((batch_size, units))
    post = np.empty((batch_size, units))
    forward(x, labels, layers, code, pre, post)
    listed = _listed_inputs(x, post, layers)
    scale = 1.0 / (2.0 * h * batch_size)
    for chunk in prange(chunks):
        # (prange numbers the chunks as unsigned inside, signed outside: one
        # type for both compiles each callee once)
        part = np.int64(chunk)
        shifts = np.empty(tile)
        scratch = (
            np.empty(tile),
            np.empty(tile),
            np.empty(widest * tile),
            np.empty(widest * tile),
            np.empty(tile),
            np.empty(tile),
        )
        for unit in range(part, units, chunks):
            layer = 0
            while unit >= layers.unit_starts[layer + 1]:
                layer += 1
            j = unit - layers.unit_starts[layer]
            fan_in = layers.sizes[layer]
            first = layers.weight_starts[layer] + j * fan_in
            grad_row = grad_weights_t[first : first + fan_in]
            bias_total = _unit_gradient(
                layers, code, labels, pre, post, listed, h, layer, j, shifts, scratch, grad_row
            )
            for i in range(fan_in):
                grad_row[i] *= scale
            grad_biases[unit] = bias_total * scale
