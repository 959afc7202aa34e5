"""CPU transliterations of the CuPy backend's CUDA kernels, for tests without a GPU.

Each function here mirrors one kernel of ``fastgrad/backends/_cupy_kernels.py``
line by line: the same block/thread loops, the same grid-stride index
arithmetic, the same warp-shuffle and shared-memory reductions (lanes are
NumPy vectors, a barrier is the end of a Python loop over threads). They take
CuPy's calling convention (``kernel(grid, block, args, shared_mem=...)`` for
raw kernels, ``kernel(*inputs, *outputs)`` for elementwise ones) and write
their outputs in place, so the backend itself can run on NumPy arrays with
these in place of the compiled kernels.

What this proves: the index arithmetic covers every output exactly once for
grids smaller than the problem, the reductions combine the right values, and
the backend passes arguments in the order the kernels expect. What it cannot
prove: the CUDA C compiles (the nvcc test does that) or runs at speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

WARP = 32


def _dim3(value: tuple[int, ...]) -> tuple[int, int, int]:
    padded = (*value, 1, 1)[:3]
    return int(padded[0]), int(padded[1]), int(padded[2])


def _sigmoid(x: float) -> float:
    # fg_sigmoid: the overflow-safe form, as in the preamble.
    e = math.exp(-abs(x))
    positive = 1.0 / (1.0 + e)
    return positive if x >= 0.0 else e * positive


def warp_sum(lanes: np.ndarray) -> np.ndarray:
    """fg_warp_sum: the xor butterfly; every lane ends with the total."""
    value = lanes.astype(np.float64).copy()
    index = np.arange(WARP)
    for offset in (16, 8, 4, 2, 1):
        value = value + value[index ^ offset]
    return value


def warp_max(lanes: np.ndarray) -> np.ndarray:
    """fg_warp_max: the xor butterfly with `other > value ? other : value`."""
    value = lanes.astype(np.float64).copy()
    index = np.arange(WARP)
    for offset in (16, 8, 4, 2, 1):
        other = value[index ^ offset]
        value = np.where(other > value, other, value)
    return value


def block_sum(values: np.ndarray, shared_doubles: int) -> float:
    """fg_block_sum over a 1-D block; returns thread 0's result."""
    block = values.shape[0]
    assert block % WARP == 0, "fg_block_sum needs whole warps"
    warps = block // WARP
    assert shared_doubles >= warps, "warp_sums needs one double per warp"
    warp_sums = np.zeros(shared_doubles)
    for warp in range(warps):
        warp_sums[warp] = warp_sum(values[warp * WARP : (warp + 1) * WARP])[0]
    lane = np.arange(WARP)
    first = np.where(lane < warps, warp_sums[np.minimum(lane, shared_doubles - 1)], 0.0)
    return float(warp_sum(first)[0])


