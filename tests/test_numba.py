"""What only the Numba backend does: threads, compiled black-box f, fused loops.

The conformance suite already runs every kernel on ``numba`` against the
NumPy reference; these tests cover the Numba-specific paths: results that do
not depend on the thread count, the parallel black-box numerical gradient for
``@njit`` functions (and the warning for plain ones), the multi-step SGD
kernels (the chapter's and any depth's) against the model's loop of
primitives, and the fast numerical kernels against the book's loop.
"""

from __future__ import annotations

import doctest
import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastgrad
from fastgrad.backends._base import Backend, SparseRows
from fastgrad.errors import SlowPathWarning
from tests.conftest import backend_or_skip, tolerance

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


def make_net(
    sizes,
    activation="sigmoid",
    dtype=np.float64,
    *,
    decay=0.0,
    scale=0.8,
    seed=0,
    backend="numba",
):
    """A MultiLayerNet for ``sizes = (D, H_1, ..., C)`` with weights of ``scale``.

    Larger than a model's initial weights, with non-zero biases, so that
    every gradient is well away from zero. ``(D, H, C)`` with sigmoid and no
    decay is the chapter's net (the Numba backend's chapter kernels).
    """
    rng = np.random.default_rng(seed)
    net = fastgrad.MultiLayerNet(
        sizes[0],
        list(sizes[1:-1]),
        sizes[-1],
        activation,
        weight_decay_lambda=decay,
        dtype=dtype,
        backend=backend,
    )
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        net.params[f"W{layer}"][...] = scale * rng.standard_normal((fan_in, fan_out))
        net.params[f"b{layer}"][...] = 0.1 * rng.standard_normal(fan_out)
    return net


def copy_of(net, backend=None):
    """A net like ``net`` (on ``backend``, default its own) with copies of its parameters."""
    copy = fastgrad.MultiLayerNet(
        net.input_size,
        net.hidden_size_list,
        net.output_size,
        net.activation,
        weight_decay_lambda=net.weight_decay_lambda,
        dtype=net.dtype,
        backend=backend or net.backend,
    )
    for name, value in net.params.items():
        copy.params[name][...] = value
    return copy


def assert_same_params(got, expected, rtol=0.0, atol=0.0):
    assert list(got.params) == list(expected.params)
    for name, value in got.params.items():
        assert value.dtype == expected.params[name].dtype
        np.testing.assert_allclose(value, expected.params[name], rtol=rtol, atol=atol, err_msg=name)


def primitive_loop(monkeypatch, backend):
    """Make ``backend`` serve no fused steps, so that models run their loop of primitives."""
    monkeypatch.setattr(backend, "fused_sgd_steps", lambda *args, **kwargs: None)


