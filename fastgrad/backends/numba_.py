"""The Numba backend: NumPy arrays, with the hot kernels compiled by Numba.

Rule of this module: it only prepares arguments (contiguous arrays of one
float dtype, ``intp`` labels) and calls the compiled kernels of
:mod:`fastgrad.backends._numba_kernels`; whatever it does not specialise (or
any dtype other than float32/float64) runs the reference kernel via
``super()``. Threads follow ``NUMBA_NUM_THREADS`` and ``numba.set_num_threads``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from numba.core import event as numba_event
from numba.core.dispatcher import Dispatcher
from numba.core.errors import NumbaError

from fastgrad.backends import _numba_kernels as kernels
from fastgrad.backends._base import (
    BOOK_LOG_GUARD,
    CHUNK_BUDGET_BYTES,
    PARAM_NAMES,
    Array,
    Backend,
    Params,
    _scalar,
    _stack_values,
)
from fastgrad.backends._numba_threads import run_on_threads, usable_threads
from fastgrad.errors import SlowPathWarning

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# Below this many rows per thread, a forward pass is not worth a thread start.
_ROWS_PER_THREAD = 2048

# The training kernel cuts W1 into blocks of whole cache lines per row.
CACHE_LINE_BYTES = 64
# Columns of the narrowest block of gather_rows/scatter_rows.
_ROW_BLOCK = 16


class _CompileClock(numba_event.Listener):
    """Adds up the time Numba spends compiling this backend's kernels.

    Only the outermost compile of a fastgrad kernel is timed (a kernel's
    compile includes the kernels it calls); loads from the on-disk cache are
    not compiles and are not counted.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._started = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _ours(event: numba_event.Event) -> bool:
        dispatcher = (event.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "")
        return module == kernels.__name__

    def on_start(self, event: numba_event.Event) -> None:
        if self._ours(event):
            with self._lock:
                if self._depth == 0:
                    self._started = time.perf_counter()
                self._depth += 1

    def on_end(self, event: numba_event.Event) -> None:
        if self._ours(event):
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - self._started


_compile_clock = _CompileClock()


@dataclasses.dataclass(frozen=True, eq=False)
class SparseRows:
    """A training set together with its non-zeros, row by row (CSR).

    Made by ``NumbaBackend.training_inputs``; ``two_layer_sgd_steps``
    accepts it wherever it accepts the dense ``X``. Row ``n`` of ``dense``
    has its non-zeros at ``columns/values[starts[n]:starts[n + 1]]``.

    Example:
        >>> import numpy as np
        >>> from fastgrad.backends import get_backend
        >>> rows = get_backend("numba").training_inputs(np.array([[0.0, 0.5], [0.25, 0.0]]))
        >>> rows.starts.tolist(), rows.columns.tolist(), rows.values.tolist()
        ([0, 1, 2], [1, 0], [0.5, 0.25])
    """

    dense: np.ndarray
    starts: np.ndarray
    columns: np.ndarray
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense.shape

    @property
    def dtype(self) -> np.dtype:
        return self.dense.dtype


numba_event.register("numba:compile", _compile_clock)