class RawKernel:
    """A raw kernel emulator with CuPy's launch signature; counts its launches."""

    def __init__(self, body: Callable[..., None]) -> None:
        self.body = body
        self.launches: list[tuple[tuple[int, int, int], tuple[int, int, int], int]] = []

    def __call__(
        self,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        grid3, block3 = _dim3(grid), _dim3(block)
        assert grid3[1:] == (1, 1), "the kernels use a 1-D grid"
        assert block3[0] * block3[1] * block3[2] <= 1024, "at most 1024 threads per block"
        self.launches.append((grid3, block3, shared_mem))
        self.body(grid3, block3, shared_mem, *args)


# ------------------------------------------------------------------ softmax_xent_rows
def softmax_xent_rows(
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    logits: np.ndarray,
    bias: np.ndarray | None,
    labels: np.ndarray,
    rows: int,
    cols: int,
    row_loss: np.ndarray,
    dlogits: np.ndarray | None,
    grad_divisor: float,
) -> None:
    assert block[0] % WARP == 0 and block[1] == 1, "whole warps, 1-D block"
    assert labels.dtype == np.int64 and row_loss.dtype == np.float64
    z_all = logits.reshape(-1)
    b = None if bias is None else bias.reshape(-1).astype(np.float64)
    warps_per_block = block[0] // WARP
    row_stride = grid[0] * warps_per_block
    lanes = np.arange(WARP)
    for block_x in range(grid[0]):
        for warp in range(warps_per_block):
            for row in range(block_x * warps_per_block + warp, int(rows), row_stride):
                z = z_all[row * cols : (row + 1) * cols].astype(np.float64)
                shifted_bias = b if b is not None else np.zeros(cols)
                top = np.full(WARP, -np.inf)
                c = lanes.copy()
                while (c < cols).any():
                    active = c < cols
                    value = z[c[active]] + shifted_bias[c[active]]
                    top[active] = np.where(value > top[active], value, top[active])
                    c += WARP
                top = warp_max(top)
                total = np.zeros(WARP)
                c = lanes.copy()
                while (c < cols).any():
                    active = c < cols
                    total[active] += np.exp(z[c[active]] + shifted_bias[c[active]] - top[active])
                    c += WARP
                total = warp_sum(total)
                log_total = np.log(total)
                label = int(labels[row])
                picked = z[label] + shifted_bias[label]
                row_loss[row] = log_total[0] - (picked - top[0])  # lane 0 writes
                if dlogits is not None:
                    d = dlogits.reshape(-1)
                    c = lanes.copy()
                    while (c < cols).any():
                        active = c < cols
                        columns = c[active]
                        shifted = z[columns] + shifted_bias[columns] - top[active]
                        p = np.exp(shifted - log_total[active])
                        value = np.where(columns == label, p - 1.0, p) / grad_divisor
                        d[row * cols + columns] = value.astype(dlogits.dtype)
                        c += WARP


# --------------------------------------------------------------- sgd_update_two_layer
def sgd_update_two_layer(
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    W1: np.ndarray,
    grad_W1: np.ndarray,
    size_W1: int,
    b1: np.ndarray,
    grad_hidden: np.ndarray,
    hidden_size: int,
    W2: np.ndarray,
    grad_W2: np.ndarray,
    size_W2: int,
    b2: np.ndarray,
    grad_logits: np.ndarray,
    classes: int,
    rows: int,
    lr: float,
) -> None:
    for array in (W1, b1, W2, b2):
        assert array.flags.c_contiguous, "the kernel writes parameters through flat pointers"
    T = W1.dtype.type
    step = T(lr)
    flat = {name: a.reshape(-1) for name, a in
            {"W1": W1, "b1": b1, "W2": W2, "b2": b2, "gW1": grad_W1, "gW2": grad_W2,
             "dh": grad_hidden, "dz": grad_logits}.items()}  # fmt: skip
    total = int(size_W1 + hidden_size + size_W2 + classes)
    stride = grid[0] * block[0]
    writes = np.zeros(total, dtype=np.int64)
    for thread in range(stride):
        t = thread
        while t < total:
            writes[t] += 1
            k = t
            if k < size_W1:
                flat["W1"][k] -= step * flat["gW1"][k]
                t += stride
                continue
            k -= size_W1
            if k < hidden_size:
                column = 0.0
                for n in range(int(rows)):
                    column += float(flat["dh"][n * hidden_size + k])
                flat["b1"][k] -= step * T(column)
                t += stride
                continue
            k -= hidden_size
            if k < size_W2:
                flat["W2"][k] -= step * flat["gW2"][k]
                t += stride
                continue
            k -= size_W2
            column = 0.0
            for n in range(int(rows)):
                column += float(flat["dz"][n * classes + k])
            flat["b2"][k] -= step * T(column)
            t += stride
    assert (writes == 1).all(), "every parameter element must be updated exactly once"


# --------------------------------------------------------------- numgrad_output_layer
def numgrad_output_layer(
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    hidden: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    rows: int,
    hidden_size: int,
    classes: int,
    h: float,
    scale: float,
    grad: np.ndarray,
) -> None:
    assert block[1] == 1 and block[0] % WARP == 0
    assert shared_mem >= (block[0] // WARP) * 8, "warp_sums does not fit the shared memory"
    hidden_flat, probs_flat, grad_flat = hidden.reshape(-1), probs.reshape(-1), grad.reshape(-1)
    params = (hidden_size + 1) * classes
    writes = np.zeros(params, dtype=np.int64)
    for block_x in range(grid[0]):
        for q in range(block_x, int(params), grid[0]):
            j, k = divmod(q, int(classes))
            acc = np.zeros(block[0])
            for thread in range(block[0]):
                for n in range(thread, int(rows), block[0]):
                    unit = hidden_flat[n * hidden_size + j] if j < hidden_size else 1.0
                    step = h * unit
                    p = probs_flat[n * classes + k]
                    diff = math.log1p(p * math.expm1(step)) - math.log1p(p * math.expm1(-step))
                    if labels[n] == k:
                        diff -= 2.0 * step
                    acc[thread] += diff
            grad_flat[q] = block_sum(acc, shared_mem // 8) * scale
            writes[q] += 1
    assert (writes == 1).all(), "every output-layer parameter must be written exactly once"


# --------------------------------------------------------------- numgrad_hidden_layer
def hidden_unit_diff(
    pre: np.ndarray,
    hidden: np.ndarray,
    probs: np.ndarray,
    W2: np.ndarray,
    n: int,
    j: int,
    label: int,
    hidden_size: int,
    classes: int,
    step: float,
) -> float:
    base_pre = pre[n * hidden_size + j]
    base_hidden = hidden[n * hidden_size + j]
    moved = [0.0, 0.0]
    for s in range(2):
        sign = 1.0 if s == 0 else -1.0
        change = _sigmoid(base_pre + sign * step) - base_hidden
        total = 0.0
        for c in range(classes):
            total += probs[n * classes + c] * math.expm1(change * W2[j * classes + c])
        moved[s] = math.log1p(total) - change * W2[j * classes + label]
    return moved[0] - moved[1]


def numgrad_hidden_layer(
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    X: np.ndarray,
    pre: np.ndarray,
    hidden: np.ndarray,
    probs: np.ndarray,
    W2: np.ndarray,
    labels: np.ndarray,
    rows: int,
    inputs: int,
    hidden_size: int,
    classes: int,
    h: float,
    scale: float,
    grad: np.ndarray,
) -> None:
    block_x, block_y = block[0], block[1]
    assert shared_mem >= block_x * block_y * 8, "partial sums do not fit the shared memory"
    X_flat, pre_flat, hidden_flat = X.reshape(-1), pre.reshape(-1), hidden.reshape(-1)
    probs_flat, W2_flat, grad_flat = probs.reshape(-1), W2.reshape(-1), grad.reshape(-1)
    writes = np.zeros((int(inputs) + 1) * int(hidden_size), dtype=np.int64)
    for block_index in range(grid[0]):
        for i in range(block_index, int(inputs) + 1, grid[0]):
            for j0 in range(0, int(hidden_size), block_x):
                partial = np.zeros(block_y * block_x)
                for ty in range(block_y):  # all threads, up to the first barrier
                    for tx in range(block_x):
                        j = j0 + tx
                        acc = 0.0
                        if j < hidden_size:
                            for n in range(ty, int(rows), block_y):
                                x = X_flat[n * inputs + i] if i < inputs else 1.0
                                if x == 0.0:
                                    continue
                                acc += hidden_unit_diff(
                                    pre_flat, hidden_flat, probs_flat, W2_flat, n, j,
                                    int(labels[n]), int(hidden_size), int(classes), h * x,
                                )  # fmt: skip
                        partial[ty * block_x + tx] = acc
                for tx in range(block_x):  # after the barrier: threadIdx.y == 0
                    j = j0 + tx
                    if j < hidden_size:
                        total = 0.0
                        for y in range(block_y):
                            total += partial[y * block_x + tx]
                        grad_flat[i * hidden_size + j] = total * scale
                        writes[i * hidden_size + j] += 1
    assert (writes == 1).all(), "every hidden-layer parameter must be written exactly once"


RAW_EMULATORS: dict[str, Callable[..., None]] = {
    "softmax_xent_rows": softmax_xent_rows,
    "sgd_update_two_layer": sgd_update_two_layer,
    "numgrad_output_layer": numgrad_output_layer,
    "numgrad_hidden_layer": numgrad_hidden_layer,
}


# ----------------------------------------------------------------- elementwise kernels
def _sigmoid_array(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    positive = 1 / (1 + e)
    return np.where(x >= 0, positive, e * positive).astype(x.dtype, copy=False)


def _perturbed_stack(
    flat: np.ndarray, width: int, start: int, step: Any, stack: np.ndarray
) -> np.ndarray:
    out = stack.reshape(-1)
    for i in range(out.shape[0]):
        row = i // width
        column = i - row * width
        out[i] = flat[column] + step if column == start + row else flat[column]
    return stack


def _elementwise(name: str) -> Callable[..., Any]:
    """NumPy versions of the ElementwiseKernel bodies, with CuPy's in/out convention."""

    def sigmoid(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        result = _sigmoid_array(x)
        if y is None:
            return result
        y[...] = result
        return y

    def sigmoid_grad(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        s = _sigmoid_array(x)
        result = (1 - s) * s
        if y is None:
            return result
        y[...] = result
        return y

    def bias_sigmoid(b: np.ndarray, z: np.ndarray) -> np.ndarray:
        z[...] = _sigmoid_array(z + b)
        return z

    def sigmoid_backward(hidden: np.ndarray, grad: np.ndarray) -> np.ndarray:
        grad[...] = grad * (hidden * (1 - hidden))
        return grad

    table: dict[str, Callable[..., Any]] = {
        "sigmoid": sigmoid,
        "sigmoid_grad": sigmoid_grad,
        "bias_sigmoid": bias_sigmoid,
        "sigmoid_backward": sigmoid_backward,
        "perturbed_stack": _perturbed_stack,
    }
    return table[name]


class EmulatedKernels:
    """Stand-ins for ``_cupy_kernels.raw_kernel`` / ``elementwise_kernel``.

    Install with ``monkeypatch.setattr(_cupy_kernels, "raw_kernel", emulated.raw_kernel)``
    (and the same for ``elementwise_kernel``); ``raw`` keeps each emulator so
    a test can look at its launches.
    """

    def __init__(self) -> None:
        self.raw: dict[str, RawKernel] = {}
        self.elementwise_calls: dict[str, int] = {}

    def raw_kernel(self, name: str, c_type: str | None = None) -> RawKernel:
        if name not in self.raw:
            self.raw[name] = RawKernel(RAW_EMULATORS[name])
        return self.raw[name]

    def elementwise_kernel(self, name: str) -> Callable[..., Any]:
        function = _elementwise(name)

        def counted(*args: Any) -> Any:
            self.elementwise_calls[name] = self.elementwise_calls.get(name, 0) + 1
            return function(*args)

        return counted