# ---------------------------------------------------------------- threads
@needs_jit
def test_results_do_not_depend_on_thread_count(numba_backend, threads, monkeypatch):
    if threads < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    chapter_net = make_net((40, 9, 4))
    deeper_net = make_net((40, 9, 7, 4), "relu", decay=0.01, scale=0.4)
    X = sparse_inputs(13, 40)
    labels = np.arange(13) % 4
    x = np.random.default_rng(5).standard_normal(37)
    indices = np.random.default_rng(1).integers(0, 13, (4, 5))
    results = {}
    for count in (1, 2):
        numba.set_num_threads(count)
        fast = chapter_net.numerical_gradient(X, labels)
        monkeypatch.setattr(numba_backend, "taylor_max_shift", 0.0)  # the exact path
        exact = chapter_net.numerical_gradient(X, labels)
        monkeypatch.undo()
        any_depth = deeper_net.numerical_gradient(X, labels)
        trained = copy_of(chapter_net)
        trained.sgd_steps(X, labels, indices, 0.3)
        trained_deeper = copy_of(deeper_net)
        trained_deeper.sgd_steps(X, labels, indices, 0.3)
        blackbox = numba_backend.numerical_gradient(cubic, x.copy(), 1e-4, "central")
        results[count] = (fast, exact, any_depth, trained, trained_deeper, blackbox)
    one, two = results[1], results[2]
    for grads in range(3):
        for name, value in one[grads].items():
            np.testing.assert_array_equal(value, two[grads][name])
    # chapter training cuts the hidden units into a block per thread: its
    # logits add up per block, a reassociation (see sgd_worker); any other
    # net's training adds the batch's gradient up by chunks, one per thread
    assert_same_params(one[3], two[3], rtol=1e-13, atol=1e-15)
    assert_same_params(one[4], two[4], rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(one[5], two[5])


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
    from fastgrad.backends.numba import _sgd_backprop_threaded, _unit_blocks, primitives

    net = make_net((40, 20, 4), dtype=dtype, scale=0.3)
    X = sparse_inputs(30, 40, dtype)
    labels = np.random.default_rng(3).integers(0, 4, 30)
    indices = np.random.default_rng(4).integers(0, 30, (7, 11))
    listed = primitives.csr_rows(X)

    def train(threads):
        trained = copy_of(net)
        losses = np.empty(7)
        params = trained.network().arrays
        _sgd_backprop_threaded(*listed, labels, indices, params, 0.5, losses, threads)
        return trained, losses

    assert len(_unit_blocks(20, thread_count, np.dtype(dtype).itemsize)[0]) > 2
    serial, serial_losses = train(1)
    threaded, threaded_losses = train(thread_count)
    again, again_losses = train(thread_count)
    rtol = 50 * np.finfo(dtype).eps
    np.testing.assert_allclose(threaded_losses, serial_losses, rtol=rtol)
    np.testing.assert_array_equal(again_losses, threaded_losses)
    assert_same_params(threaded, serial, rtol=rtol, atol=rtol)
    assert_same_params(again, threaded)


@needs_jit
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_rows_run_the_affine_forward_in_blocks_on_the_threads(
    numba_backend, reference, threads, monkeypatch, dtype
):
    # an evaluation of a data set: Numba's threads run the blocks (no BLAS
    # thread left spinning beside the training steps that follow)
    from fastgrad.backends import numba as numba_module
    from fastgrad.backends.numba import primitives

    calls = []
    kernel = primitives.affine_rows
    monkeypatch.setattr(
        primitives, "affine_rows", lambda *args: calls.append(args[-1]) or kernel(*args)
    )
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    rows = numba_module._AFFINE_ROWS + 3
    rng = np.random.default_rng(0)
    X = np.asfortranarray(rng.random((rows, 37)).astype(dtype))  # any layout
    W, b = rng.standard_normal((37, 11)).astype(dtype), rng.standard_normal(11).astype(dtype)
    before = X.copy(), W.copy(), b.copy()
    Y = numba_backend.affine_forward(X, W, b)
    expected = reference.affine_forward(X, W, b)
    assert Y.dtype == dtype and Y.shape == (rows, 11)
    np.testing.assert_allclose(Y, expected, rtol=tolerance(dtype), atol=tolerance(dtype))
    for array, copy in zip((X, W, b), before, strict=True):
        np.testing.assert_array_equal(array, copy)
    assert calls == ([numba.get_num_threads()] if numba.get_num_threads() > 1 else [])
    # a batch, and mixed dtypes, take the reference
    numba_backend.affine_forward(X[:100], W, b)
    numba_backend.affine_forward(X, W.astype(np.float64 if dtype == np.float32 else np.float32), b)
    assert len(calls) <= 1


@needs_jit
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_any_net_training_depends_on_its_chunks_not_its_threads(numba_backend, threads, chunks):
    # The kernel cuts each step into chunks (the backend passes one per
    # thread): 3 cut a batch of 7 rows into 2, 2 and 3 rows, 7 into single
    # rows. Which thread runs a chunk does not change a bit; the number of
    # chunks regroups the batch's gradient sum (rounding only).
    from fastgrad.backends.numba import network as packed
    from fastgrad.backends.numba import network_training, primitives

    network = make_net((9, 8, 6, 3), "relu", decay=0.01, scale=0.5).network()
    X = sparse_inputs(20, 9)
    listed = primitives.csr_rows(X)
    labels = np.arange(20) % 3
    indices = np.random.default_rng(4).integers(0, 20, (5, 7))

    def train(chunks, thread_count):
        numba.set_num_threads(thread_count)
        layers = packed.pack(network, np.dtype(np.float64))
        losses = np.empty(5)
        code = packed.activation_code("relu")
        network_training.sgd_steps(
            *listed, labels, indices, layers, code, 0.01, 0.3, losses, chunks
        )
        return layers, losses

    serial_layers, serial_losses = train(1, 1)
    one_layers, one_losses = train(chunks, 1)
    layers, losses = train(chunks, min(2, threads))
    np.testing.assert_array_equal(losses, one_losses)
    np.testing.assert_array_equal(layers.weights, one_layers.weights)
    np.testing.assert_array_equal(layers.biases, one_layers.biases)
    np.testing.assert_allclose(losses, serial_losses, rtol=1e-13)
    np.testing.assert_allclose(layers.weights, serial_layers.weights, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layers.biases, serial_layers.biases, rtol=1e-13, atol=1e-15)


@needs_jit
def test_a_thread_that_fails_releases_the_others_from_the_barrier():
    from fastgrad.backends.numba.sync import barrier
    from fastgrad.backends.numba.threads import run_on_threads

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


@numba.njit
def nan_at_7_or_33(a):
    if a[7] != 7.0 or a[33] != 33.0:
        return np.nan
    return (a**2).sum()


@needs_jit
def test_the_first_failing_element_of_all_chunks_is_the_one_reported(numba_backend, threads):
    numba.set_num_threads(threads)
    x = np.arange(40.0)
    # element 33 lies in a later chunk than 7, whichever thread fails first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parallel path, not the reference loop
        with pytest.raises(ValueError, match=r"^f\(x \+ h\) at index \[7\] returned NaN"):
            numba_backend.numerical_gradient(nan_at_7_or_33, x, 1e-4, "central")
    np.testing.assert_array_equal(x, np.arange(40.0))


@needs_jit
def test_an_exception_seen_only_in_the_threads_leaves_the_verdict_to_the_reference(
    numba_backend, reference, monkeypatch
):
    # Call f again outside the threads and it does not raise (an f whose
    # result depends on more than x): the reference loop decides, as if the
    # parallel path had not run.
    from fastgrad.backends.numba import numerical

    real = numerical.parallel_numerical_gradient

    def one_chunk_says_raised(f, x, *rest):
        grad = real(f, x, *rest)
        codes = rest[-2]
        codes[0, :] = (numerical.RAISED, 1, 0, -1)
        return grad

    monkeypatch.setattr(numerical, "parallel_numerical_gradient", one_chunk_says_raised)
    x = np.array([0.5, -1.0, 2.0])
    got = numba_backend.numerical_gradient(cubic, x, 1e-4, "central")
    expected = reference.numerical_gradient(cubic, x.copy(), 1e-4, "central")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])