class NumbaBackend(Backend):
    """NumPy arrays; activations, losses and the TwoLayerNet kernels compiled by Numba.

    Kernels compile on first use for each dtype (float32, float64) and are
    cached on disk, so later processes load them instead; :meth:`warmup`
    compiles ahead what a training run needs. ``two_layer_sgd_steps`` runs a
    whole multi-step training loop in one compiled call, and the numerical
    gradients run in parallel threads.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> backend = fastgrad.get_backend("numba")
    >>> backend.softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """

    name = "numba"
    extra = "numba"
    array_family = "numpy"

    #: Largest ``h * max|x| * max(1, W2 row spread)`` for which
    #: ``two_layer_numerical_gradient`` uses its shifted expansion instead of
    #: the exact per-perturbation formula (set it to 0.0 to force the latter).
    taylor_max_shift: float = kernels.TAYLOR_MAX_SHIFT

    def __init__(self) -> None:
        super().__init__(np)
        self._warmup_seconds: dict[str, float] = {}

    # ------------------------------------------------------------- facts
    def describe(self) -> dict[str, str]:
        facts = super().describe()
        try:
            layer: str = numba.threading_layer()
        except ValueError:  # no parallel kernel has run in this process yet
            configured = getattr(numba.config, "THREADING_LAYER", "default")
            layer = f"not started (configured: {configured})"
        facts.update(
            {
                "numba": numba.__version__,
                "threads": f"{numba.get_num_threads()} (NUMBA_NUM_THREADS="
                f"{getattr(numba.config, 'NUMBA_NUM_THREADS', '?')})",
                "threading layer": layer,
                "fastmath": "on" if kernels.FASTMATH else "off",
                "jit compile seconds": f"{_compile_clock.seconds:.2f} in this process "
                "(kernels compile on first use or load from the on-disk cache; "
                "backend.warmup() compiles ahead)",
            }
        )
        for dtype, seconds in self._warmup_seconds.items():
            facts[f"warmup seconds ({dtype})"] = f"{seconds:.2f}"
        return facts

    def warmup(self, dtype: Any = np.float64, gradient: str = "backprop") -> float:
        """Compile (or load from the cache) the kernels a training run uses.

        ``gradient="backprop"`` (what ``fastgrad train`` runs by default):
        the fused backprop steps plus the loss, logits and accuracy of the
        evaluations; ``"numerical"``: the fused numerical-gradient steps plus
        the same evaluations; ``"all"``: every kernel, also the one-batch
        gradient and the parallel fast numerical gradient. Returns the
        seconds spent; the compile part alone shows in
        ``describe()["jit compile seconds"]``.

        Examples
        --------
        >>> import numpy as np, fastgrad
        >>> seconds = fastgrad.get_backend("numba").warmup(np.float64)
        >>> seconds >= 0.0
        True
        """
        resolved = np.dtype(dtype)
        if resolved not in _FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got {resolved}")
        if gradient not in ("backprop", "numerical", "all"):
            raise ValueError(f"gradient must be 'backprop', 'numerical' or 'all', got {gradient!r}")
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        params = {
            "W1": rng.standard_normal((4, 3)).astype(resolved),
            "b1": np.zeros(3, resolved),
            "W2": rng.standard_normal((3, 2)).astype(resolved),
            "b2": np.zeros(2, resolved),
        }
        X = rng.random((6, 4)).astype(resolved)
        labels = np.arange(6) % 2
        indices = np.zeros((1, 2), dtype=np.intp)
        if gradient in ("backprop", "all"):
            # both input forms: dense X (one-off calls) and the listed
            # non-zeros that ``fastgrad.train`` builds once per run
            self.two_layer_sgd_steps(params, X, labels, indices, 0.01, "backprop")
            self.two_layer_sgd_steps(params, self.training_inputs(X), labels, indices, 0.01)
        if gradient in ("numerical", "all"):
            self.two_layer_sgd_steps(params, X, labels, indices, 0.01, "numerical")
        self.two_layer_loss(params, X, labels)
        self.two_layer_accuracy(params, X, labels)
        if gradient == "all":
            self.two_layer_gradient(params, X, labels)
            self.two_layer_numerical_gradient(params, X, labels, 1e-4)
        seconds = time.perf_counter() - started
        key = resolved.name
        self._warmup_seconds[key] = self._warmup_seconds.get(key, 0.0) + seconds
        return seconds

    # ------------------------------------------------------- activations
    def sigmoid(self, X: Array) -> Array:
        if _dtype_of(X) is None:
            return super().sigmoid(X)
        flat = np.ascontiguousarray(X).reshape(-1)
        out = np.empty_like(flat)
        kernels.sigmoid(flat, out)
        return out.reshape(np.shape(X))

    def sigmoid_grad(self, X: Array) -> Array:
        if _dtype_of(X) is None:
            return super().sigmoid_grad(X)
        flat = np.ascontiguousarray(X).reshape(-1)
        out = np.empty_like(flat)
        kernels.sigmoid_grad(flat, out)
        return out.reshape(np.shape(X))

    def softmax(self, X: Array) -> Array:
        if _dtype_of(X) is None or X.ndim == 0 or X.size == 0:
            return super().softmax(X)
        rows = np.ascontiguousarray(X).reshape(-1, X.shape[-1])
        out = np.empty_like(rows)
        kernels.softmax(rows, out)
        return out.reshape(X.shape)

    # ------------------------------------------------------------ losses
    def mean_squared_error(self, Y: Array, T: Array) -> Array:
        dtype = _dtype_of(Y)
        if dtype is None or Y.shape != T.shape:
            return super().mean_squared_error(Y, T)
        y = np.ascontiguousarray(Y).reshape(-1)
        t = np.ascontiguousarray(T, dtype=dtype).reshape(-1)
        return dtype.type(kernels.mean_squared_error(y, t))

    def cross_entropy_error(self, Y: Array, T: Array) -> Array:
        dtype = _dtype_of(Y)
        if dtype is None or Y.ndim != 2 or Y.shape[0] == 0:
            return super().cross_entropy_error(Y, T)
        y = np.ascontiguousarray(Y)
        if T.ndim == 1:
            labels = _labels(T, Y.shape[1])
            return dtype.type(kernels.cross_entropy_labels(y, labels, BOOK_LOG_GUARD))
        t = np.ascontiguousarray(T, dtype=dtype)
        return dtype.type(kernels.cross_entropy_dense(y, t, BOOK_LOG_GUARD))

    def softmax_cross_entropy(self, logits: Array, T: Array) -> Array:
        dtype = _dtype_of(logits)
        if dtype is None or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            return super().softmax_cross_entropy(logits, T)
        z = np.ascontiguousarray(logits)
        if T.ndim == 1:
            labels = _labels(T, z.shape[1])
            return dtype.type(kernels.softmax_cross_entropy_labels(z, labels))
        t = np.ascontiguousarray(T, dtype=dtype)
        return dtype.type(kernels.softmax_cross_entropy_dense(z, t))

    def softmax_cross_entropy_with_grad(self, logits: Array, T: Array) -> tuple[Array, Array]:
        dtype = _dtype_of(logits)
        if dtype is None or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            return super().softmax_cross_entropy_with_grad(logits, T)
        z = np.ascontiguousarray(logits)
        dz = np.empty_like(z)
        if T.ndim == 1:
            labels = _labels(T, z.shape[1])
            loss = kernels.softmax_cross_entropy_grad_labels(z, labels, dz)
        else:
            t = np.ascontiguousarray(T, dtype=dtype)
            loss = kernels.softmax_cross_entropy_grad_dense(z, t, dz)
        return dtype.type(loss), dz

    # ----------------------------------------------------- two-layer net
    def two_layer_logits(self, params: Params, X: Array) -> Array:
        prepared = _prepare(params, X)
        if prepared is None:
            return super().two_layer_logits(params, X)
        (W1, b1, W2, b2), x = prepared
        rows = x.shape[0]
        logits = np.empty((rows, W2.shape[1]), W2.dtype)
        threads = min(numba.get_num_threads(), rows // _ROWS_PER_THREAD)
        if threads <= 1:
            kernels.two_layer_logits(x, 0, rows, W1, b1, W2, b2, logits)
            return logits
        # The kernel releases the GIL, so Python threads run row blocks side
        # by side; each block writes only its own rows of ``logits``.
        bounds = [rows * part // threads for part in range(threads + 1)]
        with ThreadPoolExecutor(threads) as pool:
            for done in [
                pool.submit(kernels.two_layer_logits, x, first, last, W1, b1, W2, b2, logits)
                for first, last in itertools.pairwise(bounds)
            ]:
                done.result()
        return logits

    def two_layer_loss(self, params: Params, X: Array, labels: Array) -> Array:
        return self.softmax_cross_entropy(self.two_layer_logits(params, X), labels)

    def two_layer_accuracy(self, params: Params, X: Array, labels: Array) -> Array:
        predicted = np.argmax(self.two_layer_logits(params, X), axis=1)
        return np.mean(predicted == labels)

    def two_layer_gradient(self, params: Params, X: Array, labels: Array) -> tuple[Array, Params]:
        prepared = _prepare(params, X)
        if prepared is None or X.shape[0] == 0:
            return super().two_layer_gradient(params, X, labels)
        (W1, b1, W2, b2), x = prepared
        grads = {
            name: np.empty_like(array)
            for name, array in zip(PARAM_NAMES, (W1, b1, W2, b2), strict=True)
        }
        loss = kernels.two_layer_gradient(
            x, _labels(labels, W2.shape[1]), W1, b1, W2, b2, *grads.values()
        )
        return W1.dtype.type(loss), grads

    def training_inputs(self, X: Array) -> Array | SparseRows:
        """``X`` with its non-zeros listed once, for repeated ``two_layer_sgd_steps`` calls.

        Listing the non-zeros of all of MNIST takes ~0.3 s (float64); a
        training loop that calls ``two_layer_sgd_steps`` once per epoch would
        pay it each epoch. The result is a snapshot: later writes to ``X``
        are not seen by it.
        """
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype not in _FLOATS:
            return X
        dense = np.ascontiguousarray(X)
        return SparseRows(dense, *kernels.csr_rows(dense))

    def two_layer_sgd_step(self, params: Params, X: Array, labels: Array, lr: float) -> Array:
        rows = np.arange(np.shape(X)[0], dtype=np.intp).reshape(1, -1)
        return self.two_layer_sgd_steps(params, X, labels, rows, lr)[0]

    def two_layer_sgd_steps(
        self,
        params: Params,
        X: Array,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str = "backprop",
    ) -> Array:
        """All steps in one compiled call (see ``Backend.two_layer_sgd_steps``).

        ``gradient="backprop"`` computes in the parameters' dtype;
        ``"numerical"`` uses the fast central differences in float64.
        """
        sparse = X if isinstance(X, SparseRows) else None
        dense = sparse.dense if sparse is not None else X
        prepared = _prepare(params, dense)
        indices = np.asarray(batch_indices)
        if (
            prepared is None
            or gradient not in ("backprop", "numerical")
            or indices.ndim != 2
            or indices.shape[1] == 0
        ):
            return super().two_layer_sgd_steps(params, dense, labels, batch_indices, lr, gradient)
        (W1, b1, W2, b2), x = prepared
        rows = _indices(indices, x.shape[0])
        targets = _labels(labels, W2.shape[1])
        losses = np.empty(rows.shape[0], dtype=np.float64)
        if gradient == "backprop":
            if sparse is not None and sparse.values.dtype == W1.dtype:
                listed = (sparse.starts, sparse.columns, sparse.values)
            else:
                starts, columns, values, used, rows = kernels.drawn_rows_csr(x, rows)
                targets = targets[used]
                listed = (starts, columns, values)
            _sgd_backprop_threaded(*listed, targets, rows, (W1, b1, W2, b2), lr, losses)
        else:
            kernels.sgd_steps_numerical(
                x,
                targets,
                rows,
                W1,
                b1,
                W2,
                b2,
                float(lr),
                1e-4,
                self.taylor_max_shift,
                losses,
            )
        _write_back(params, (W1, b1, W2, b2))
        return losses

    def two_layer_numerical_gradient(
        self, params: Params, X: Array, labels: Array, h: float
    ) -> Params:
        """Fast central differences, in float64, parallel over input features.

        The same differences as the reference kernel (and the book's loop),
        from a shifted expansion whose truncation error is below 1e-14
        relative (see ``_numba_kernels.two_layer_numerical_gradient``); when
        the shift is not small (large ``h``, inputs or weights) the exact
        per-perturbation formula runs instead.
        """
        if np.shape(X)[0] == 0:
            return super().two_layer_numerical_gradient(params, X, labels, h)
        f64 = np.float64
        W1, b1, W2, b2 = (np.ascontiguousarray(params[name], dtype=f64) for name in PARAM_NAMES)
        x = np.ascontiguousarray(X, dtype=f64)
        targets = _labels(labels, W2.shape[1])
        batch_size, hidden_size = x.shape[0], W1.shape[1]
        pre, hidden, first_order, third_order = (
            np.empty((batch_size, hidden_size)) for _ in range(4)
        )
        probabilities = np.empty((batch_size, W2.shape[1]))
        grads = {
            name: np.empty_like(array)
            for name, array in zip(PARAM_NAMES, (W1, b1, W2, b2), strict=True)
        }
        step = float(h)
        expansion, _ = kernels.numerical_prepare(
            x,
            targets,
            W1,
            b1,
            W2,
            b2,
            step,
            self.taylor_max_shift,
            pre,
            hidden,
            probabilities,
            first_order,
            third_order,
        )
        shared = (
            pre,
            hidden,
            probabilities,
            targets,
            W2,
            step,
            expansion,
            first_order,
            third_order,
        )
        if numba.get_num_threads() > 1:
            bounds = kernels.balanced_bounds(x, _chunks())
            kernels.input_gradients_parallel(x, bounds, *shared, grads["W1"])
        else:
            kernels.input_gradient_rows(x, 0, x.shape[1], *shared, grads["W1"])
        kernels.numerical_finish(*shared, *grads.values())
        return grads

    # ------------------------------------------ black-box numerical gradients
    def numerical_gradient(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str
    ) -> Array:
        """Parallel differences when ``f`` is an ``@njit`` function, else the reference loop.

        Each thread perturbs its own copy of ``x``, so ``x`` is never written.
        A plain Python ``f`` cannot run in Numba's threads: the backend warns
        (:class:`~fastgrad.errors.SlowPathWarning`) and runs the base loop.
        """
        if not isinstance(f, Dispatcher):
            _warn_slow(f, "numerical_gradient")
            return super().numerical_gradient(f, x, h, method)
        if _dtype_of(x) is None or x.ndim == 0 or x.size == 0:
            # Nothing to spread over threads; the loop calls the compiled f directly.
            return super().numerical_gradient(f, x, h, method)
        central = method == "central"
        base_value = 0.0 if central else _scalar(f(x), "f(x)")
        try:
            grad = kernels.parallel_numerical_gradient(
                f, x, x.dtype.type(h), float(h), central, base_value, min(x.size, _chunks())
            )
        except NumbaError as error:
            _warn_uncompilable(error)
            return super().numerical_gradient(f, x, h, method)
        if np.isnan(grad).any():
            # Let the reference loop find the NaN and raise its error (or agree).
            return super().numerical_gradient(f, x, h, method)
        return grad

    def numerical_gradient_batched(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str, chunk_size: int | None
    ) -> Array:
        """Chunks of perturbed copies evaluated in parallel when ``f`` is ``@njit``."""
        if not isinstance(f, Dispatcher):
            _warn_slow(f, "numerical_gradient(batched=True)")
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        if _dtype_of(x) is None or x.ndim == 0 or x.size == 0:
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        size = x.size
        if chunk_size is None:
            # Enough chunks to keep every thread busy, within the memory budget.
            by_threads = -(-size // (4 * numba.get_num_threads()))
            chunk_size = max(1, min(by_threads, CHUNK_BUDGET_BYTES // (8 * size)))
        central = method == "central"
        base_value = 0.0
        if not central:
            base_value = float(_stack_values(f, x.reshape(1, -1), x.shape, 1)[0])
        try:
            grad, wrong_length = kernels.parallel_numerical_gradient_batched(
                f, x, x.dtype.type(h), float(h), central, base_value, chunk_size
            )
        except NumbaError as error:
            _warn_uncompilable(error)
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        if wrong_length >= 0:
            # f returned the wrong number of values: the reference raises the error.
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        return grad


# ------------------------------------------------------------------- helpers
def _sgd_backprop_threaded(
    starts: np.ndarray,
    columns: np.ndarray,
    values: np.ndarray,
    labels: np.ndarray,
    batch_indices: np.ndarray,
    params: tuple[np.ndarray, ...],
    lr: float,
    losses: np.ndarray,
    threads: int | None = None,
) -> None:
    """``kernels.sgd_worker`` on ``threads`` threads, by default ``numba.get_num_threads()``.

    ``W1`` is copied into the kernel's blocks by hidden units
    (``_unit_blocks``) and back when the steps are done. Every row that one
    thread writes and another reads fills whole cache lines (padded), so
    that no line is written by two cores.
    """
    W1, b1, W2, b2 = params
    batch_size = batch_indices.shape[1]
    hidden_size, classes = W2.shape
    if threads is None:
        threads = usable_threads(min(numba.get_num_threads(), batch_size))
    unit_bounds, width = _unit_blocks(hidden_size, threads, W1.dtype.itemsize)
    blocks = unit_bounds.shape[0] - 1
    W1_blocks = _aligned_zeros((blocks, W1.shape[0], width), W1.dtype)
    W2T_blocks = _aligned_zeros((blocks, classes, width), W1.dtype)
    spans = list(itertools.pairwise(unit_bounds.tolist()))
    for k, (first, last) in enumerate(spans):
        W1_blocks[k, :, : last - first] = W1[:, first:last]
        W2T_blocks[k, :, : last - first] = W2[first:last].T
    logit_width = _whole_lines(classes, W1.dtype.itemsize)
    run_on_threads(
        kernels.sgd_worker,
        threads,
        unit_bounds,
        starts,
        columns,
        values,
        labels,
        batch_indices,
        W1_blocks,
        b1,
        W2,
        b2,
        W1.dtype.type(lr),
        losses,
        W2T_blocks,
        _aligned_zeros((blocks, batch_size, width), W1.dtype),
        _aligned_zeros((blocks, batch_size, width), W1.dtype),
        _aligned_zeros((blocks, batch_size, logit_width), W1.dtype),
        _aligned_zeros((batch_size, logit_width), W1.dtype),
        _aligned_zeros((batch_size, _whole_lines(1, 8)), np.dtype(np.float64)),
    )
    for k, (first, last) in enumerate(spans):
        W1[:, first:last] = W1_blocks[k, :, : last - first]


def _unit_blocks(hidden_size: int, threads: int, itemsize: int) -> tuple[np.ndarray, int]:
    """How ``sgd_worker`` cuts the hidden units: ``(unit_bounds, width)``.

    One block per thread, but no more blocks than the units fill cache
    lines (a block narrower than a line would make its thread's pass over
    the inputs cost as much as a wider one, for less work). ``width`` is the
    widest block's units rounded up to whole cache lines, so that every row
    of every block starts on a line of its own, and to a multiple of 16
    columns, the row kernels' narrowest block: a float64 row of 50 padded
    to 56 left 8 columns that ``scatter_rows`` updates one pass each (one
    thread's float64 step measured 427 us at width 56 against 367 at 64).

    Example:
        >>> bounds, width = _unit_blocks(50, 2, 4)
        >>> bounds.tolist(), width
        ([0, 25, 50], 32)
        >>> _unit_blocks(50, 1, 8)[1], _unit_blocks(50, 16, 8)[0].tolist()
        (64, [0, 7, 14, 21, 28, 35, 42, 50])
    """
    lanes = CACHE_LINE_BYTES // itemsize
    blocks = max(1, min(threads, -(-hidden_size // lanes)))
    unit_bounds = hidden_size * np.arange(blocks + 1, dtype=np.int64) // blocks
    widest = _whole_lines(int(np.diff(unit_bounds).max()), itemsize)
    return unit_bounds, -(-widest // _ROW_BLOCK) * _ROW_BLOCK


def _whole_lines(count: int, itemsize: int) -> int:
    """``count`` rounded up to the elements of whole cache lines.

    Example:
        >>> _whole_lines(10, 4), _whole_lines(50, 8)
        (16, 56)
    """
    lanes = CACHE_LINE_BYTES // itemsize
    return -(-count // lanes) * lanes


def _aligned_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose data starts on a cache line.

    Example:
        >>> _aligned_zeros((3, 5), np.dtype(np.float32)).ctypes.data % CACHE_LINE_BYTES
        0
    """
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + CACHE_LINE_BYTES, np.uint8)
    offset = -raw.ctypes.data % CACHE_LINE_BYTES
    return raw[offset : offset + size].view(dtype).reshape(shape)


def _chunks() -> int:
    """Work chunks for a parallel kernel: a few per thread, for load balance.

    Asked here rather than inside the kernels: ``numba.get_num_threads()`` in
    compiled code is a ctypes call that stops Numba from caching the kernel.
    """
    return 4 * numba.get_num_threads()


def _dtype_of(*arrays: Any) -> np.dtype | None:
    """The common float dtype of ``arrays`` if the kernels handle it, else None."""
    if not all(isinstance(array, np.ndarray) for array in arrays):
        return None
    dtype = np.result_type(*arrays)
    return dtype if dtype in _FLOATS else None


def _prepare(params: Params, X: Array) -> tuple[tuple[np.ndarray, ...], np.ndarray] | None:
    """Parameters and ``X`` as C-contiguous arrays of one dtype, or None if unsupported."""
    arrays = [params[name] for name in PARAM_NAMES]
    dtype = _dtype_of(*arrays, X)
    if dtype is None or np.ndim(X) != 2 or arrays[0].ndim != 2 or arrays[2].ndim != 2:
        return None
    converted = tuple(np.ascontiguousarray(array, dtype=dtype) for array in arrays)
    return converted, np.ascontiguousarray(X, dtype=dtype)


def _write_back(params: Params, arrays: tuple[np.ndarray, ...]) -> None:
    """Copy updated parameters back where ``_prepare`` had to convert them."""
    for name, array in zip(PARAM_NAMES, arrays, strict=True):
        if array is not params[name]:
            params[name][...] = array


def _labels(labels: Array, num_classes: int) -> np.ndarray:
    """Labels as ``intp``; out-of-range labels raise here, not as wild memory access."""
    result = np.ascontiguousarray(labels, dtype=np.intp)
    if result.size and (int(result.min()) < 0 or int(result.max()) >= num_classes):
        raise IndexError(
            f"labels must lie in [0, {num_classes}), got {result.min()}..{result.max()}"
        )
    return result


def _indices(indices: np.ndarray, rows: int) -> np.ndarray:
    """Batch row indices as ``intp`` in ``[0, rows)`` (negative ones wrap, as in NumPy)."""
    result = np.ascontiguousarray(indices, dtype=np.intp)
    if result.size:
        low, high = int(result.min()), int(result.max())
        if low < -rows or high >= rows:
            bad = low if low < -rows else high
            raise IndexError(f"batch index {bad} is out of bounds for {rows} training rows")
        if low < 0:
            result = np.where(result < 0, result + rows, result)
    return result


def _warn_slow(f: Any, where: str) -> None:
    name = getattr(f, "__qualname__", type(f).__name__)
    warnings.warn(
        f"{where} on the numba backend: f ({name}) is a plain Python function, which "
        "Numba's threads cannot call, so the reference loop runs it one perturbation "
        "at a time; decorate f with @numba.njit to evaluate perturbations in parallel",
        SlowPathWarning,
        stacklevel=4,
    )


def _warn_uncompilable(error: Exception) -> None:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warnings.warn(
        "the numba backend could not compile its parallel loop around f "
        f"({type(error).__name__}: {first_line}); running the reference loop instead",
        SlowPathWarning,
        stacklevel=4,
    )
