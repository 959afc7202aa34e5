"""What only the Numba backend does: threads, compiled black-box f, fused loops.

The conformance suite already runs every kernel on ``numba`` against the
NumPy reference; these tests cover the Numba-specific paths: results that do
not depend on the thread count, the parallel black-box numerical gradient for
``@njit`` functions (and the warning for plain ones), the multi-step SGD
kernel step by step, and the fast numerical kernel against the book's loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastgrad
from fastgrad.backends._base import PARAM_NAMES, Backend
from fastgrad.errors import SlowPathWarning
from tests import naive
from tests.conftest import backend_or_skip, random_net, tolerance

numba = pytest.importorskip("numba")

pytestmark = pytest.mark.jit

# Under NUMBA_DISABLE_JIT=1 (the coverage run) @njit functions are plain
# Python, so the compiled-f paths and thread counts cannot be exercised.
needs_jit = pytest.mark.skipif(
    bool(numba.config.DISABLE_JIT), reason="NUMBA_DISABLE_JIT=1: no compiled functions"
)


@pytest.fixture(scope="module")
def numba_backend() -> Backend:
    return backend_or_skip("numba")


@pytest.fixture
def reference() -> Backend:
    return fastgrad.get_backend("numpy")


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = numba.get_num_threads()
    yield numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(before)


@numba.njit
def cubic(a):
    total = 0.0
    flat = a.reshape(a.size)
    for k in range(flat.size):
        total += (k + 1.0) * flat[k] ** 3
    return total


@numba.njit
def stacked_squares(stack):
    out = np.empty(stack.shape[0])
    for row in range(stack.shape[0]):
        flat = stack[row].reshape(stack[row].size)
        out[row] = (flat**2).sum() + flat[0]
    return out


@numba.njit
def vector_valued(a):
    return a * 2.0


def sparse_inputs(rows, features, dtype=np.float64, seed=2):
    """Inputs in [0, 1) with ~80 % exact zeros, like MNIST pixels."""
    rng = np.random.default_rng(seed)
    x = rng.random((rows, features))
    x[rng.random((rows, features)) < 0.8] = 0.0
    return x.astype(dtype)


def copy_params(params):
    return {name: value.copy() for name, value in params.items()}


# ---------------------------------------------------------------- threads
@needs_jit
def test_results_do_not_depend_on_thread_count(numba_backend, threads, monkeypatch):
    if threads < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    params = random_net((40, 9, 4))
    X = sparse_inputs(13, 40)
    labels = np.arange(13) % 4
    x = np.random.default_rng(5).standard_normal(37)
    results = {}
    for count in (1, 2):
        numba.set_num_threads(count)
        fast = numba_backend.two_layer_numerical_gradient(params, X, labels, 1e-4)
        monkeypatch.setattr(numba_backend, "taylor_max_shift", 0.0)  # the exact path
        exact = numba_backend.two_layer_numerical_gradient(params, X, labels, 1e-4)
        monkeypatch.undo()
        trained = copy_params(params)
        indices = np.random.default_rng(1).integers(0, 13, (4, 5))
        numba_backend.two_layer_sgd_steps(trained, X, labels, indices, 0.3)
        blackbox = numba_backend.numerical_gradient(cubic, x.copy(), 1e-4, "central")
        results[count] = (fast, exact, trained, blackbox)
    one, two = results[1], results[2]
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(one[0][name], two[0][name])
        np.testing.assert_array_equal(one[1][name], two[1][name])
        # training cuts the hidden units into a block per thread: its logits
        # add up per block, a reassociation (see sgd_worker)
        np.testing.assert_allclose(one[2][name], two[2][name], rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(one[3], two[3])


@needs_jit
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("thread_count", [2, 3, 5])
def test_threaded_sgd_on_any_thread_count_follows_the_serial_loop(
    numba_backend, thread_count, dtype
):
    # More threads than cores is fine (they take turns at the barriers). 20
    # hidden units make 2 or 3 blocks of W1 (unequal in float64), so at 5
    # threads some threads own no block. The blocks reassociate the logits'
    # sums, so results agree with one thread's to rounding, and repeat
    # bitwise at the same thread count.
    from fastgrad.backends import _numba_kernels as kernels
    from fastgrad.backends.numba_ import _sgd_backprop_threaded, _unit_blocks

    params = random_net((40, 20, 4), dtype, scale=0.3)
    X = sparse_inputs(30, 40, dtype)
    labels = np.random.default_rng(3).integers(0, 4, 30)
    indices = np.random.default_rng(4).integers(0, 30, (7, 11))
    listed = kernels.csr_rows(X)

    def train(threads):
        trained = copy_params(params)
        losses = np.empty(7)
        _sgd_backprop_threaded(*listed, labels, indices, trained.values(), 0.5, losses, threads)
        return trained, losses

    assert len(_unit_blocks(20, thread_count, np.dtype(dtype).itemsize)[0]) > 2
    serial, serial_losses = train(1)
    threaded, threaded_losses = train(thread_count)
    again, again_losses = train(thread_count)
    rtol = 50 * np.finfo(dtype).eps
    np.testing.assert_allclose(threaded_losses, serial_losses, rtol=rtol)
    np.testing.assert_array_equal(again_losses, threaded_losses)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(threaded[name], serial[name], rtol=rtol, atol=rtol)
        np.testing.assert_array_equal(again[name], threaded[name])


@needs_jit
def test_a_thread_that_fails_releases_the_others_from_the_barrier():
    from fastgrad.backends._numba_sync import barrier
    from fastgrad.backends._numba_threads import run_on_threads

    passed = []

    def kernel(thread, threads, sync):
        if thread == 1:
            raise RuntimeError("worker 1 failed")
        passed.append(barrier(sync, threads, 0))

    with pytest.raises(RuntimeError, match="worker 1 failed"):
        run_on_threads(kernel, 2)
    assert passed == [False]


# -------------------------------------------------- black-box numerical gradient
def test_plain_python_f_warns_and_runs_the_reference_loop(numba_backend, reference):
    x = np.array([3.0, 4.0])

    def function_2(a):
        return a[0] ** 2 + a[1] ** 2

    with pytest.warns(SlowPathWarning, match="plain Python function"):
        got = numba_backend.numerical_gradient(function_2, x, 1e-4, "central")
    np.testing.assert_array_equal(got, reference.numerical_gradient(function_2, x, 1e-4, "central"))
    with pytest.warns(SlowPathWarning, match="plain Python function"):
        numba_backend.numerical_gradient_batched(
            lambda s: (s**2).sum(axis=1), x, 1e-4, "central", None
        )


@needs_jit
@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("shape", [(7,), (3, 4)])
def test_njit_f_runs_in_parallel_like_the_reference(numba_backend, reference, shape, method):
    x = np.random.default_rng(0).standard_normal(shape)
    original = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parallel path must not fall back
        got = numba_backend.numerical_gradient(cubic, x, 1e-4, method)
    expected = Backend.numerical_gradient(reference, cubic, x.copy(), 1e-4, method)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, original)  # each thread perturbed its own copy
    assert got.shape == shape and got.dtype == x.dtype


@needs_jit
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_njit_batched_f_runs_in_parallel_like_the_reference(numba_backend, reference, chunk_size):
    x = np.random.default_rng(1).standard_normal((3, 4))
    original = x.copy()
    for method in ("central", "forward"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = numba_backend.numerical_gradient_batched(
                stacked_squares, x, 1e-4, method, chunk_size
            )
        expected = reference.numerical_gradient_batched(
            stacked_squares, x.copy(), 1e-4, method, chunk_size
        )
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, original)


@needs_jit
def test_njit_f_that_numba_cannot_loop_over_falls_back_loudly(numba_backend):
    with pytest.warns(SlowPathWarning, match="could not compile"):
        with pytest.raises(TypeError, match="must return a scalar"):
            numba_backend.numerical_gradient(vector_valued, np.ones(3), 1e-4, "central")


@needs_jit
def test_njit_f_returning_nan_raises_like_the_reference(numba_backend):
    @numba.njit
    def not_a_number(a):
        return np.nan * a[0]

    with pytest.raises(ValueError, match="NaN"):
        numba_backend.numerical_gradient(not_a_number, np.ones(2), 1e-4, "central")


# ---------------------------------------------------------------- compile
def test_warmup_returns_seconds_and_describe_reports_it(numba_backend):
    seconds = numba_backend.warmup(np.float64)
    assert isinstance(seconds, float) and seconds >= 0.0
    facts = numba_backend.describe()
    for key in ("numba", "threads", "threading layer", "jit compile seconds", "fastmath"):
        assert key in facts
    assert "warmup seconds (float64)" in facts


# ------------------------------------------------------------ fused SGD steps
# float64 only: the conformance suite runs the float32 steps, and compiling
# the float32 kernel again here would double this file's compile time.
@pytest.mark.parametrize("dtype", [np.float64])
@pytest.mark.parametrize("rows", [40, 500], ids=["rows-drawn-again", "rows-mostly-distinct"])
def test_fused_sgd_steps_follow_the_reference_step_by_step(numba_backend, reference, dtype, rows):
    # 60 draws from 40 rows repeat rows (each is listed once and read again);
    # from 500 rows they are mostly distinct (most of x is never listed).
    params = random_net((33, 7, 5), dtype, scale=0.3)
    X = sparse_inputs(rows, 33, dtype)
    labels = np.random.default_rng(3).integers(0, 5, rows)
    indices = np.random.default_rng(4).integers(0, rows, (6, 10))
    fused = copy_params(params)
    losses = numba_backend.two_layer_sgd_steps(fused, X, labels, indices, 0.5)
    stepped = copy_params(params)
    expected = copy_params(params)
    tol = 10 * tolerance(dtype)
    for step, rows_of_step in enumerate(indices):
        one = numba_backend.two_layer_sgd_steps(stepped, X, labels, rows_of_step[None, :], 0.5)
        ref_loss = reference.two_layer_sgd_step(
            expected, X[rows_of_step], labels[rows_of_step], 0.5
        )
        assert losses[step] == pytest.approx(float(ref_loss), rel=tol)
        assert one[0] == pytest.approx(float(ref_loss), rel=tol)
        for name in PARAM_NAMES:
            np.testing.assert_allclose(stepped[name], expected[name], rtol=tol, atol=tol)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(fused[name], stepped[name])
        assert fused[name].dtype == dtype


def test_training_inputs_list_the_nonzeros_of_every_row(numba_backend):
    X = sparse_inputs(50, 33)
    rows = numba_backend.training_inputs(X)
    assert rows.shape == X.shape and rows.dtype == X.dtype
    for n in range(X.shape[0]):
        listed = slice(rows.starts[n], rows.starts[n + 1])
        np.testing.assert_array_equal(rows.columns[listed], np.flatnonzero(X[n]))
        np.testing.assert_array_equal(rows.values[listed], X[n][X[n] != 0])
    assert rows.starts[-1] == np.count_nonzero(X)


@pytest.mark.parametrize("param_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
def test_sgd_steps_on_training_inputs_equal_those_on_dense_x(
    numba_backend, param_dtype, input_dtype
):
    # When the dtypes differ, the listed values are not used: the dense
    # path promotes as it always does, with the same result.
    params = random_net((33, 7, 5), param_dtype, scale=0.3)
    X = sparse_inputs(60, 33, input_dtype)
    labels = np.random.default_rng(3).integers(0, 5, 60)
    indices = np.random.default_rng(4).integers(0, 60, (8, 10))
    on_dense = copy_params(params)
    dense_losses = numba_backend.two_layer_sgd_steps(on_dense, X, labels, indices, 0.5)
    on_listed = copy_params(params)
    prepared = numba_backend.training_inputs(X)
    losses = numba_backend.two_layer_sgd_steps(on_listed, prepared, labels, indices, 0.5)
    np.testing.assert_array_equal(losses, dense_losses)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(on_listed[name], on_dense[name])


def test_training_inputs_of_the_reference_are_x_itself(reference):
    X = sparse_inputs(5, 4)
    assert reference.training_inputs(X) is X


def test_fused_numerical_sgd_steps_follow_the_reference(numba_backend, reference):
    params = random_net((21, 6, 4), scale=0.5)
    X = sparse_inputs(30, 21)
    labels = np.arange(30) % 4
    indices = np.random.default_rng(6).integers(0, 30, (5, 7))
    fused = copy_params(params)
    losses = numba_backend.two_layer_sgd_steps(fused, X, labels, indices, 0.4, "numerical")
    expected = copy_params(params)
    ref_losses = reference.two_layer_sgd_steps(expected, X, labels, indices, 0.4, "numerical")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(fused[name], expected[name], rtol=0, atol=1e-12)


def test_out_of_range_rows_and_labels_raise_instead_of_reading_wild_memory(numba_backend):
    params = random_net((5, 3, 2))
    X = sparse_inputs(4, 5)
    with pytest.raises(IndexError, match="out of bounds"):
        numba_backend.two_layer_sgd_steps(params, X, np.zeros(4, int), np.array([[0, 4]]), 0.1)
    with pytest.raises(IndexError, match="labels"):
        numba_backend.two_layer_sgd_steps(params, X, np.full(4, 2), np.array([[0, 1]]), 0.1)


# ------------------------------------------------- fast numerical gradient
@pytest.mark.parametrize("path", ["expansion", "exact"])
@pytest.mark.parametrize(
    "sizes, batch_size",
    [((6, 4, 3), 1), ((11, 1, 2), 5), ((9, 13, 4), 3)],
    ids=["batch-of-1", "one-hidden-unit", "more-params-than-threads"],
)
def test_fast_numerical_kernel_equals_the_naive_loop(
    numba_backend, monkeypatch, sizes, batch_size, path
):
    if path == "exact":
        monkeypatch.setattr(numba_backend, "taylor_max_shift", 0.0)
    params = random_net(sizes, seed=batch_size)
    X = sparse_inputs(batch_size, sizes[0], seed=batch_size)
    X[0, 0] = 0.7  # at least one non-zero input
    labels = np.arange(batch_size) % sizes[2]
    got = numba_backend.two_layer_numerical_gradient(params, X, labels, 1e-4)
    expected = naive.two_layer_numerical_gradient(params, X, labels)
    for name in PARAM_NAMES:
        assert got[name].dtype == np.float64
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-9)


def test_large_shift_takes_the_exact_path_and_still_matches(numba_backend):
    # x ~ 50 makes h * x far from tiny: the expansion's guard must refuse it.
    params = random_net((5, 3, 3), scale=0.3)
    X = 50.0 * sparse_inputs(4, 5, seed=7)
    X[:, 0] = 40.0
    labels = np.array([0, 1, 2, 0])
    got = numba_backend.two_layer_numerical_gradient(params, X, labels, 1e-4)
    expected = naive.two_layer_numerical_gradient(params, X, labels)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-9)
