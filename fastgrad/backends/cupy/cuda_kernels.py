"""The CuPy backend's custom GPU kernels, written once in Python for ``numba.cuda``.

The same source runs in two places: compiled by numba-cuda and launched on
CuPy arrays on a GPU (they pass through DLPack, with no copy), and, with
``NUMBA_ENABLE_CUDASIM=1`` set before ``numba.cuda`` is imported, under
Numba's CUDA simulator on NumPy arrays, one Python thread per CUDA thread,
block by block, shared memory and ``syncthreads`` included. That is how CI
runs every kernel here without a GPU. Plain elementwise expressions are not
here: they stay CuPy ``ElementwiseKernel``\\ s (:mod:`fastgrad.backends.cupy.kernels`).

Rules every kernel follows:

- Loops are grid-stride, so any launch size covers any problem size, and the
  launchers below cap the grid at :data:`MAX_GRID`.
- Indices are 64-bit: Numba widens ``int32`` thread indices to ``int64`` in
  arithmetic, so an index never overflows at 2**31 elements.
- Lanes of a warp meet through shared memory between block barriers, never
  through warp shuffles: the simulator has neither shuffles nor ``syncwarp``.
  The additions follow the tree of a shuffle's xor butterfly, so every sum
  adds the same values in the same order as a shuffle reduction would: fixed
  trees, no atomics, bit-reproducible results.
- A barrier is reached by every thread of a block: loops that contain one run
  the same trip count in all threads, and threads without work take part
  with a neutral value.
- The module refers to the CUDA API only as ``cuda.<name>``: the simulator
  swaps that global for its own module while a kernel runs.

Importing this module imports ``numba.cuda`` (it needs ``numba-cuda``); the
backend imports it on the first launch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from numba import cuda, float64

__all__ = [
    "MAX_GRID",
    "WARP",
    "grid_size",
    "numgrad_hidden_layer",
    "numgrad_output_layer",
    "sgd_update_two_layer",
    "softmax_xent_rows",
]

WARP = 32
# Largest grid launched; grid-stride loops cover anything larger. Well under
# the 2**31 - 1 limit of gridDim.x, and thousands of blocks per SM already.
MAX_GRID = 65535
DOUBLE_BYTES = 8


def grid_size(work_items: int, per_block: int) -> int:
    """Blocks for ``work_items`` items at ``per_block`` items per block, capped.

    Examples
    --------
    >>> grid_size(1000, 256), grid_size(0, 256), grid_size(10**9, 256)  # doctest: +SKIP
    (4, 1, 65535)
    """
    return max(1, min(MAX_GRID, -(-work_items // per_block)))


def _reduction_bytes(threads: int) -> int:
    """Dynamic shared memory of the warp reductions: a value per thread, a result per warp."""
    return (threads + threads // WARP) * DOUBLE_BYTES


def _whole_warps(threads: int, kernel: str) -> None:
    if threads <= 0 or threads % WARP:
        raise ValueError(f"{kernel} runs whole warps: threads per block must be a multiple of 32")


# ------------------------------------------------------------------ device helpers
@cuda.jit(device=True)
def _sigmoid(x):
    # The overflow-safe form of the NumPy reference (exp(-|x|) never
    # overflows), so both backends round alike.
    e = math.exp(-abs(x))
    positive = 1.0 / (1.0 + e)
    return positive if x >= 0.0 else e * positive


@cuda.jit(device=True)
def _tree_sum(values, first):
    """Sum of ``values[first : first + 32]`` in the order of a warp's xor butterfly.

    A shuffle butterfly (lane l adds lane l ^ offset, offsets 16 down to 1)
    leaves every lane with the same bits: the pairs commute. This is that
    tree, run by one thread in place: entry l < offset adds entry l + offset.
    """
    offset = WARP // 2
    while offset > 0:
        for lane in range(first, first + offset):
            values[lane] += values[lane + offset]
        offset //= 2
    return values[first]


@cuda.jit(device=True)
def _tree_max(values, first):
    """:func:`_tree_sum` with the butterfly's ``other > value ? other : value``."""
    offset = WARP // 2
    while offset > 0:
        for lane in range(first, first + offset):
            other = values[lane + offset]
            values[lane] = other if other > values[lane] else values[lane]
        offset //= 2
    return values[first]


