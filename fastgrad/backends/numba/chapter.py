"""The fused chapter path: whole training steps and numerical gradients of 784-H-10 sigmoid.

Overrides for one-hidden-layer sigmoid nets without weight decay only
(``NumbaBackend.fused_sgd_steps`` and ``network_numerical_gradient`` choose
them); every other network runs the primitives. The fused training loop
(``sgd_worker``) is a serial ``nogil`` kernel that the backend runs on
several Python threads meeting at a spin barrier: a step is ~0.3 ms of work
with two meeting points, and a cached ``parallel=True`` kernel compiles and
loads much slower (numba#8085).

Sparse inputs: MNIST pixels are ~81 % zeros, so the kernels that multiply by
an input matrix skip its zeros (``x @ W1`` and ``x.T @ dZ`` over non-zeros
only). The sums are the same as the dense ones up to reassociation, because
adding ``0 * w`` changes nothing (except that ``0 * inf`` would be NaN: a
non-finite weight is already a diverged run).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from fastgrad.backends.numba._jit import parallel as _parallel
from fastgrad.backends.numba._jit import serial as _serial
from fastgrad.backends.numba.primitives import _compact_row
from fastgrad.backends.numba.simd import gather_rows, scatter_rows
from fastgrad.backends.numba.sync import ROW_TICKETS, barrier, take_ticket
from fastgrad.backends.numba.vector_math import exp_nonpositive, sigmoid_in_own_precision
from fastgrad.backends.numba.vector_math import sigmoid as _sigmoid

# The shifted-expansion path of the numerical gradient is used while
# h * max|x| * max(1, spread of a W2 row) stays below this; see
# ``numerical_prepare`` for the error bound it buys.
TAYLOR_MAX_SHIFT = 1e-3

# Largest logit change whose loss change the exact path forms with
# log1p/expm1; beyond it, from the log-probabilities (no overflow, nothing
# cancels). The bound of the reference, ``_base.SMALL_LOGIT_SHIFT``, repeated
# here because a cached kernel does not see a constant of another file change.
SMALL_LOGIT_SHIFT = 1.0


# ---------------------------------------------------------- two-layer net
@_serial
def _hidden_row(x, n, W1, b1, hidden_row):
    """``hidden_row = x[n] @ W1 + b1`` over the non-zeros of ``x[n]`` (pre-activation)."""
    for j in range(W1.shape[1]):
        hidden_row[j] = b1[j]
    for i in range(x.shape[1]):
        v = x[n, i]
        if v != 0:
            for j in range(W1.shape[1]):
                hidden_row[j] += v * W1[i, j]


@_serial
def _forward_rows(x, first, last, W1, b1, W2, b2, logits, hidden_row, logit_row):
    hidden_size, classes = W2.shape
    for n in range(first, last):
        _hidden_row(x, n, W1, b1, hidden_row)
        for j in range(hidden_size):
            hidden_row[j] = _sigmoid(np.float64(hidden_row[j]))
        for c in range(classes):
            logit_row[c] = b2[c]
        for j in range(hidden_size):
            hv = hidden_row[j]
            for c in range(classes):
                logit_row[c] += hv * W2[j, c]
        for c in range(classes):
            logits[n, c] = logit_row[c]


@_serial
def two_layer_logits(x, first, last, W1, b1, W2, b2, logits):
    """Logits of rows ``first:last`` of ``x``, written to the same rows of ``logits``.

    Serial and ``nogil``: the backend runs row blocks of large inputs in
    Python threads, each writing only its own rows (no parfor, so no
    parallel-compile cost for a kernel this simple).
    """
    hidden_row = np.empty(W1.shape[1], W1.dtype)
    logit_row = np.empty(W2.shape[1], W2.dtype)
    _forward_rows(x, first, last, W1, b1, W2, b2, logits, hidden_row, logit_row)


@_serial
def _softmax_backward(logit, label, exps, inv_batch):
    """One row's softmax cross-entropy: returns its loss and turns ``logit`` into ``dL/dlogits``.

    In float64 whatever the dtype; ``dL/dlogits`` is of the batch mean (via
    ``inv_batch``). ``exps`` is float64 scratch, one per class.
    """
    classes = logit.shape[0]
    top = -np.inf
    for c in range(classes):
        top = max(top, np.float64(logit[c]))
    # the exponentials once, in a loop of their own that LLVM vectorises
    for c in range(classes):
        exps[c] = exp_nonpositive(np.float64(logit[c]) - top)
    total = 0.0
    for c in range(classes):
        total += exps[c]
    # (max - z_label) + log Σ exp(z - max): adding log Σ to max first would
    # cancel against z_label for large logits
    loss = (top - np.float64(logit[label])) + math.log(total)
    scale = inv_batch / total
    for c in range(classes):
        p_scaled = exps[c] * scale
        logit[c] = (p_scaled - inv_batch) if c == label else p_scaled
    return loss


@_serial
def _backward_to_hidden(W2T, dlogit, hidden_row, units, back):
    """``back = (dlogit @ W2T) * h * (1 - h)``: ``dL/d(pre-activation)`` of ``units`` hidden units.

    ``W2T`` is ``W2.T`` as a C-contiguous copy (so that the product runs
    along its rows), possibly wider than ``units`` (padded); ``back``'s
    extra lanes get the padding columns' product without the factor.
    """
    back[:] = 0
    gather_rows(W2T, back, None, dlogit, 0, W2T.shape[0])
    for j in range(units):
        hv = hidden_row[j]
        back[j] = back[j] * (hv * (1 - hv))


@_serial
def _copy_into(out, values):
    """``out[:len(values)] = values`` for 1-d arrays, element by element.

    Numba's own slice assignment from an array checks the shapes and, for
    its error message, compiles integer-to-string and string concatenation:
    2.5 s of a training run's cold compile (of ~13 s), paid by the first
    kernel that uses it.
    """
    for j in range(values.shape[0]):
        out[j] = values[j]


@_serial
def _hidden_pass(W1, b1, cols, vals, first, last, row):
    """``row[:len(b1)] = sigmoid(b1 + x @ W1)`` for the input listed as ``cols/vals[first:last]``.

    ``row`` and ``W1`` may be wider than ``b1`` (padded); the extra lanes
    get ``x @ W1`` of the padding columns, without the sigmoid.
    """
    units = b1.shape[0]
    _copy_into(row, b1)
    row[units:] = 0
    # x @ W1 over the listed non-zeros, four inputs per pass (a reassociation)
    gather_rows(W1, row, cols, vals, first, last)
    for j in range(units):
        row[j] = sigmoid_in_own_precision(row[j])


@_serial
def _unit_grads(hidden, dpre, dlogits_t, gb1, gW2T):
    """``gb1 = sum(dpre)`` and ``gW2.T = dlogits.T @ hidden`` over the batch for ``len(gb1)`` units.

    ``hidden``, ``dpre`` and ``gW2T`` may be wider than ``gb1`` (padded):
    ``gW2T`` then also takes the padding columns' products. Each sum runs
    over the batch in one fixed order, lane by lane, so a unit's gradients
    do not depend on which other units share the call.
    """
    batch_size = hidden.shape[0]
    units = gb1.shape[0]
    gb1[:] = 0
    for b in range(batch_size):
        for j in range(units):
            gb1[j] += dpre[b, j]
    for c in range(dlogits_t.shape[0]):
        gW2T[c] = 0
        gather_rows(hidden, gW2T[c], None, dlogits_t[c], 0, batch_size)


@_serial
def _class_grads(dlogits_t, first_class, last_class, gb2):
    """``gb2[c] = sum(dlogits[:, c])`` for classes ``first_class:last_class``, in batch order."""
    for c in range(first_class, last_class):
        gb2[c] = 0
        for b in range(dlogits_t.shape[1]):
            gb2[c] += dlogits_t[c, b]


@_serial
def two_layer_gradient(x, labels, W1, b1, W2, b2, gW1, gb1, gW2, gb2):
    """Backprop over all rows of ``x``; fills the gradients, returns the loss."""
    batch_size, features = x.shape
    hidden_size, classes = W2.shape
    cols = np.empty((batch_size, features), np.int32)
    vals = np.empty((batch_size, features), W1.dtype)
    counts = np.empty(batch_size, np.int64)
    hidden = np.empty((batch_size, hidden_size), W1.dtype)
    dpre = np.empty((batch_size, hidden_size), W1.dtype)
    dlogits = np.empty((batch_size, classes), W1.dtype)
    exps = np.empty(classes)
    W2T = np.ascontiguousarray(W2.T)
    gW2T = np.empty((classes, hidden_size), W1.dtype)
    inv_batch = 1.0 / batch_size
    loss = 0.0
    for n in range(batch_size):
        counts[n] = _compact_row(x, n, cols[n], vals[n])
        _hidden_pass(W1, b1, cols[n], vals[n], 0, counts[n], hidden[n])
        # hidden @ W2 apart, then + b2: the association of sgd_worker's
        # single-block case, whose steps this kernel's gradient must match
        logit = dlogits[n]
        logit[:] = 0
        gather_rows(W2, logit, None, hidden[n], 0, hidden_size)
        for c in range(classes):
            logit[c] = b2[c] + logit[c]
        loss += _softmax_backward(logit, labels[n], exps, inv_batch)
        _backward_to_hidden(W2T, logit, hidden[n], hidden_size, dpre[n])
    dlogits_t = np.ascontiguousarray(dlogits.T)
    _unit_grads(hidden, dpre, dlogits_t, gb1, gW2T)
    _class_grads(dlogits_t, 0, classes, gb2)
    # gW2 = gW2T.T element by element, for the reason of _copy_into
    for j in range(hidden_size):
        for c in range(classes):
            gW2[j, c] = gW2T[c, j]
    gW1[:] = 0
    for b in range(batch_size):
        # gW1[i] += v * dpre[b], exactly: W - (-1 * v) * d rounds as W + v * d
        scatter_rows(gW1, dpre[b], cols[b], vals[b], 0, counts[b], -1.0)
    return loss * inv_batch


# Batch rows handed out per ticket in the output-layer phase of
# ``sgd_worker``: a few microseconds of work, against one shared atomic
# increment.
ROWS_PER_TICKET = 4


@_serial
def sgd_worker(
    thread,
    threads,
    sync,
    unit_bounds,
    starts,
    all_columns,
    all_values,
    labels,
    batch_indices,
    W1_blocks,
    b1,
    W2,
    b2,
    lr,
    losses,
    W2T_blocks,
    hidden_blocks,
    dpre_blocks,
    partial_logits,
    dlogits,
    row_losses,
):
    """Thread ``thread``'s share of ``len(batch_indices)`` SGD steps by backprop, in place.

    The inputs are given by their non-zeros (``csr_rows``): row ``n`` is
    ``all_columns/all_values[starts[n]:starts[n+1]]`` and ``batch_indices``
    index those rows. The hidden units are cut into blocks, block ``k``
    being units ``unit_bounds[k]:unit_bounds[k+1]`` (``u`` of them), and
    ``W1`` comes in those blocks: ``W1_blocks[k, :, :u]`` is ``W1[:, units
    of k]``, and ``W2T_blocks[k, :, :u]`` is ``W2.T``'s (kept in step with
    ``W2``), each padded with zero columns to a common width.

    ``threads`` callers run this at once on the same arrays, each with its
    own ``thread`` number. Scratch: ``hidden_blocks``, ``dpre_blocks``:
    ``(blocks, batch, width)``; ``partial_logits``: ``(blocks, batch, >=
    classes)``; ``dlogits``: ``(batch, >= classes)``; ``row_losses``:
    ``(batch, any)``, column 0 used. A step has three phases, split by two
    barriers (``_numba_sync``):

    1. Thread ``t`` takes blocks ``t, t + threads, ...`` (threads beyond
       the blocks wait) and computes, for every batch row, each block's
       hidden units ``sigmoid(x @ W1 + b1)`` and their share of the logits,
       ``hidden @ W2`` over its units.
    2. The threads take the batch rows a few at a time (``take_ticket``):
       logits (``b2`` plus the blocks' shares, in block order), softmax
       cross-entropy and ``dL/dlogits``.
    3. Each thread backpropagates to its blocks' units and updates their
       ``b1``, ``W2`` rows and ``W1`` blocks. Each thread updates a slice of
       the classes' ``b2``; thread 0 records the loss.

    The cut by units is for the caches. Each ``W1`` block is read and
    written by one thread only, so it stays in that core's cache, and its
    rows are whole cache lines; between the threads pass only the logits'
    shares and ``dL/dlogits``, a cache line per batch row each. (Cut by
    batch rows and input features instead, as before, every ``W1`` row
    moved between the cores twice a step: ~1.3x slower on the ``W1`` work
    at 2 threads. Handing the hidden activations to the threads of phase 2
    rather than the logits' shares cost about as much again.) The next
    step's phase 1 needs nothing but the thread's own block, so a step
    needs only the two barriers.

    Which thread computes what, and how many threads there are, does not
    change the arithmetic for a given number of blocks: no two threads
    write the same element, and every sum runs in a fixed order. The
    blocks do: the logits add up per block, a reassociation, so results
    for different numbers of blocks agree to rounding, and bitwise for the
    same number. The ``W1`` update is applied
    per non-zero input (``W1[i] -= lr*x[n,i]*dpre[n]``, in batch order)
    rather than through a dense ``x.T @ dpre``: all-zero input columns get
    no update at all, exactly as ``W1 -= lr * 0`` leaves them.
    """
    steps, batch_size = batch_indices.shape
    classes = W2.shape[1]
    blocks = unit_bounds.shape[0] - 1
    width = W1_blocks.shape[2]
    row_tickets = (batch_size + ROWS_PER_TICKET - 1) // ROWS_PER_TICKET
    first_class = classes * thread // threads
    last_class = classes * (thread + 1) // threads
    exps = np.empty(classes)
    dlogits_t = np.empty((classes, batch_size), W1_blocks.dtype)
    # the step's gradients of this thread's units and classes
    gb1 = np.empty(width, W1_blocks.dtype)
    gW2T = np.empty((classes, width), W1_blocks.dtype)
    gb2 = np.empty(classes, W1_blocks.dtype)
    inv_batch = 1.0 / batch_size
    generation = 0
    for step in range(steps):
        for block in range(thread, blocks, threads):
            first_unit, units = unit_bounds[block], unit_bounds[block + 1] - unit_bounds[block]
            own_W1, own_hidden = W1_blocks[block], hidden_blocks[block]
            own_b1 = b1[first_unit : first_unit + units]
            own_W2 = W2[first_unit : first_unit + units]
            for b in range(batch_size):
                n = batch_indices[step, b]
                first, last = starts[n], starts[n + 1]
                _hidden_pass(own_W1, own_b1, all_columns, all_values, first, last, own_hidden[b])
                share = partial_logits[block, b, :classes]
                share[:] = 0
                gather_rows(own_W2, share, None, own_hidden[b], 0, units)
        if not barrier(sync, threads, generation):
            return
        generation += 1
        ticket = take_ticket(sync, ROW_TICKETS, threads)
        while ticket < row_tickets:
            for b in range(
                ticket * ROWS_PER_TICKET, min(batch_size, (ticket + 1) * ROWS_PER_TICKET)
            ):
                logit = dlogits[b, :classes]
                _copy_into(logit, b2)
                for k in range(blocks):
                    for c in range(classes):
                        logit[c] += partial_logits[k, b, c]
                n = batch_indices[step, b]
                row_losses[b, 0] = _softmax_backward(logit, labels[n], exps, inv_batch)
            ticket = take_ticket(sync, ROW_TICKETS, threads)
        if not barrier(sync, threads, generation):
            return
        generation += 1
        if thread == 0:
            # every thread has taken its last row ticket of the step
            sync[ROW_TICKETS] = 0
            total = 0.0
            for b in range(batch_size):
                total += row_losses[b, 0]
            losses[step] = total * inv_batch
        # each thread its own copy, in the layout dlogits.T @ hidden reads
        for c in range(classes):
            for b in range(batch_size):
                dlogits_t[c, b] = dlogits[b, c]
        _class_grads(dlogits_t, first_class, last_class, gb2)
        for c in range(first_class, last_class):
            b2[c] -= lr * gb2[c]
        for block in range(thread, blocks, threads):
            first_unit, units = unit_bounds[block], unit_bounds[block + 1] - unit_bounds[block]
            own_W1, own_W2T = W1_blocks[block], W2T_blocks[block]
            own_hidden, own_dpre = hidden_blocks[block], dpre_blocks[block]
            own_b1 = b1[first_unit : first_unit + units]
            own_W2 = W2[first_unit : first_unit + units]
            for b in range(batch_size):
                dlogit = dlogits[b, :classes]
                _backward_to_hidden(own_W2T, dlogit, own_hidden[b], units, own_dpre[b])
            _unit_grads(own_hidden, own_dpre, dlogits_t, gb1[:units], gW2T)
            for j in range(units):
                own_b1[j] -= lr * gb1[j]
                for c in range(classes):
                    own_W2[j, c] -= lr * gW2T[c, j]
                    own_W2T[c, j] -= lr * gW2T[c, j]
            for b in range(batch_size):
                n = batch_indices[step, b]
                scatter_rows(
                    own_W1, own_dpre[b], all_columns, all_values, starts[n], starts[n + 1], lr
                )


# ------------------------------------------------- numerical gradient (fast)
# The fast numerical gradient never re-runs the network per perturbation: a
# perturbation of W1[i, j] or b1[j] moves one hidden unit of the samples whose
# input i is non-zero, one of W2[j, k] or b2[k] moves one logit, and each
# sample's loss change is formed from that small move directly.
@_serial
def _forward64(x, labels, W1, b1, W2, b2, pre, hidden, probabilities, log_probabilities):
    """float64 forward pass keeping pre-activations, activations, softmax and log-softmax.

    Returns the batch-mean loss (log-sum-exp form, as the reference's).
    """
    batch_size = x.shape[0]
    hidden_size, classes = W2.shape
    loss = 0.0
    for n in range(batch_size):
        _hidden_row(x, n, W1, b1, pre[n])
        for j in range(hidden_size):
            hidden[n, j] = _sigmoid(pre[n, j])
        for c in range(classes):
            probabilities[n, c] = b2[c]
        for j in range(hidden_size):
            for c in range(classes):
                probabilities[n, c] += hidden[n, j] * W2[j, c]
        top = -np.inf
        for c in range(classes):
            top = max(top, probabilities[n, c])
        total = 0.0
        label_logit = probabilities[n, labels[n]]
        for c in range(classes):
            shifted = probabilities[n, c] - top
            log_probabilities[n, c] = shifted
            probabilities[n, c] = math.exp(shifted)
            total += probabilities[n, c]
        log_total = math.log(total)
        for c in range(classes):
            probabilities[n, c] /= total
            log_probabilities[n, c] -= log_total
        loss += (top - label_logit) + log_total
    return loss / batch_size


@_serial
def _expansion_applies(x, W2, h, max_shift):
    """Whether ``h * max(1, max|x|) * max(1, widest W2 row) <= max_shift``.

    That product bounds the expansion's small parameter; see
    ``numerical_prepare`` for the error it buys.
    """
    biggest = 1.0
    for n in range(x.shape[0]):
        for i in range(x.shape[1]):
            biggest = max(biggest, abs(x[n, i]))
    spread = 1.0
    for j in range(W2.shape[0]):
        low = np.inf
        high = -np.inf
        for c in range(W2.shape[1]):
            low = min(low, W2[j, c])
            high = max(high, W2[j, c])
        spread = max(spread, high - low)
    return h * biggest * spread <= max_shift


@_serial
def _hidden_coefficients(hidden, probabilities, labels, W2, h, first_order, third_order):
    """Per (sample n, hidden unit j) coefficients of the shifted expansion.

    Moving hidden pre-activation ``a`` by ``s`` moves the hidden unit by
    ``δ(s) = σ1 s + σ2 s²/2 + σ3 s³/6 + ...`` (σk: k-th derivative of the
    sigmoid at ``a``) and the sample's loss by ``g(δ) = log Σ_c p_c e^{δ w_c} -
    δ w_label`` with ``w = W2[j]``: the cumulant generating function of ``w``
    under ``p``, ``g(δ) = (κ1 - w_label) δ + κ2 δ²/2 + κ3 δ³/6 + O(δ⁴)``. The
    odd part of ``g(δ(s))`` is ``G1 s + G3 s³ + O(s⁵)`` with

        G1 = (κ1 - w_label) σ1
        G3 = (κ1 - w_label) σ3 / 6 + κ2 σ1 σ2 / 2 + κ3 σ1³ / 6

    so the central difference of one sample, ``(g(δ(s)) - g(δ(-s))) / 2h`` with
    ``s = h x``, is ``x G1 + h² x³ G3 + O(h⁴ x⁵)``. ``first_order`` gets G1 and
    ``third_order`` gets ``h² G3``.
    """
    batch_size, hidden_size = hidden.shape
    classes = W2.shape[1]
    h2 = h * h
    for n in range(batch_size):
        label = labels[n]
        for j in range(hidden_size):
            mean = 0.0
            for c in range(classes):
                mean += probabilities[n, c] * W2[j, c]
            second = 0.0
            third = 0.0
            for c in range(classes):
                centred = W2[j, c] - mean
                weighted = probabilities[n, c] * centred * centred
                second += weighted
                third += weighted * centred
            y = hidden[n, j]
            s1 = y * (1.0 - y)
            s2 = s1 * (1.0 - 2.0 * y)
            s3 = s1 * (1.0 - 6.0 * s1)
            drift = mean - W2[j, label]
            first_order[n, j] = drift * s1
            third_order[n, j] = h2 * (
                drift * s3 / 6.0 + 0.5 * second * s1 * s2 + third * s1 * s1 * s1 / 6.0
            )


@_serial
def _partition_change(p, log_p, weights, change):
    """``log(sum_c p_c exp(change * weights[c]))``: a sample's log-partition change.

    Formed from the small logit changes with ``log1p``/``expm1`` (as in the
    reference), never as a difference of losses; where a logit moves by more
    than ``SMALL_LOGIT_SHIFT``, as the log-sum-exp of the moved
    log-probabilities ``log_p``, which neither overflows nor loses the
    classes whose ``p_c`` underflowed.
    """
    classes = p.shape[0]
    largest = 0.0
    for c in range(classes):
        largest = max(largest, abs(change * weights[c]))
    if largest <= SMALL_LOGIT_SHIFT:
        total = 0.0
        for c in range(classes):
            total += p[c] * math.expm1(change * weights[c])
        return math.log1p(total)
    top = -np.inf
    for c in range(classes):
        top = max(top, log_p[c] + change * weights[c])
    total = 0.0
    for c in range(classes):
        total += math.exp(log_p[c] + change * weights[c] - top)
    return top + math.log(total)


@_serial
def _exact_hidden_diff(pre, hidden, probabilities, log_probabilities, label, W2, n, j, step):
    """``L_n(a + step) - L_n(a - step)`` for hidden unit ``j`` of sample ``n``, exactly.

    Each loss change is formed from its logit changes (``_partition_change``),
    never as a difference of losses.
    """
    base = hidden[n, j]
    up_change = _sigmoid(pre[n, j] + step) - base
    down_change = _sigmoid(pre[n, j] - step) - base
    p, log_p, weights = probabilities[n], log_probabilities[n], W2[j]
    up = _partition_change(p, log_p, weights, up_change)
    down = _partition_change(p, log_p, weights, down_change)
    label_weight = W2[j, label]
    return (up - up_change * label_weight) - (down - down_change * label_weight)


@_serial
def _output_gradients(hidden, probabilities, log_probabilities, labels, h, expansion, gW2, gb2):
    """Central differences of ``W2`` and ``b2`` (the caller divides by N).

    Moving logit ``k`` by ``d`` moves a sample's loss by ``K(d) - d t_k`` with
    ``K(d) = log(1 + p_k (e^d - 1))``, the cumulant generating function of a
    Bernoulli(p_k); its odd part is ``p d + κ3 d³/6 + κ5 d⁵/120 + ...`` with
    ``κ3 = p(1-p)(1-2p)`` and ``|κ5| < 0.04``, so the central difference with
    ``d = h y`` is ``y (p - t) + h² y³ κ3 / 6`` up to ``h⁴ y⁵ / 3000``
    (< 1e-19 at h = 1e-4, |y| <= 1).
    """
    batch_size, hidden_size = hidden.shape
    classes = probabilities.shape[1]
    gW2[:] = 0.0
    gb2[:] = 0.0
    h2 = h * h
    inv_2h = 1.0 / (2.0 * h)
    for n in range(batch_size):
        label = labels[n]
        for c in range(classes):
            p = probabilities[n, c]
            target = 1.0 if c == label else 0.0
            if expansion:
                slope = p - target
                curve = h2 * p * (1.0 - p) * (1.0 - 2.0 * p) / 6.0
                gb2[c] += slope + curve
                for j in range(hidden_size):
                    y = hidden[n, j]
                    gW2[j, c] += y * (slope + curve * y * y)
            else:
                log_p = log_probabilities[n]
                gb2[c] += _exact_output_diff(p, log_p, c, target, h) * inv_2h
                for j in range(hidden_size):
                    step = h * hidden[n, j]
                    gW2[j, c] += _exact_output_diff(p, log_p, c, target, step) * inv_2h


@_serial
def _exact_output_diff(p, log_p, k, target, step):
    """``L(z_k + step) - L(z_k - step)`` of a sample (``p = p_k``, ``log_p`` its row)."""
    if abs(step) <= SMALL_LOGIT_SHIFT:
        up = math.log1p(p * math.expm1(step))
        down = math.log1p(p * math.expm1(-step))
    else:
        up = _moved_log_partition(log_p, k, step)
        down = _moved_log_partition(log_p, k, -step)
    return up - down - 2.0 * step * target


@_serial
def _moved_log_partition(log_p, k, step):
    """``log(sum_c p_c exp(step [c == k]))`` from the log-probabilities, shifted by the maximum."""
    top = -np.inf
    for c in range(log_p.shape[0]):
        top = max(top, log_p[c] + (step if c == k else 0.0))
    total = 0.0
    for c in range(log_p.shape[0]):
        total += math.exp(log_p[c] + (step if c == k else 0.0) - top)
    return top + math.log(total)


@_serial
def input_gradient_rows(
    x,
    first,
    last,
    pre,
    hidden,
    probabilities,
    log_probabilities,
    labels,
    W2,
    h,
    expansion,
    first_order,
    third_order,
    gW1,
):
    """Rows ``first:last`` of the ``W1`` central differences, times N.

    Only samples whose input is non-zero contribute; each element sums its
    samples in increasing order, whatever the rows a caller asks for.
    """
    batch_size, hidden_size = pre.shape
    inv_2h = 1.0 / (2.0 * h)
    for i in range(first, last):
        for j in range(hidden_size):
            gW1[i, j] = 0.0
    for n in range(batch_size):
        label = labels[n]
        for i in range(first, last):
            v = x[n, i]
            if v == 0:
                continue
            if expansion:
                cube = v * v * v
                for j in range(hidden_size):
                    gW1[i, j] += v * first_order[n, j] + cube * third_order[n, j]
            else:
                step = h * v
                for j in range(hidden_size):
                    gW1[i, j] += (
                        _exact_hidden_diff(
                            pre, hidden, probabilities, log_probabilities, label, W2, n, j, step
                        )
                        * inv_2h
                    )


@_parallel
def input_gradients_parallel(
    x,
    bounds,
    pre,
    hidden,
    probabilities,
    log_probabilities,
    labels,
    W2,
    h,
    expansion,
    first_order,
    third_order,
    gW1,
):
    """``input_gradient_rows`` over feature chunks ``bounds[c]:bounds[c + 1]`` in parallel.

    Each chunk owns a disjoint block of rows of ``gW1`` and its scratch is
    private (loop locals only): no two threads ever write the same memory,
    so there is no race and no reduction whose order depends on the threads.
    """
    for chunk in prange(bounds.shape[0] - 1):
        input_gradient_rows(
            x,
            bounds[chunk],
            bounds[chunk + 1],
            pre,
            hidden,
            probabilities,
            log_probabilities,
            labels,
            W2,
            h,
            expansion,
            first_order,
            third_order,
            gW1,
        )


@_serial
def balanced_bounds(x, chunks):
    """Feature boundaries cutting the non-zeros of ``x`` into ``chunks`` equal shares."""
    features = x.shape[1]
    per_feature = np.zeros(features, np.int64)
    for n in range(x.shape[0]):
        for i in range(features):
            if x[n, i] != 0:
                per_feature[i] += 1
    total = 0
    for i in range(features):
        total += per_feature[i]
    bounds = np.empty(chunks + 1, np.int64)
    bounds[0] = 0
    chunk = 1
    running = 0
    for i in range(features):
        running += per_feature[i]
        while chunk < chunks and running * chunks >= total * chunk:
            bounds[chunk] = i + 1
            chunk += 1
    while chunk <= chunks:
        bounds[chunk] = features
        chunk += 1
    return bounds


@_serial
def numerical_prepare(
    x,
    labels,
    W1,
    b1,
    W2,
    b2,
    h,
    max_shift,
    pre,
    hidden,
    probabilities,
    log_probabilities,
    first_order,
    third_order,
):
    """Forward pass and per-(sample, hidden unit) coefficients; float64 throughout.

    Returns ``(expansion, loss)``: whether the shifted expansion applies
    (``_expansion_applies``) and the batch loss. Error bound of the
    expansion: the dropped terms are ``O(h⁴ x⁵)``; their coefficients grow
    like ``spread⁵`` (cumulants of a W2 row) and like the sigmoid's Taylor
    coefficients (radius of convergence π), so relative to the gradient they
    stay below ``(max_shift / π)⁴ ≈ 1e-14`` at the default ``max_shift =
    1e-3``. At MNIST scale (h = 1e-4, x <= 1, spread ~1) they are ~1e-20,
    far below the ~1e-12 rounding error of the book's loop itself.
    """
    loss = _forward64(x, labels, W1, b1, W2, b2, pre, hidden, probabilities, log_probabilities)
    expansion = _expansion_applies(x, W2, h, max_shift)
    if expansion:
        _hidden_coefficients(hidden, probabilities, labels, W2, h, first_order, third_order)
    return expansion, loss


@_serial
def numerical_finish(
    pre,
    hidden,
    probabilities,
    log_probabilities,
    labels,
    W2,
    h,
    expansion,
    first_order,
    third_order,
    gW1,
    gb1,
    gW2,
    gb2,
):
    """``b1``, ``W2`` and ``b2`` differences, then every gradient divided by N."""
    batch_size, hidden_size = pre.shape
    inv_2h = 1.0 / (2.0 * h)
    for j in range(hidden_size):
        gb1[j] = 0.0
    # b1[j] is W1[i, j] with an input of 1 for every sample.
    for n in range(batch_size):
        for j in range(hidden_size):
            if expansion:
                gb1[j] += first_order[n, j] + third_order[n, j]
            else:
                change = _exact_hidden_diff(
                    pre, hidden, probabilities, log_probabilities, labels[n], W2, n, j, h
                )
                gb1[j] += change * inv_2h
    _output_gradients(hidden, probabilities, log_probabilities, labels, h, expansion, gW2, gb2)
    inv_batch = 1.0 / batch_size
    gW1 *= inv_batch
    gb1 *= inv_batch
    gW2 *= inv_batch
    gb2 *= inv_batch


@_serial
def sgd_steps_numerical(x, labels, batch_indices, W1, b1, W2, b2, lr, h, max_shift, losses):
    """SGD steps driven by the fast numerical gradient (float64 arithmetic), serial.

    As the reference loop: the gradient is computed in float64 from the
    parameters before the step and subtracted times ``lr``. Each step's loss
    is that of the float64 forward pass (the reference measures it in the
    parameters' dtype: the same for float64, within float32 rounding else).
    Serial on purpose: at ~1 ms a step a thread launch buys little, and a
    parallel kernel here would cost seconds of compile time and slower cache
    loads.
    """
    steps, batch_size = batch_indices.shape
    features, hidden_size = W1.shape
    classes = W2.shape[1]
    batch = np.empty((batch_size, features))
    batch_labels = np.empty(batch_size, np.int64)
    W1_64 = np.empty((features, hidden_size))
    b1_64 = np.empty(hidden_size)
    W2_64 = np.empty((hidden_size, classes))
    b2_64 = np.empty(classes)
    gW1 = np.empty((features, hidden_size))
    gb1 = np.empty(hidden_size)
    gW2 = np.empty((hidden_size, classes))
    gb2 = np.empty(classes)
    pre = np.empty((batch_size, hidden_size))
    hidden = np.empty((batch_size, hidden_size))
    probabilities = np.empty((batch_size, classes))
    log_probabilities = np.empty((batch_size, classes))
    first_order = np.empty((batch_size, hidden_size))
    third_order = np.empty((batch_size, hidden_size))
    for step in range(steps):
        for b in range(batch_size):
            n = batch_indices[step, b]
            batch_labels[b] = labels[n]
            for i in range(features):
                batch[b, i] = x[n, i]
        # Element loops, not ``W1_64[:] = W1``: Numba's broadcasting
        # assignment drags in seconds of compile for its error message.
        for i in range(features):
            for j in range(hidden_size):
                W1_64[i, j] = W1[i, j]
        for j in range(hidden_size):
            b1_64[j] = b1[j]
            for c in range(classes):
                W2_64[j, c] = W2[j, c]
        for c in range(classes):
            b2_64[c] = b2[c]
        expansion, losses[step] = numerical_prepare(
            batch,
            batch_labels,
            W1_64,
            b1_64,
            W2_64,
            b2_64,
            h,
            max_shift,
            pre,
            hidden,
            probabilities,
            log_probabilities,
            first_order,
            third_order,
        )
        input_gradient_rows(
            batch,
            0,
            features,
            pre,
            hidden,
            probabilities,
            log_probabilities,
            batch_labels,
            W2_64,
            h,
            expansion,
            first_order,
            third_order,
            gW1,
        )
        numerical_finish(
            pre,
            hidden,
            probabilities,
            log_probabilities,
            batch_labels,
            W2_64,
            h,
            expansion,
            first_order,
            third_order,
            gW1,
            gb1,
            gW2,
            gb2,
        )
        for i in range(features):
            for j in range(hidden_size):
                W1[i, j] -= lr * gW1[i, j]
        for j in range(hidden_size):
            b1[j] -= lr * gb1[j]
            for c in range(classes):
                W2[j, c] -= lr * gW2[j, c]
        for c in range(classes):
            b2[c] -= lr * gb2[c]