def test_the_kernels_share_the_reference_bound_on_small_logit_shifts():
    from fastgrad.backends import _base
    from fastgrad.backends.numba import chapter, network_numerical

    assert chapter.SMALL_LOGIT_SHIFT == network_numerical.SMALL_LOGIT_SHIFT
    assert chapter.SMALL_LOGIT_SHIFT == _base.SMALL_LOGIT_SHIFT


# ---------------------------------------------------------------- compile
def test_warmup_returns_seconds_and_describe_reports_it(numba_backend):
    seconds = numba_backend.warmup(np.float64)
    assert isinstance(seconds, float) and seconds >= 0.0
    facts = numba_backend.describe()
    for key in ("numba", "threads", "threading layer", "jit compile seconds", "fastmath"):
        assert key in facts
    assert "warmup seconds (float64)" in facts


@needs_jit
@pytest.mark.parametrize("gradient", ["backprop", "numerical"])
def test_after_warmup_a_run_of_any_net_compiles_nothing(numba_backend, gradient):
    from fastgrad.backends.numba import _compile_clock

    numba_backend.warmup(np.float64, gradient)
    compiled = _compile_clock.seconds
    net = make_net((9, 5, 4, 3, 2), "tanh", decay=0.1, scale=0.4)
    X = sparse_inputs(12, 9)
    labels = np.arange(12) % 2
    indices = np.random.default_rng(0).integers(0, 12, (3, 4))
    net.sgd_steps(net.training_inputs(X), labels, indices, 0.1, gradient)
    net.sgd_steps(X, labels, indices, 0.1, gradient)
    net.prepared_loss(X, labels)
    assert _compile_clock.seconds == compiled