# Why lane 0 adds its warp's 32 values alone, after one barrier, instead of
# five shuffle (or shared-memory) rounds: the simulator has no shuffles, and
# each block barrier costs it a round of Python thread switches, while on a
# GPU the 31 shared-memory additions are well under a microsecond. Shared
# memory: blockDim.x values, then one result per warp.
@cuda.jit(device=True)
def _warp_sum(value, shared):
    """Every thread of a 1-D block gets its warp's total of ``value``.

    ``shared`` holds ``blockDim.x + blockDim.x // 32`` doubles. A call may
    follow another at once: each warp's result slot is rewritten only after
    the next call's first barrier, which every thread reaches after reading it.
    """
    thread = cuda.threadIdx.x
    result = cuda.blockDim.x + thread // WARP
    shared[thread] = value
    cuda.syncthreads()
    if thread % WARP == 0:
        shared[result] = _tree_sum(shared, thread)
    cuda.syncthreads()
    return shared[result]


@cuda.jit(device=True)
def _warp_max(value, shared):
    """:func:`_warp_sum` with ``max``."""
    thread = cuda.threadIdx.x
    result = cuda.blockDim.x + thread // WARP
    shared[thread] = value
    cuda.syncthreads()
    if thread % WARP == 0:
        shared[result] = _tree_max(shared, thread)
    cuda.syncthreads()
    return shared[result]


@cuda.jit(device=True)
def _block_sum(value, shared):
    """Sum of one value per thread of a 1-D block; the result is valid in thread 0.

    Warp totals first (:func:`_warp_sum` leaves them in ``shared``), then
    thread 0 adds them as warp 0's butterfly would, over 32 lanes with zeros
    past the last warp. Ends with a barrier, so the caller may reuse
    ``shared`` at once.
    """
    _warp_sum(value, shared)
    total = 0.0
    if cuda.threadIdx.x == 0:
        lanes = cuda.local.array(WARP, float64)
        warps = cuda.blockDim.x // WARP
        for lane in range(WARP):
            lanes[lane] = shared[cuda.blockDim.x + lane] if lane < warps else 0.0
        total = _tree_sum(lanes, 0)
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _shifted_logit(logits, bias, with_bias, row, column):
    # Without a bias it adds 0.0, which is exact (only -0.0 becomes +0.0, which
    # no result depends on) and keeps one expression for both cases.
    return float(logits[row, column]) + (float(bias[column]) if with_bias else 0.0)


# ------------------------------------------------------------------ softmax_xent_rows
@cuda.jit(cache=True)
def _softmax_xent_rows(logits, bias, with_bias, labels, row_loss, dlogits, with_grad, grad_divisor):
    # One warp per row, rows grid-strided over all warps of the grid: the 32
    # lanes stride over the columns, then max and sum meet in warp
    # butterflies. The whole block walks its rows together (a warp past the
    # last row takes part with neutral values), so every barrier is met. The
    # row's loss goes to row_loss[row], summed afterwards by a deterministic
    # reduction, rather than to one atomicAdd target.
    #
    # Arithmetic is double for float32 and float64 logits alike: a row holds
    # few values, the kernel is bound by memory traffic and launch, and a
    # float64 log-sum-exp keeps the float32 loss within rounding of the
    # reference. dlogits = (softmax - onehot) / grad_divisor, the reference's
    # formula, with p taken as exp(log p) as the reference does.
    exchange = cuda.shared.array(0, float64)
    rows, cols = logits.shape
    lane = cuda.threadIdx.x % WARP
    warps_per_block = cuda.blockDim.x // WARP
    for first_row in range(
        cuda.blockIdx.x * warps_per_block, rows, cuda.gridDim.x * warps_per_block
    ):
        row = first_row + cuda.threadIdx.x // WARP
        active = row < rows
        top = -math.inf
        if active:
            for column in range(lane, cols, WARP):
                value = _shifted_logit(logits, bias, with_bias, row, column)
                top = value if value > top else top
        top = _warp_max(top, exchange)
        total = 0.0
        if active:
            for column in range(lane, cols, WARP):
                total += math.exp(_shifted_logit(logits, bias, with_bias, row, column) - top)
        total = _warp_sum(total, exchange)
        if active:
            log_total = math.log(total)
            label = labels[row]
            if lane == 0:
                picked = _shifted_logit(logits, bias, with_bias, row, label)
                row_loss[row] = log_total - (picked - top)
            if with_grad:
                for column in range(lane, cols, WARP):
                    shifted = _shifted_logit(logits, bias, with_bias, row, column) - top
                    p = math.exp(shifted - log_total)
                    dlogits[row, column] = (p - 1.0 if column == label else p) / grad_divisor


