"""Each numba.cuda kernel, launched on grids smaller than its problem.

The kernels' own source runs here: under the CUDA simulator in CI (block by
block, one Python thread per CUDA thread, shared memory and barriers
included), and on CuPy arrays where a GPU is available (see ``conftest.py``).
Every output starts as NaN, so an element that no thread writes fails the
comparison; results are checked against the NumPy reference backend and the
loops of ``tests/naive.py``. Sizes are small because the simulator runs
Python per thread, yet always span several blocks, several grid-stride
rounds, partial warps or tiles, and blocks with no work.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from numba import cuda, float64
from numba.core import config

from fastgrad.backends.cupy import cuda_kernels
from fastgrad.backends.cupy.cuda_kernels import _block_sum, _warp_max, _warp_sum
from tests.test_cupy import (
    REFERENCE,
    by_name,
    close,
    naive_numerical_gradient,
    network_of,
    random_params,
    sparse_inputs,
)

SIMULATOR = bool(config.ENABLE_CUDASIM)
# On the real target these run on the GPU (selected with `-m gpu` like the rest).
pytestmark = [] if SIMULATOR else [pytest.mark.gpu]


def test_the_kernels_run_where_this_run_says():
    """Guards the premise of every test below: the simulator in CI, else a real GPU."""
    assert SIMULATOR == (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")
    kernel_type = type(cuda_kernels._softmax_xent_rows).__name__
    if SIMULATOR:
        assert kernel_type == "FakeCUDAKernel"
    else:
        assert cuda.is_available() and kernel_type == "CUDADispatcher"


def test_grid_size_is_capped_and_positive():
    assert cuda_kernels.grid_size(1, 256) == 1
    assert cuda_kernels.grid_size(257, 256) == 2
    assert cuda_kernels.grid_size(0, 256) == 1
    assert cuda_kernels.grid_size(10**12, 1) == cuda_kernels.MAX_GRID


# ---------------------------------------------------------------------- reductions
@cuda.jit
def _reduce_rows(values, sums, maxima):
    # One block per row of `values`, one thread per column: the helpers as the
    # kernels call them, back to back on the same shared memory.
    shared = cuda.shared.array(0, float64)
    value = values[cuda.blockIdx.x, cuda.threadIdx.x]
    lane_total = _warp_sum(value, shared)
    lane_top = _warp_max(value, shared)
    total = _block_sum(value, shared)
    warp = cuda.threadIdx.x // 32
    if cuda.threadIdx.x % 32 == 0:
        sums[cuda.blockIdx.x, warp] = lane_total
        maxima[cuda.blockIdx.x, warp] = lane_top
    if cuda.threadIdx.x == 0:
        sums[cuda.blockIdx.x, sums.shape[1] - 1] = total


@pytest.mark.parametrize("threads", [32, 64, 128])
def test_reductions_match_plain_sums(device, threads):
    values = np.random.default_rng(4).standard_normal((3, threads))
    warps = threads // 32
    sums = device.asarray(np.full((3, warps + 1), np.nan))
    maxima = device.asarray(np.full((3, warps), np.nan))
    shared_bytes = (threads + warps) * 8
    _reduce_rows[3, threads, device.stream(), shared_bytes](device.asarray(values), sums, maxima)
    sums, maxima = device.to_numpy(sums), device.to_numpy(maxima)
    by_warp = values.reshape(3, warps, 32)
    np.testing.assert_allclose(sums[:, :warps], by_warp.sum(axis=2), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(maxima, by_warp.max(axis=2))
    np.testing.assert_allclose(sums[:, -1], values.sum(axis=1), rtol=0, atol=1e-13)


# --------------------------------------------------------------- softmax_xent_rows
@pytest.mark.parametrize(
    "dtype,with_bias,blocks,threads",
    [
        (np.float32, True, 2, 64),  # 4 warps for 11 rows: three grid-stride rounds
        (np.float64, False, 3, 32),  # one warp per block
        (np.float64, True, 1, 128),  # the last round leaves one warp without a row
        (np.float32, False, 8, 64),  # 16 warps for 11 rows: idle warps and blocks
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_softmax_xent_rows(device, dtype, with_bias, blocks, threads):
    # 40 columns over 32 lanes: two passes, the second partial.
    rng = np.random.default_rng(1)
    rows, cols = 11, 40
    logits = (3 * rng.standard_normal((rows, cols))).astype(dtype)
    bias = rng.standard_normal(cols).astype(dtype) if with_bias else None
    labels = rng.integers(0, cols, rows).astype(np.int64)
    row_loss = device.asarray(np.full(rows, np.nan))
    dlogits = device.asarray(np.full_like(logits, np.nan))
    arguments = (
        device.asarray(logits),
        None if bias is None else device.asarray(bias),
        device.asarray(labels),
    )
    geometry = {"threads": threads, "blocks": blocks, "stream": device.stream()}
    cuda_kernels.softmax_xent_rows(*arguments, row_loss, dlogits, float(rows), **geometry)
    shifted = logits + bias if with_bias else logits
    loss, expected = REFERENCE.softmax_cross_entropy_with_grad(shifted.astype(dtype), labels)
    row_loss, dlogits = device.to_numpy(row_loss), device.to_numpy(dlogits)
    assert dlogits.dtype == dtype
    np.testing.assert_allclose(row_loss.mean(), loss, **close(dtype))
    np.testing.assert_allclose(dlogits, expected, **close(dtype))
    # Forward only: no gradient array, the same losses.
    forward_loss = device.asarray(np.full(rows, np.nan))
    cuda_kernels.softmax_xent_rows(*arguments, forward_loss, None, 1.0, **geometry)
    np.testing.assert_array_equal(device.to_numpy(forward_loss), row_loss)
    # The stand-ins for the absent arrays are the logits: never written.
    np.testing.assert_array_equal(device.to_numpy(arguments[0]), logits)


def test_softmax_xent_rows_runs_whole_warps(device):
    logits = device.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_kernels.softmax_xent_rows(
            logits, None, device.asarray(np.zeros(2, np.int64)), device.asarray(np.zeros(2)),
            None, 1.0, threads=48,
        )  # fmt: skip


# ------------------------------------------------------------ sgd_update_two_layer
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blocks,threads", [(2, 8), (1, 1), (16, 8)], ids=str)
def test_sgd_update_two_layer(device, dtype, blocks, threads):
    # 7*5 + 5 + 5*3 + 3 = 58 elements: over 16 threads, four grid-stride rounds,
    # each crossing from one parameter's segment into the next; over 1 thread,
    # all of them; over 128 threads, one each and idle threads.
    rng = np.random.default_rng(2)
    params = random_params(rng, (7, 5, 3), dtype)
    grad_W1, grad_W2 = (rng.standard_normal(params[n].shape).astype(dtype) for n in ("W1", "W2"))
    grad_hidden = rng.standard_normal((4, 5)).astype(dtype)
    grad_logits = rng.standard_normal((4, 3)).astype(dtype)
    lr = 0.1
    expected = {
        "W1": params["W1"] - dtype(lr) * grad_W1,
        "b1": params["b1"] - dtype(lr) * grad_hidden.sum(axis=0),
        "W2": params["W2"] - dtype(lr) * grad_W2,
        "b2": params["b2"] - dtype(lr) * grad_logits.sum(axis=0),
    }
    names = ("W1", "b1", "W2", "b2")
    on_device = [device.asarray(params[name]) for name in names]
    grads = [device.asarray(g) for g in (grad_W1, grad_hidden, grad_W2, grad_logits)]
    cuda_kernels.sgd_update_two_layer(
        on_device, grads, lr, threads=threads, blocks=blocks, stream=device.stream()
    )
    for name, array in zip(names, on_device):
        updated = device.to_numpy(array)
        assert updated.dtype == dtype
        np.testing.assert_allclose(updated, expected[name], **close(dtype), err_msg=name)


def test_sgd_update_two_layer_refuses_strided_params(device):
    params = [device.asarray(np.zeros(shape)) for shape in ((4, 3), (3,), (3, 2), (2,))]
    params[0] = params[0].T.copy().T  # Fortran order: a flat view would be a copy
    grads = [device.asarray(np.zeros(shape)) for shape in ((4, 3), (1, 3), (3, 2), (1, 2))]
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_kernels.sgd_update_two_layer(params, grads, 0.1, threads=32)


# ------------------------------------------------------------- numerical gradients
@pytest.fixture(scope="module")
def problem():
    """A net and batch whose numerical gradient crosses every block and tile boundary.

    4 inputs (+ the bias row: 5 rows of the hidden-layer gradient); 20 hidden
    units (+ the bias: 21 rows of the output layer's); 3 classes (63
    output-layer parameters); 24 samples; half the inputs exactly zero (the
    skip path); the reference's and the naive loop's answers to compare.
    """
    rng = np.random.default_rng(3)
    params = random_params(rng, (4, 20, 3))
    X = sparse_inputs(rng, 24, 4, zeros=0.5)
    labels = rng.integers(0, 3, 24).astype(np.int64)
    pre = X @ params["W1"] + params["b1"]
    hidden = REFERENCE.sigmoid(pre)
    return types.SimpleNamespace(
        params=params,
        X=X,
        labels=labels,
        pre=pre,
        hidden=hidden,
        probs=REFERENCE.softmax(hidden @ params["W2"] + params["b2"]),
        h=1e-4,
        scale=1 / (2e-4 * X.shape[0]),
        reference=by_name(
            REFERENCE.network_numerical_gradient(network_of(params), X, labels, 1e-4)
        ),
        oracle=naive_numerical_gradient(params, X, labels),
    )


def _assert_layer(grad, p, layer):
    """``grad`` (weights, then the bias row) against the reference and the naive loop."""
    W, b = f"W{layer}", f"b{layer}"
    assert not np.isnan(grad).any(), "every parameter is written"
    np.testing.assert_allclose(grad[:-1], p.reference[W], rtol=0, atol=1e-12, err_msg=W)
    np.testing.assert_allclose(grad[-1], p.reference[b], rtol=0, atol=1e-12, err_msg=b)
    np.testing.assert_allclose(grad[:-1], p.oracle[W], rtol=0, atol=1e-9, err_msg=W)
    np.testing.assert_allclose(grad[-1], p.oracle[b], rtol=0, atol=1e-9, err_msg=b)


@pytest.mark.parametrize(
    "blocks,threads",
    [(5, 32), (3, 64), (70, 32)],  # grid-strided parameters; two warps; idle blocks
    ids=str,
)
def test_numgrad_output_layer(device, problem, blocks, threads):
    p = problem
    hidden_size, classes = p.params["W2"].shape
    grad = device.asarray(np.full((hidden_size + 1, classes), np.nan))
    cuda_kernels.numgrad_output_layer(
        device.asarray(p.hidden), device.asarray(p.probs), device.asarray(p.labels),
        p.h, p.scale, grad, threads=threads, blocks=blocks, stream=device.stream(),
    )  # fmt: skip
    _assert_layer(device.to_numpy(grad), p, 2)


@pytest.mark.parametrize(
    "blocks,tile",
    # 20 hidden units: two 16-wide tiles (the second partial), one partial
    # 32-wide tile, three 8-wide tiles; 5 rows over 2 or 3 blocks, or 7 blocks
    # with two idle.
    [(2, (16, 4)), (3, (32, 2)), (7, (8, 3))],
    ids=str,
)
def test_numgrad_hidden_layer(device, problem, blocks, tile):
    p = problem
    inputs = p.X.shape[1]
    hidden_size = p.params["W2"].shape[0]
    grad = device.asarray(np.full((inputs + 1, hidden_size), np.nan))
    arrays = (p.X, p.pre, p.hidden, p.probs, p.params["W2"], p.labels)
    cuda_kernels.numgrad_hidden_layer(
        *(device.asarray(a) for a in arrays), p.h, p.scale, grad,
        tile=tile, blocks=blocks, stream=device.stream(),
    )  # fmt: skip
    _assert_layer(device.to_numpy(grad), p, 1)