@needs_jit
@pytest.mark.parametrize(
    "sizes, activation, loaded, left",
    [
        ((784, 50, 10), "sigmoid", "chapter.sgd_worker", "network_training.sgd_steps"),
        ((784, 100, 100, 10), "relu", "network_training.sgd_steps", "chapter.sgd_worker"),
    ],
    ids=["chapter-net", "deep-net"],
)
def test_warmup_for_a_network_compiles_only_its_kind_of_kernel(sizes, activation, loaded, left):
    # In a fresh process, so that no other test has compiled or loaded them.
    code = f"""
import numpy as np, fastgrad
from fastgrad.backends.numba import chapter, network_training
net = fastgrad.MultiLayerNet({sizes[0]}, {list(sizes[1:-1])}, {sizes[-1]}, {activation!r},
                             backend="numba")
fastgrad.get_backend("numba").warmup(np.float64, "backprop", net.network())
print(bool({loaded}.signatures), bool({left}.signatures))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_docstring_examples_of_the_packed_layers():
    from fastgrad.backends.numba import network

    result = doctest.testmod(network, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------ fused SGD steps, chapter's net
# float64 only: the conformance suite runs the float32 steps, and compiling
# the float32 kernel again here would double this file's compile time.
@pytest.mark.parametrize("dtype", [np.float64])
@pytest.mark.parametrize("rows", [40, 500], ids=["rows-drawn-again", "rows-mostly-distinct"])
def test_fused_sgd_steps_follow_the_reference_step_by_step(numba_backend, reference, dtype, rows):
    # 60 draws from 40 rows repeat rows (each is listed once and read again);
    # from 500 rows they are mostly distinct (most of x is never listed).
    net = make_net((33, 7, 5), dtype=dtype, scale=0.3)
    X = sparse_inputs(rows, 33, dtype)
    labels = np.random.default_rng(3).integers(0, 5, rows)
    indices = np.random.default_rng(4).integers(0, rows, (6, 10))
    fused = copy_of(net)
    scratch = copy_of(net).network()
    assert numba_backend.fused_sgd_steps(scratch, X, labels, indices, 0.5, "backprop") is not None
    losses = fused.sgd_steps(X, labels, indices, 0.5)
    stepped = copy_of(net)
    expected = copy_of(net, reference)
    tol = 10 * tolerance(dtype)
    for step, rows_of_step in enumerate(indices):
        one = stepped.sgd_steps(X, labels, rows_of_step[None, :], 0.5)
        ref_loss = expected.sgd_steps(X, labels, rows_of_step[None, :], 0.5)[0]
        assert losses[step] == pytest.approx(float(ref_loss), rel=tol)
        assert one[0] == pytest.approx(float(ref_loss), rel=tol)
        assert_same_params(stepped, expected, rtol=tol, atol=tol)
    assert_same_params(fused, stepped)


def test_training_inputs_list_the_nonzeros_of_every_row(numba_backend):
    X = sparse_inputs(50, 33)
    rows = numba_backend.training_inputs(X)
    assert rows.shape == X.shape and rows.dtype == X.dtype
    for n in range(X.shape[0]):
        listed = slice(rows.starts[n], rows.starts[n + 1])
        np.testing.assert_array_equal(rows.columns[listed], np.flatnonzero(X[n]))
        np.testing.assert_array_equal(rows.values[listed], X[n][X[n] != 0])
    assert rows.starts[-1] == np.count_nonzero(X)


@pytest.mark.parametrize(
    "sizes, activation",
    [((33, 7, 5), "sigmoid"), ((33, 7, 6, 5), "relu")],
    ids=["chapter", "deeper"],
)
@pytest.mark.parametrize("param_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
def test_sgd_steps_on_training_inputs_equal_those_on_dense_x(
    numba_backend, param_dtype, input_dtype, sizes, activation
):
    # When the dtypes differ, the listed values are not used: the dense
    # path promotes as it always does (the chapter's kernel) or the model's
    # loop runs (any other net), with the same result either way.
    net = make_net(sizes, activation, param_dtype, scale=0.3)
    X = sparse_inputs(60, 33, input_dtype)
    labels = np.random.default_rng(3).integers(0, 5, 60)
    indices = np.random.default_rng(4).integers(0, 60, (8, 10))
    on_dense = copy_of(net)
    dense_losses = numba_backend.fused_sgd_steps(
        on_dense.network(), X, labels, indices, 0.5, "backprop"
    )
    on_listed = copy_of(net)
    prepared = numba_backend.training_inputs(X)
    losses = numba_backend.fused_sgd_steps(
        on_listed.network(), prepared, labels, indices, 0.5, "backprop"
    )
    fused = activation == "sigmoid" or param_dtype == input_dtype
    assert (losses is not None) == fused and (dense_losses is not None) == fused
    if fused:
        np.testing.assert_array_equal(losses, dense_losses)
    assert_same_params(on_listed, on_dense)


def test_training_inputs_of_the_reference_are_x_itself(reference):
    X = sparse_inputs(5, 4)
    assert reference.training_inputs(X) is X


def test_fused_numerical_sgd_steps_follow_the_reference(numba_backend, reference):
    net = make_net((21, 6, 4), scale=0.5)
    X = sparse_inputs(30, 21)
    labels = np.arange(30) % 4
    indices = np.random.default_rng(6).integers(0, 30, (5, 7))
    fused = copy_of(net)
    assert (
        numba_backend.fused_sgd_steps(copy_of(net).network(), X, labels, indices, 0.4, "numerical")
        is not None
    )
    losses = fused.sgd_steps(X, labels, indices, 0.4, "numerical")
    expected = copy_of(net, reference)
    ref_losses = expected.sgd_steps(X, labels, indices, 0.4, "numerical")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    assert_same_params(fused, expected, atol=1e-12)


@pytest.mark.parametrize(
    "sizes, activation", [((5, 3, 2), "sigmoid"), ((5, 3, 3, 2), "relu")], ids=["chapter", "deeper"]
)
def test_out_of_range_rows_and_labels_raise_instead_of_reading_wild_memory(
    numba_backend, sizes, activation
):
    network = make_net(sizes, activation).network()
    X = sparse_inputs(4, 5)
    for inputs in (X, numba_backend.training_inputs(X)):
        with pytest.raises(IndexError, match="out of bounds"):
            numba_backend.fused_sgd_steps(
                network, inputs, np.zeros(4, int), np.array([[0, 4]]), 0.1, "backprop"
            )
        with pytest.raises(IndexError, match="labels"):
            numba_backend.fused_sgd_steps(
                network, inputs, np.full(4, 2), np.array([[0, 1]]), 0.1, "backprop"
            )


# ------------------------------------------ fused SGD steps, any other net
DEEP_CASES = {
    # depth 1: softmax regression (the first layer is the output layer)
    "depth-1": ((11, 3), "relu", 0.0),
    "depth-2-relu": ((13, 9, 4), "relu", 0.0),
    "depth-2-sigmoid-decay": ((13, 9, 4), "sigmoid", 0.05),
    "depth-3-tanh": ((17, 7, 5, 3), "tanh", 0.0),
    "depth-3-identity-decay": ((8, 6, 5, 3), "identity", 0.02),
    "depth-4-relu-decay": ((19, 11, 7, 5, 4), "relu", 0.01),
    "depth-4-sigmoid": ((9, 1, 3, 2, 2), "sigmoid", 0.0),
}


@pytest.mark.parametrize("form", ["dense", "training_inputs"])
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(DEEP_CASES))
def test_fused_steps_of_any_net_equal_the_primitive_loop(
    numba_backend, monkeypatch, case, dtype, batch_size, form
):
    sizes, activation, decay = DEEP_CASES[case]
    net = make_net(sizes, activation, dtype, decay=decay, scale=0.5, seed=len(sizes))
    X = sparse_inputs(40, sizes[0], dtype, seed=batch_size)
    X[:, 0] = 0.0  # an input that is zero in every row: its weights only decay
    labels = np.random.default_rng(1).integers(0, sizes[-1], 40)
    indices = np.random.default_rng(2).integers(0, 40, (4, batch_size))
    inputs = net.training_inputs(X) if form == "training_inputs" else X
    assert isinstance(inputs, SparseRows) == (form == "training_inputs")
    fused = copy_of(net)
    assert (
        numba_backend.fused_sgd_steps(
            copy_of(net).network(), inputs, labels, indices, 0.3, "backprop"
        )
        is not None
    )
    losses = fused.sgd_steps(inputs, labels, indices, 0.3)
    looped = copy_of(net)
    primitive_loop(monkeypatch, numba_backend)
    expected = looped.sgd_steps(X, labels, indices, 0.3)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert losses.dtype == np.float64 and losses.shape == (4,)
    np.testing.assert_allclose(losses, expected, rtol=rtol)
    scale = max(float(np.abs(value).max()) for value in looped.params.values())
    assert_same_params(fused, looped, rtol=rtol, atol=rtol * scale)


def test_numerical_steps_of_any_net_run_the_fast_gradient_in_the_models_loop(
    numba_backend, reference
):
    net = make_net((12, 6, 5, 3), "relu", decay=0.01, scale=0.5)
    X = sparse_inputs(20, 12)
    labels = np.arange(20) % 3
    indices = np.random.default_rng(6).integers(0, 20, (3, 5))
    args = (X, labels, indices, 0.4, "numerical")
    assert numba_backend.fused_sgd_steps(copy_of(net).network(), *args) is None
    stepped = copy_of(net)
    losses = stepped.sgd_steps(*args)
    expected = copy_of(net, reference)
    np.testing.assert_allclose(losses, expected.sgd_steps(*args), rtol=1e-12)
    assert_same_params(stepped, expected, atol=1e-12)


def test_mixed_dtypes_run_the_models_loop(numba_backend):
    net = make_net((6, 4, 4, 2), "relu", np.float32)
    X = sparse_inputs(5, 6, np.float64)
    indices = np.array([[0, 1], [2, 3]])
    labels = np.array([0, 1, 0, 1, 1])
    assert numba_backend.fused_sgd_steps(net.network(), X, labels, indices, 0.1, "backprop") is None


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
    net = make_net(sizes, seed=batch_size)
    X = sparse_inputs(batch_size, sizes[0], seed=batch_size)
    X[0, 0] = 0.7  # at least one non-zero input
    labels = np.arange(batch_size) % sizes[2]
    got = net.numerical_gradient(X, labels)
    expected = net.numerical_gradient(X, labels, method="naive")
    for name, value in got.items():
        assert value.dtype == np.float64
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-9)


def test_large_shift_takes_the_exact_path_and_still_matches(numba_backend):
    # x ~ 50 makes h * x far from tiny: the expansion's guard must refuse it.
    net = make_net((5, 3, 3), scale=0.3)
    X = 50.0 * sparse_inputs(4, 5, seed=7)
    X[:, 0] = 40.0
    labels = np.array([0, 1, 2, 0])
    got = net.numerical_gradient(X, labels)
    expected = net.numerical_gradient(X, labels, method="naive")
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-9)


NUMERICAL_CASES = {
    "depth-1": ((7, 3), "relu", 0.0),
    "depth-2-relu": ((9, 6, 4), "relu", 0.0),
    "depth-2-tanh-decay": ((9, 6, 4), "tanh", 0.1),
    "depth-2-sigmoid-decay": ((9, 6, 4), "sigmoid", 0.1),
    "depth-3-sigmoid": ((11, 5, 4, 3), "sigmoid", 0.0),
    "depth-3-identity": ((6, 5, 4, 3), "identity", 0.0),
    "depth-3-relu-decay": ((13, 8, 7, 3), "relu", 0.05),
    "depth-4-relu": ((10, 9, 1, 6, 4), "relu", 0.0),
    "depth-4-tanh": ((5, 4, 3, 3, 2), "tanh", 0.02),
}


@pytest.mark.parametrize("batch_size", [1, 6])
@pytest.mark.parametrize("case", list(NUMERICAL_CASES))
def test_numerical_gradient_of_any_net_equals_the_naive_loop(numba_backend, case, batch_size):
    sizes, activation, decay = NUMERICAL_CASES[case]
    net = make_net(sizes, activation, decay=decay, scale=0.7, seed=batch_size)
    X = sparse_inputs(batch_size, sizes[0], seed=batch_size)
    X[0, 1] = 0.6  # at least one non-zero input
    labels = np.arange(batch_size) % sizes[-1]
    got = net.numerical_gradient(X, labels)
    expected = net.numerical_gradient(X, labels, method="naive")
    for name, value in got.items():
        assert value.dtype == np.float64 and value.shape == net.params[name].shape
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-9, err_msg=name)


def test_numerical_gradient_of_a_float32_net_is_computed_in_float64(numba_backend):
    net = make_net((8, 5, 4, 3), "relu", np.float32, scale=0.6)
    X = sparse_inputs(5, 8, np.float32)
    X[0, 0] = 0.5
    labels = np.arange(5) % 3
    got = numba_backend.network_numerical_gradient(net.network(), X, labels, 1e-4)
    expected = net.numerical_gradient_float64(X, labels, "naive")
    for (grad_W, grad_b), layer in zip(got, range(1, 4), strict=True):
        assert grad_W.dtype == grad_b.dtype == np.float64
        np.testing.assert_allclose(grad_W, expected[f"W{layer}"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(grad_b, expected[f"b{layer}"], rtol=0, atol=1e-9)


def test_relu_units_at_or_near_zero_match_the_naive_loop(numba_backend):
    # Pre-activations at exactly 0 and within h * x of it: a perturbation
    # moves the ReLU across its kink, which only the exact recomputation of
    # the moved column gets right (and the naive loop does).
    net = make_net((3, 4, 3, 2), "relu", scale=0.5)
    X = np.array([[0.5, 0.0, 0.25], [0.0, 1.0, 0.5]])
    net.params["W1"][:, 0] = [0.25, 0.5, 0.0]
    net.params["b1"][0] = -0.125  # sample 0: exactly 0
    net.params["W1"][:, 1] = [0.5, 0.0, 0.5]
    net.params["b1"][1] = -0.375 + 3e-5  # sample 0: 3e-5, within h * 0.5
    labels = np.array([1, 0])
    pre = X @ net.params["W1"] + net.params["b1"]
    assert pre[0, 0] == 0.0 and 0 < pre[0, 1] < 1e-4 * 0.5
    got = net.numerical_gradient(X, labels)
    expected = net.numerical_gradient(X, labels, method="naive")
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-9, err_msg=name)


def test_large_steps_leave_the_series_and_still_match(numba_backend):
    # h = 0.05 moves the logits by far more than the expm1/log1p series
    # cover, so the kernel calls libm's; the differences are the naive loop's.
    from fastgrad.backends.numba.network_numerical import SERIES_BELOW

    net = make_net((6, 5, 4, 3), "tanh", scale=1.0)
    X = sparse_inputs(4, 6, seed=3) + 0.5
    labels = np.array([0, 1, 2, 0])
    assert 0.05 * X.max() > SERIES_BELOW
    got = net.numerical_gradient(X, labels, h=0.05)
    expected = net.numerical_gradient(X, labels, method="naive", h=0.05)
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-9, err_msg=name)


def test_numerical_gradient_of_sparse_rows_equals_that_of_dense_x(numba_backend):
    network = make_net((10, 6, 5, 3), "relu").network()
    X = sparse_inputs(7, 10)
    labels = np.arange(7) % 3
    dense = numba_backend.network_numerical_gradient(network, X, labels, 1e-4)
    listed = numba_backend.network_numerical_gradient(
        network, numba_backend.sparse_rows(X), labels, 1e-4
    )
    for (dense_W, dense_b), (listed_W, listed_b) in zip(dense, listed, strict=True):
        np.testing.assert_array_equal(listed_W, dense_W)
        np.testing.assert_array_equal(listed_b, dense_b)