def softmax_xent_rows(
    logits: Any,
    bias: Any | None,
    labels: Any,
    row_loss: Any,
    dlogits: Any | None,
    grad_divisor: float,
    *,
    threads: int,
    blocks: int | None = None,
    stream: Any = 0,
) -> None:
    """Fused softmax cross-entropy of every row, forward and optionally backward.

    Parameters
    ----------
    logits : (rows, cols) float32 or float64 array, C-contiguous, ``rows >= 1``
    bias : (cols,) array of the logits' dtype, or None
        Added to every row inside the kernel.
    labels : (rows,) int64 array
    row_loss : (rows,) float64 array
        Written with each row's loss ``logsumexp(z) - z[label]``.
    dlogits : array like ``logits``, or None
        Written with ``(softmax(z) - onehot) / grad_divisor``; None for the
        forward pass alone.
    grad_divisor : float
    threads : int
        Threads per block, a multiple of 32 (one warp per row).
    blocks : int, optional
        Grid size; by default enough for one warp per row, capped.
    stream : numba stream, optional
        The stream to launch on (0, the default stream, under the simulator).

    Examples
    --------
    Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) on host arrays:

    >>> import numpy as np                                         # doctest: +SKIP
    >>> logits, loss = np.zeros((3, 4)), np.empty(3)               # doctest: +SKIP
    >>> softmax_xent_rows(logits, None, np.zeros(3, np.int64), loss, None, 1.0,
    ...                   threads=32)                              # doctest: +SKIP
    >>> loss.round(4).tolist()                                     # doctest: +SKIP
    [1.3863, 1.3863, 1.3863]
    """
    _whole_warps(threads, "softmax_xent_rows")
    if blocks is None:
        blocks = grid_size(logits.shape[0], threads // WARP)
    # An absent array is a stand-in of its type that the kernel never touches
    # (a row of the logits, the logits themselves): one argument type per
    # dtype means one compiled specialisation, and no empty arrays cross DLPack.
    _softmax_xent_rows[blocks, threads, stream, _reduction_bytes(threads)](
        logits,
        logits[0] if bias is None else bias,
        bias is not None,
        labels,
        row_loss,
        logits if dlogits is None else dlogits,
        dlogits is not None,
        float(grad_divisor),
    )


# --------------------------------------------------------------- sgd_update_two_layer
@cuda.jit(cache=True)
def _sgd_update_two_layer(W1, grad_W1, b1, grad_hidden, W2, grad_W2, b2, grad_logits, lr):
    # The flat index space is W1 | b1 | W2 | b2; each index belongs to exactly
    # one thread, so every parameter element is written once and no atomics
    # are needed. A bias thread sums its column over the batch rows itself;
    # adjacent threads read adjacent columns, so those loads coalesce. The
    # column sum is accumulated in double (for float32 too) and the update is
    # done in the parameters' type, like the reference's `param -= lr * grad`.
    step = W1.dtype.type(lr)
    size_W1, hidden_size, size_W2 = W1.size, b1.size, W2.size
    total = size_W1 + hidden_size + size_W2 + b2.size
    rows = grad_hidden.shape[0]
    first = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for t in range(first, total, cuda.gridDim.x * cuda.blockDim.x):
        k = t
        if k < size_W1:
            W1[k] -= step * grad_W1[k]
            continue
        k -= size_W1
        if k < hidden_size:
            column = 0.0
            for n in range(rows):
                column += float(grad_hidden[n, k])
            b1[k] -= step * b1.dtype.type(column)
            continue
        k -= hidden_size
        if k < size_W2:
            W2[k] -= step * grad_W2[k]
            continue
        k -= size_W2
        column = 0.0
        for n in range(rows):
            column += float(grad_logits[n, k])
        b2[k] -= step * b2.dtype.type(column)


def sgd_update_two_layer(
    params: Sequence[Any],
    grads: Sequence[Any],
    lr: float,
    *,
    threads: int,
    blocks: int | None = None,
    stream: Any = 0,
) -> None:
    """One SGD step of a one-hidden-layer net in one launch, bias gradients fused in.

    Parameters
    ----------
    params : (W1, b1, W2, b2)
        C-contiguous arrays of one float dtype, updated in place.
    grads : (grad_W1, grad_hidden, grad_W2, grad_logits)
        ``grad_W1`` and ``grad_W2`` have their parameters' shapes;
        ``grad_hidden`` is ``(rows, hidden)`` and ``grad_logits`` ``(rows,
        classes)``, whose column sums are the bias gradients.
    lr : float
        Rounded to the parameters' dtype, as the reference's Python float.
    threads : int
        Threads per block.
    blocks : int, optional
        Grid size; by default one thread per parameter element, capped.
    stream : numba stream, optional

    Raises
    ------
    ValueError
        If a parameter or weight gradient is not C-contiguous: the kernel
        writes through flat views, and a copy would lose the update.
    """
    W1, b1, W2, b2 = params
    grad_W1, grad_hidden, grad_W2, grad_logits = grads
    for array in (W1, b1, W2, b2, grad_W1, grad_W2):
        if not array.flags.c_contiguous:
            raise ValueError("sgd_update_two_layer updates C-contiguous arrays through flat views")
    if blocks is None:
        blocks = grid_size(W1.size + b1.size + W2.size + b2.size, threads)
    _sgd_update_two_layer[blocks, threads, stream](
        W1.reshape(-1),
        grad_W1.reshape(-1),
        b1,
        grad_hidden,
        W2.reshape(-1),
        grad_W2.reshape(-1),
        b2,
        grad_logits,
        float(lr),
    )


# --------------------------------------------------------------- numgrad_output_layer
@cuda.jit(cache=True)
def _numgrad_output_layer(hidden, probs, labels, h, scale, grad):
    # Central differences of the loss for every output-layer parameter at once.
    #
    # Parameter q = (j, k) is W2[j, k] for j < hidden_size and b2[k] for
    # j == hidden_size (its "hidden unit" is the constant 1). Moving it by +-h
    # shifts logit k of sample n by +-step_n, step_n = h * hidden[n, j], and
    # the sample's loss by log1p(p_nk * expm1(+-step_n)) - (+-step_n if k is
    # n's label), formed directly from the small change (no cancellation
    # against the loss).
    #
    # One block per parameter, grid-strided: the threads stride over samples
    # and meet in a fixed shared-memory tree (_block_sum), so the result does
    # not depend on scheduling. Float64 throughout: with h = 1e-4 the
    # differences are ~1e-8 of the loss and float32 would keep about none of
    # their digits.
    shared = cuda.shared.array(0, float64)
    rows, hidden_size = hidden.shape
    classes = probs.shape[1]
    for q in range(cuda.blockIdx.x, (hidden_size + 1) * classes, cuda.gridDim.x):
        j = q // classes
        k = q - j * classes
        acc = 0.0
        for n in range(cuda.threadIdx.x, rows, cuda.blockDim.x):
            step = h * (hidden[n, j] if j < hidden_size else 1.0)
            p = probs[n, k]
            diff = math.log1p(p * math.expm1(step)) - math.log1p(p * math.expm1(-step))
            if labels[n] == k:
                diff -= 2.0 * step
            acc += diff
        acc = _block_sum(acc, shared)
        if cuda.threadIdx.x == 0:
            grad[j, k] = acc * scale


def numgrad_output_layer(
    hidden: Any,
    probs: Any,
    labels: Any,
    h: float,
    scale: float,
    grad: Any,
    *,
    threads: int,
    blocks: int | None = None,
    stream: Any = 0,
) -> None:
    """Central differences of the loss for every output-layer parameter (float64).

    Parameters
    ----------
    hidden : (rows, hidden) float64 array
        The hidden layer's output.
    probs : (rows, classes) float64 array
        The softmax of the logits.
    labels : (rows,) int64 array
    h : float
        The difference step.
    scale : float
        ``1 / (2 h rows)``: turns summed differences into the mean loss's gradient.
    grad : (hidden + 1, classes) float64 array
        Written with the gradient of W2, then of b2 in the last row.
    threads : int
        Threads per block, a multiple of 32 (one block per parameter).
    blocks : int, optional
        Grid size; by default one block per parameter, capped.
    stream : numba stream, optional
    """
    _whole_warps(threads, "numgrad_output_layer")
    if blocks is None:
        blocks = grid_size(grad.size, 1)
    _numgrad_output_layer[blocks, threads, stream, _reduction_bytes(threads)](
        hidden, probs, labels, float(h), float(scale), grad
    )


# --------------------------------------------------------------- numgrad_hidden_layer
@cuda.jit(device=True)
def _moved_loss(pre, hidden, probs, W2, n, j, label, step):
    # Sample n's loss change when hidden unit j's pre-activation moves by
    # `step`: the unit changes by delta = sigmoid(pre + step) - hidden, and the
    # loss by log1p(sum_c p_nc expm1(delta W2[j, c])) - delta W2[j, label].
    change = _sigmoid(pre[n, j] + step) - hidden[n, j]
    total = 0.0
    for c in range(W2.shape[1]):
        total += probs[n, c] * math.expm1(change * W2[j, c])
    return math.log1p(total) - change * W2[j, label]


@cuda.jit(cache=True)
def _numgrad_hidden_layer(X, pre, hidden, probs, W2, labels, h, scale, grad):
    # Central differences of the loss for every hidden-layer parameter at once.
    #
    # Row i < inputs of the output is W1[i, :]; row i == inputs is b1 (its
    # "input" is the constant 1). Moving W1[i, j] by +-h moves only hidden
    # unit j, and only for samples with X[n, i] != 0 (see _moved_loss).
    #
    # Layout: one block per row i (grid-strided), a 2-D block whose x runs
    # over hidden units (tiles of blockDim.x) and y over samples. With
    # blockDim.x == 32 a warp is one sample and 32 hidden units, so the test
    # X[n, i] == 0 (most MNIST pixels are zero) is uniform across the warp:
    # skipped samples cost no divergence. Per-thread partial sums meet in
    # shared memory and are added by threadIdx.y == 0 in a fixed order
    # (deterministic, no atomics). The barriers sit outside every
    # data-dependent branch, and all threads of a block run the same i and j0
    # loops, so they are reached by all threads.
    partial = cuda.shared.array(0, float64)
    rows, inputs = X.shape
    hidden_size = W2.shape[0]
    tile = cuda.blockDim.x
    slot = cuda.threadIdx.y * tile + cuda.threadIdx.x
    for i in range(cuda.blockIdx.x, inputs + 1, cuda.gridDim.x):
        for j0 in range(0, hidden_size, tile):
            j = j0 + cuda.threadIdx.x
            acc = 0.0
            if j < hidden_size:
                for n in range(cuda.threadIdx.y, rows, cuda.blockDim.y):
                    x = X[n, i] if i < inputs else 1.0
                    if x == 0.0:
                        continue  # the loss does not move: the difference is exactly 0
                    step = h * x
                    label = labels[n]
                    acc += _moved_loss(pre, hidden, probs, W2, n, j, label, step) - _moved_loss(
                        pre, hidden, probs, W2, n, j, label, -step
                    )
            partial[slot] = acc
            cuda.syncthreads()
            if cuda.threadIdx.y == 0 and j < hidden_size:
                total = 0.0
                for y in range(cuda.blockDim.y):
                    total += partial[y * tile + cuda.threadIdx.x]
                grad[i, j] = total * scale
            # The next tile overwrites `partial`: wait until it has been read.
            cuda.syncthreads()


def numgrad_hidden_layer(
    X: Any,
    pre: Any,
    hidden: Any,
    probs: Any,
    W2: Any,
    labels: Any,
    h: float,
    scale: float,
    grad: Any,
    *,
    tile: tuple[int, int],
    blocks: int | None = None,
    stream: Any = 0,
) -> None:
    """Central differences of the loss for every hidden-layer parameter (float64).

    Parameters
    ----------
    X : (rows, inputs) float64 array
    pre, hidden : (rows, hidden) float64 arrays
        The hidden layer's pre-activation and output.
    probs : (rows, classes) float64 array
    W2 : (hidden, classes) float64 array
    labels : (rows,) int64 array
    h, scale : float
        As in :func:`numgrad_output_layer`.
    grad : (inputs + 1, hidden) float64 array
        Written with the gradient of W1, then of b1 in the last row.
    tile : (int, int)
        The block: hidden units along x, samples along y.
    blocks : int, optional
        Grid size; by default one block per input (and one for the bias), capped.
    stream : numba stream, optional
    """
    tile_x, tile_y = tile
    if blocks is None:
        blocks = grid_size(X.shape[1] + 1, 1)
    _numgrad_hidden_layer[blocks, (tile_x, tile_y), stream, tile_x * tile_y * DOUBLE_BYTES](
        X, pre, hidden, probs, W2, labels, float(h), float(scale), grad
    )
