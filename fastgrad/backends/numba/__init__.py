"""The Numba backend: NumPy arrays, with the hot kernels compiled by Numba.

Rule of this module: it only prepares arguments (contiguous arrays of one
float dtype, ``intp`` labels) and calls compiled kernels; whatever it does not
specialise (or any dtype other than float32/float64) runs the reference
kernel via ``super()``. Threads follow ``NUMBA_NUM_THREADS`` and
``numba.set_num_threads``. One file per concept:

* :mod:`~fastgrad.backends.numba.primitives`: elementwise, losses, sparse rows;
* :mod:`~fastgrad.backends.numba.chapter`: the fused chapter path (whole
  training steps and numerical gradients of one-hidden-layer sigmoid nets);
* :mod:`~fastgrad.backends.numba.network_training` and ``network_numerical``:
  the same for every other net (any depth, activation and weight decay),
  over the packed layers of :mod:`~fastgrad.backends.numba.network`;
* :mod:`~fastgrad.backends.numba.numerical`: numerical gradients of a user's ``f``;
* :mod:`~fastgrad.backends.numba.threads`, ``sync``, ``simd``, ``vector_math``:
  the threads, barriers and vector code the chapter path is built from.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba.core import event as numba_event
from numba.core.dispatcher import Dispatcher
from numba.core.errors import NumbaError

from fastgrad.backends._base import (
    BOOK_LOG_GUARD,
    CHUNK_BUDGET_BYTES,
    SNAPSHOT_COMPARES,
    Array,
    Backend,
    Network,
    SparseRows,
    _check_unchanged,
    _element_changed_error,
    _out_of_range,
    _scalar,
    _stack_length_error,
    _stack_value_error,
    _stack_values,
    _x_changed_error,
)
from fastgrad.backends.numba import (
    chapter,
    network_numerical,
    network_training,
    numerical,
    primitives,
)
from fastgrad.backends.numba import network as packed
from fastgrad.backends.numba._jit import FASTMATH
from fastgrad.backends.numba.threads import ThreadCountChooser, run_on_threads, usable_threads
from fastgrad.errors import SlowPathWarning

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

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
        return module.startswith(__name__)

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


numba_event.register("numba:compile", _compile_clock)


class NumbaBackend(Backend):
    """NumPy arrays; activations, losses, sparse rows and the chapter's net compiled.

    Kernels compile on first use for each dtype (float32, float64) and are
    cached on disk, so later processes load them instead; :meth:`warmup`
    compiles ahead what a training run needs. :meth:`fused_sgd_steps` runs a
    whole multi-step training loop of any net in one compiled call, and the
    numerical gradients run in parallel threads.

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
    #: ``network_numerical_gradient`` of the chapter's net uses its shifted
    #: expansion instead of the exact per-perturbation formula (set it to 0.0
    #: to force the latter).
    taylor_max_shift: float = chapter.TAYLOR_MAX_SHIFT

    #: Whether the training loops (:meth:`fused_sgd_steps`) choose how many
    #: of Numba's threads to run from measured step times, fewer when other
    #: processes hold the cores (see
    #: :class:`~fastgrad.backends.numba.threads.ThreadCountChooser`; the
    #: choice never changes a result). False runs every step on
    #: ``numba.get_num_threads()`` threads.
    choose_threads: bool = True

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
                "fastmath": "on" if FASTMATH else "off",
                "jit compile seconds": f"{_compile_clock.seconds:.2f} in this process "
                "(kernels compile on first use or load from the on-disk cache; "
                "backend.warmup() compiles ahead)",
            }
        )
        for dtype, seconds in self._warmup_seconds.items():
            facts[f"warmup seconds ({dtype})"] = f"{seconds:.2f}"
        return facts

    def warmup(
        self, dtype: Any = np.float64, gradient: str = "backprop", network: Network | None = None
    ) -> float:
        """Compile (or load from the cache) the kernels a training run uses.

        ``gradient="backprop"`` (what ``fastgrad train`` runs by default):
        the fused backprop steps (of the chapter's net and of any other) plus
        the loss, logits and accuracy of the evaluations; ``"numerical"``:
        the fused numerical-gradient steps of the chapter's net and the fast
        numerical gradient that other nets' steps call, plus the same
        evaluations; ``"all"``: every kernel, also the one-batch gradient.
        One compile serves every depth and activation. With ``network``,
        only the kernels of its kind of net: the chapter's (one sigmoid
        hidden layer, no weight decay) or every other's; a cold compile of
        the other kind costs tens of seconds. Returns the seconds spent; the
        compile part alone shows in ``describe()["jit compile seconds"]``.

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
        chapter_net = Network(
            weights=(
                rng.standard_normal((4, 3)).astype(resolved),
                rng.standard_normal((3, 2)).astype(resolved),
            ),
            biases=(np.zeros(3, resolved), np.zeros(2, resolved)),
            activation="sigmoid",
        )
        # any other net: one kernel per dtype whatever the depth and activation
        deeper = Network(
            weights=(*chapter_net.weights, rng.standard_normal((2, 2)).astype(resolved)),
            biases=(*chapter_net.biases, np.zeros(2, resolved)),
            activation="relu",
        )
        X = rng.random((6, 4)).astype(resolved)
        labels = np.arange(6) % 2
        indices = np.zeros((1, 2), dtype=np.intp)
        kinds: tuple[Network, ...] = (chapter_net, deeper)
        if network is not None and gradient != "all":
            chapters = (
                network.depth == 2 and network.activation == "sigmoid" and not network.weight_decay
            )
            kinds = (chapter_net,) if chapters else (deeper,)
        if gradient in ("backprop", "all"):
            # both input forms: dense X (one-off calls) and the listed
            # non-zeros that ``fastgrad.train`` builds once per run
            for net, inputs in itertools.product(kinds, (X, self.training_inputs(X))):
                self.fused_sgd_steps(net, inputs, labels, indices, 0.01, "backprop")
        if gradient in ("numerical", "all"):
            if chapter_net in kinds:
                self.fused_sgd_steps(chapter_net, X, labels, indices, 0.01, "numerical")
            if deeper in kinds:
                self.network_numerical_gradient(deeper, X, labels, 1e-4)
        logits = self.sigmoid(X @ chapter_net.weights[0]) @ chapter_net.weights[1]
        self.softmax_cross_entropy(logits, labels)
        # the evaluations' forward over many rows (blocks on the threads, where it runs them)
        rows = np.resize(X, (_AFFINE_ROWS, X.shape[1]))
        self.affine_forward(rows, chapter_net.weights[0], chapter_net.biases[0])
        if gradient == "all":
            self.softmax_cross_entropy_with_grad(logits, labels)
            self.network_numerical_gradient(chapter_net, X, labels, 1e-4)
        seconds = time.perf_counter() - started
        key = resolved.name
        self._warmup_seconds[key] = self._warmup_seconds.get(key, 0.0) + seconds
        return seconds

    # ---------------------------------------------------------- affine
    def affine_forward(self, X: Array | SparseRows, W: Array, b: Array) -> Array:
        """``X @ W + b``; many dense rows in blocks on Numba's threads.

        From ``_AFFINE_ROWS`` rows of one float dtype, with two threads or
        more: :func:`primitives.affine_rows`; anything else the reference.
        """
        if not _blocks_of_rows(X, W, b):
            return super().affine_forward(X, W, b)
        out = np.empty((X.shape[0], W.shape[1]), dtype=X.dtype)
        with _one_blas_thread():
            primitives.affine_rows(
                np.ascontiguousarray(X),
                np.ascontiguousarray(W),
                np.ascontiguousarray(b),
                out,
                numba.get_num_threads(),
            )
        return out

    # ------------------------------------------------------- activations
    def sigmoid(self, X: Array) -> Array:
        if _dtype_of(X) is None:
            return super().sigmoid(X)
        flat = np.ascontiguousarray(X).reshape(-1)
        out = np.empty_like(flat)
        primitives.sigmoid(flat, out)
        return out.reshape(np.shape(X))

    def sigmoid_grad(self, X: Array) -> Array:
        if _dtype_of(X) is None:
            return super().sigmoid_grad(X)
        flat = np.ascontiguousarray(X).reshape(-1)
        out = np.empty_like(flat)
        primitives.sigmoid_grad(flat, out)
        return out.reshape(np.shape(X))

    def softmax(self, X: Array) -> Array:
        if _dtype_of(X) is None or X.ndim == 0 or X.size == 0:
            return super().softmax(X)
        rows = np.ascontiguousarray(X).reshape(-1, X.shape[-1])
        out = np.empty_like(rows)
        primitives.softmax(rows, out)
        return out.reshape(X.shape)

    # ------------------------------------------------------------ losses
    def mean_squared_error(self, Y: Array, T: Array) -> Array:
        dtype = _dtype_of(Y)
        if dtype is None or Y.shape != T.shape:
            return super().mean_squared_error(Y, T)
        y = np.ascontiguousarray(Y).reshape(-1)
        t = np.ascontiguousarray(T, dtype=dtype).reshape(-1)
        return dtype.type(primitives.mean_squared_error(y, t))

    def cross_entropy_error(self, Y: Array, T: Array) -> Array:
        dtype = _dtype_of(Y)
        if dtype is None or Y.ndim != 2 or Y.shape[0] == 0:
            return super().cross_entropy_error(Y, T)
        y = np.ascontiguousarray(Y)
        if T.ndim == 1:
            labels = _labels(T, Y.shape[1])
            return dtype.type(primitives.cross_entropy_labels(y, labels, BOOK_LOG_GUARD))
        t = np.ascontiguousarray(T, dtype=dtype)
        return dtype.type(primitives.cross_entropy_dense(y, t, BOOK_LOG_GUARD))

    def softmax_cross_entropy(self, logits: Array, T: Array) -> Array:
        dtype = _dtype_of(logits)
        if dtype is None or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            return super().softmax_cross_entropy(logits, T)
        z = np.ascontiguousarray(logits)
        if T.ndim == 1:
            labels = _labels(T, z.shape[1])
            return dtype.type(primitives.softmax_cross_entropy_labels(z, labels))
        t = np.ascontiguousarray(T, dtype=dtype)
        return dtype.type(primitives.softmax_cross_entropy_dense(z, t))

    def softmax_cross_entropy_with_grad(self, logits: Array, T: Array) -> tuple[Array, Array]:
        dtype = _dtype_of(logits)
        if dtype is None or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            return super().softmax_cross_entropy_with_grad(logits, T)
        z = np.ascontiguousarray(logits)
        dz = np.empty_like(z)
        if T.ndim == 1:
            labels = _labels(T, z.shape[1])
            loss = primitives.softmax_cross_entropy_grad_labels(z, labels, dz)
        else:
            t = np.ascontiguousarray(T, dtype=dtype)
            loss = primitives.softmax_cross_entropy_grad_dense(z, t, dz)
        return dtype.type(loss), dz

    # ------------------------------------------------------ sparse inputs
    def sparse_rows(self, X: Array) -> SparseRows:
        """The non-zeros of ``X`` row by row, listed by a compiled loop (int32 columns)."""
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype not in _FLOATS:
            return super().sparse_rows(X)
        dense = np.ascontiguousarray(X)
        return SparseRows(dense, *primitives.csr_rows(dense))

    def training_inputs(self, X: Array) -> Array | SparseRows:
        """``X`` with its non-zeros listed once, for repeated :meth:`fused_sgd_steps` calls.

        Listing the non-zeros of all of MNIST takes ~0.3 s (float64); a
        training loop that calls the steps once per epoch would pay it each
        epoch. The result is a snapshot: later writes to ``X`` are not seen.
        """
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype not in _FLOATS:
            return X
        return self.sparse_rows(X)

    # ------------------------------------------------- the chapter's fused path
    def fused_sgd_steps(
        self,
        network: Network,
        X: Array | SparseRows,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str,
    ) -> Array | None:
        """All steps in one compiled call: any net by backprop, the chapter's net numerically.

        A one-hidden-layer sigmoid net without weight decay runs the
        chapter's kernels (:mod:`~fastgrad.backends.numba.chapter`):
        ``gradient="backprop"`` in the parameters' dtype on threads meeting
        at a barrier, ``"numerical"`` by the fast central differences in
        float64. Every other net runs
        :func:`~fastgrad.backends.numba.network_training.sgd_steps` for
        ``"backprop"`` (any depth, activation and weight decay, in the
        parameters' dtype) and returns None for ``"numerical"``: the model's
        loop then calls :meth:`network_numerical_gradient` each step. None
        also where the parameters and ``X`` are not all of one float dtype.
        """
        sparse = X if isinstance(X, SparseRows) else None
        dense = sparse.dense if sparse is not None else X
        indices = np.asarray(batch_indices)
        if gradient not in ("backprop", "numerical") or indices.ndim != 2 or indices.shape[1] == 0:
            return None
        prepared = _chapter_arrays(network, dense)
        if prepared is None:
            if gradient != "backprop":
                return None
            return _network_sgd_steps(
                network, dense, sparse, labels, indices, lr, self.choose_threads
            )
        (W1, b1, W2, b2), x = prepared
        rows = _indices(indices, x.shape[0])
        targets = _labels(labels, W2.shape[1])
        losses = np.empty(rows.shape[0], dtype=np.float64)
        if gradient == "backprop":
            starts, columns, values, targets, rows = _listed_rows(x, sparse, targets, rows)
            _sgd_backprop_threaded(
                starts,
                columns,
                values,
                targets,
                rows,
                (W1, b1, W2, b2),
                lr,
                losses,
                choose_threads=self.choose_threads,
            )
        else:
            chapter.sgd_steps_numerical(
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
        _write_back(network, (W1, b1, W2, b2))
        return losses

    def network_numerical_gradient(
        self, network: Network, X: Array | SparseRows, labels: Array, h: float
    ) -> list[tuple[Array, Array]]:
        """Fast central differences in float64, in parallel threads; any net.

        For a one-hidden-layer sigmoid net: the same differences as the
        reference kernel (and the book's loop), from a shifted expansion
        whose truncation error is below 1e-14 relative (see
        ``chapter.numerical_prepare``); when the shift is not small (large
        ``h``, inputs or weights) the exact per-perturbation formula runs
        instead. Every other net: the reference kernel's differences, unit
        by unit (:mod:`~fastgrad.backends.numba.network_numerical`). As in
        the reference, logit changes beyond ``SMALL_LOGIT_SHIFT`` are formed
        from the log-probabilities, so every step ``h`` gives the naive loop's
        differences.
        """
        dense = X.dense if isinstance(X, SparseRows) else X
        if np.shape(dense)[0] == 0 or _dtype_of(dense, *network.arrays) is None:
            return super().network_numerical_gradient(network, X, labels, h)
        if network.depth != 2 or network.activation != "sigmoid":
            return _network_numerical_gradient(network, dense, labels, h)
        f64 = np.float64
        W1, b1, W2, b2 = (np.ascontiguousarray(array, dtype=f64) for array in network.arrays)
        x = np.ascontiguousarray(dense, dtype=f64)
        targets = _labels(labels, W2.shape[1])
        batch_size, hidden_size = x.shape[0], W1.shape[1]
        pre, hidden, first_order, third_order = (
            np.empty((batch_size, hidden_size)) for _ in range(4)
        )
        probabilities, log_probabilities = (np.empty((batch_size, W2.shape[1])) for _ in range(2))
        grads = [np.empty_like(array) for array in (W1, b1, W2, b2)]
        step = float(h)
        expansion, _ = chapter.numerical_prepare(
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
            log_probabilities,
            first_order,
            third_order,
        )
        shared = (
            pre,
            hidden,
            probabilities,
            log_probabilities,
            targets,
            W2,
            step,
            expansion,
            first_order,
            third_order,
        )
        if numba.get_num_threads() > 1:
            bounds = chapter.balanced_bounds(x, _chunks())
            chapter.input_gradients_parallel(x, bounds, *shared, grads[0])
        else:
            chapter.input_gradient_rows(x, 0, x.shape[1], *shared, grads[0])
        chapter.numerical_finish(*shared, *grads)
        if network.weight_decay:
            # the central difference of 0.5·λ·W² is λ·W exactly
            grads[0] += network.weight_decay * W1
            grads[2] += network.weight_decay * W2
        return [(grads[0], grads[1]), (grads[2], grads[3])]

    # ------------------------------------------ black-box numerical gradients
    def numerical_gradient(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str
    ) -> Array:
        """Parallel differences when ``f`` is an ``@njit`` function, else the reference loop.

        Each thread perturbs its own copy of ``x``, so ``x`` is never written.
        The reference loop's rules hold all the same, with its errors: an
        exception ``f`` raises comes out (``f`` is called again at that
        element, outside the threads, to raise it), and so do a non-finite
        value of ``f`` and an ``f`` that writes to its argument (each copy is
        watched as the reference watches ``x``). A plain Python ``f`` cannot
        run in Numba's threads: the backend warns
        (:class:`~fastgrad.errors.SlowPathWarning`) and runs the base loop.
        """
        if not isinstance(f, Dispatcher):
            _warn_slow(f, "numerical_gradient")
            return super().numerical_gradient(f, x, h, method)
        if _dtype_of(x) is None or x.ndim == 0 or x.size == 0:
            # Nothing to spread over threads; the loop calls the compiled f directly.
            return super().numerical_gradient(f, x, h, method)
        central = method == "central"
        source = np.ascontiguousarray(x)
        step = x.dtype.type(h)
        base_value = 0.0 if central else _value_on_a_copy(f, source)
        codes, values = numerical.failure_table(min(x.size, _chunks()))
        try:
            grad = numerical.parallel_numerical_gradient(
                f,
                source,
                step,
                float(h),
                central,
                base_value,
                -(-x.size // SNAPSHOT_COMPARES),
                float(np.finfo(x.dtype).max),
                codes,
                values,
            )
        except NumbaError as error:
            _warn_uncompilable(error)
            return super().numerical_gradient(f, x, h, method)
        failed = np.flatnonzero(codes[:, 0])
        if failed.size:
            # The chunks run in element order: the first failed chunk holds the
            # first failing element, the one the reference loop stops at.
            _raise_thread_failure(f, source, step, codes[failed[0]], values[failed[0]])
            # f raised in a thread but not when called again: the reference decides.
            return super().numerical_gradient(f, x, h, method)
        return grad

    def numerical_gradient_batched(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str, chunk_size: int | None
    ) -> Array:
        """Chunks of perturbed copies evaluated in parallel when ``f`` is ``@njit``.

        As the reference: ``x`` is never written, ``f`` may write to its own
        argument (the ``-h`` stack is rebuilt from ``x``) or return a view of
        it, and an exception or a non-finite value of ``f`` is raised as the
        reference raises it.
        """
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
        source = np.ascontiguousarray(x)
        step = x.dtype.type(h)
        base_value = 0.0
        if not central:
            # On a copy: f may write to its argument, and x must not change.
            base_value = float(_stack_values(f, source.reshape(1, -1).copy(), x.shape, 1)[0])
        codes, values = numerical.failure_table(-(-size // chunk_size))
        try:
            grad = numerical.parallel_numerical_gradient_batched(
                f, source, step, float(h), central, base_value, chunk_size, codes, values
            )
        except NumbaError as error:
            _warn_uncompilable(error)
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        failed = np.flatnonzero(codes[:, 0])
        if failed.size:
            _raise_batched_failure(f, source, step, chunk_size, codes[failed[0]], values[failed[0]])
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        return grad


# ------------------------------------------------------------------- helpers
def _value_on_a_copy(f: Callable[[Array], Any], x: np.ndarray) -> float:
    """``f`` at a copy of ``x`` (the forward differences' base); an ``f`` writing it is refused."""
    work = x.copy()
    value = _scalar(f(work), "f(x)")
    _check_unchanged(np, work, x, "f(x)")
    return value


def _flat_index(element: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(element, shape))


def _raise_thread_failure(
    f: Callable[[Array], Any], x: np.ndarray, step: Any, codes: np.ndarray, values: np.ndarray
) -> None:
    """Raise the reference loop's error for what a chunk of the parallel loop recorded.

    Returns only when ``f`` raised in a thread but not when called again here.
    """
    code, element, evaluation, other = (int(value) for value in codes)
    found, expected = float(values[0]), float(values[1])
    index = _flat_index(element, x.shape)
    what = "f(x + h)" if evaluation == 0 else "f(x - h)"
    if code == numerical.RAISED:
        work = x.copy()
        flat = work.reshape(-1)
        flat[element] = flat[element] + step if evaluation == 0 else flat[element] - step
        f(work)  # raises the user's own exception, message and all
        return
    if code == numerical.NOT_FINITE:
        _scalar(found, what, index)
    if code == numerical.ELEMENT_CHANGED:
        raise _element_changed_error(what, index, found, expected)
    if code == numerical.X_CHANGED:
        raise _x_changed_error(f"f at x{list(index)}", _flat_index(other, x.shape), found, expected)
    if code == numerical.OUT_OF_RANGE:
        _out_of_range(found, index, x.dtype)
    raise AssertionError(f"unknown failure code {code} of the parallel numerical gradient")


def _raise_batched_failure(
    f: Callable[[Array], Any],
    x: np.ndarray,
    step: Any,
    chunk_size: int,
    codes: np.ndarray,
    values: np.ndarray,
) -> None:
    """Raise the reference's error for what a chunk of the batched parallel loop recorded.

    Returns only when ``f`` raised in a thread but not when called again here.
    """
    code, element, evaluation, other = (int(value) for value in codes)
    if code == numerical.NOT_FINITE:
        raise _stack_value_error(float(values[0]), element)
    start = element
    count = min(chunk_size, x.size - start)
    if code == numerical.WRONG_LENGTH:
        raise _stack_length_error(count, x.shape, (other,))
    if code == numerical.RAISED:
        flat = x.reshape(-1)
        stack = np.broadcast_to(flat, (count, flat.size)).copy()
        rows, columns = np.arange(count), np.arange(start, start + count)
        moved = flat[start : start + count]
        stack[rows, columns] = moved + step if evaluation == 0 else moved - step
        f(stack.reshape((count, *x.shape)))  # raises the user's own exception
        return
    raise AssertionError(f"unknown failure code {code} of the batched numerical gradient")


def _listed_rows(
    x: np.ndarray, sparse: SparseRows | None, targets: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, ...]:
    """``starts, columns, values, targets, rows``: the training rows as the kernels read them.

    The non-zeros listed by :meth:`NumbaBackend.training_inputs` when they
    are of ``x``'s dtype and layout, else those of the rows the steps draw
    (``targets`` and ``rows`` renumbered to them).
    """
    if sparse is not None and sparse.values.dtype == x.dtype and sparse.columns.dtype == np.int32:
        return sparse.starts, sparse.columns, sparse.values, targets, rows
    starts, columns, values, used, local = primitives.drawn_rows_csr(x, rows)
    return starts, columns, values, targets[used], local


def _network_sgd_steps(
    network: Network,
    dense: Array,
    sparse: SparseRows | None,
    labels: Array,
    indices: np.ndarray,
    lr: float,
    choose_threads: bool,
) -> np.ndarray | None:
    """``network_training.sgd_steps`` on packed copies of the layers, written back after.

    With ``choose_threads``, a :class:`ThreadCountChooser` picks how many of
    Numba's threads run each slice of the steps, as for the chapter's loop.
    """
    dtype = _dtype_of(*network.arrays)
    if (
        dtype is None
        or any(array.dtype != dtype for array in network.arrays)
        or not isinstance(dense, np.ndarray)
        or dense.ndim != 2
        or dense.dtype != dtype
    ):
        # mixed dtypes promote step by step in the model's loop; no kernel copies that
        return None
    if not _has_scipy():
        return None  # np.dot in compiled code needs SciPy's BLAS (the numba extra has it)
    x = np.ascontiguousarray(dense)
    rows = _indices(indices, x.shape[0])
    targets = _labels(labels, int(network.weights[-1].shape[1]))
    starts, columns, values, targets, rows = _listed_rows(x, sparse, targets, rows)
    layers = packed.pack(network, dtype)
    losses = np.empty(rows.shape[0], dtype=np.float64)
    before = numba.get_num_threads()
    most = usable_threads(before)
    # the chunks fix the arithmetic; the threads that run them only the speed
    chunks = max(1, min(most, rows.shape[1]))

    def run_slice(first: int, last: int, threads: int) -> None:
        numba.set_num_threads(threads)
        try:
            network_training.sgd_steps(
                starts,
                columns,
                values,
                targets,
                rows[first:last],
                layers,
                packed.activation_code(network.activation),
                float(network.weight_decay),
                float(lr),
                losses[first:last],
                chunks,
            )
        finally:
            numba.set_num_threads(before)

    shapes = tuple(layer.shape for layer in network.weights)
    key = ("network", most, shapes, dtype, rows.shape[1])
    with _one_blas_thread():
        _run_steps(key, most, rows.shape[0], run_slice, choose_threads)
    packed.write_back(network, layers)
    return losses


# Rows from which affine_forward runs in blocks on Numba's threads: evaluations
# of a data set, not a training batch (whose products are too small to split).
_AFFINE_ROWS = 1000


def _blocks_of_rows(X: Any, W: Any, b: Any) -> bool:
    """Whether ``affine_forward(X, W, b)`` runs :func:`primitives.affine_rows`."""
    return (
        all(type(array) is np.ndarray for array in (X, W, b))  # no subclass (masked, matrix)
        and X.ndim == 2
        and W.ndim == 2
        and b.ndim == 1
        and X.shape[0] >= _AFFINE_ROWS
        and X.shape[1] == W.shape[0]
        and W.shape[1] == b.shape[0]
        and X.dtype in _FLOATS
        and X.dtype == W.dtype == b.dtype
        and numba.get_num_threads() > 1
        and _has_scipy()
    )


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS limited to one thread, for kernels that call it from each of Numba's threads.

    Their products (``np.dot`` in compiled code: SciPy's BLAS) are too small
    to split, and BLAS threads started inside Numba's would outnumber the
    cores (a step took 10-30x longer so). Without threadpoolctl nothing is
    limited.
    """
    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.cache
def _has_scipy() -> bool:
    return importlib.util.find_spec("scipy") is not None


@functools.cache
def _blas_controller() -> Any:
    """A threadpoolctl controller of the BLAS libraries loaded now (SciPy's among them).

    Made once: finding the libraries takes ~1 ms, limiting them through it ~10 us.
    """
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loaded first, so that it is found)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _network_numerical_gradient(
    network: Network, dense: Array, labels: Array, h: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``network_numerical.numerical_gradient`` of any net, as ``(dW, db)`` per layer."""
    layers = packed.pack(network, np.dtype(np.float64))
    x = np.ascontiguousarray(dense, dtype=np.float64)
    targets = _labels(labels, int(network.weights[-1].shape[1]))
    grad_weights_t = np.zeros(layers.weights.shape[0])
    grad_biases = np.zeros(layers.biases.shape[0])
    widest = int(layers.sizes[1:].max())
    tile = 2 * max(8, min(256, network_numerical.TILE_FLOATS // (2 * widest)))
    network_numerical.numerical_gradient(
        x,
        targets,
        layers,
        packed.activation_code(network.activation),
        float(h),
        _chunks(),
        tile,
        grad_weights_t,
        grad_biases,
    )
    starts = layers.weight_starts.tolist()
    result = []
    for layer, (W, grad_b) in enumerate(
        zip(
            packed.unpacked_weights(layers, layers.weights),
            packed.unpacked_biases(layers, grad_biases),
            strict=True,
        )
    ):
        # the kernel wrote W.T (a unit's row per chunk): (fan_out, fan_in) in W's place
        grad_t = grad_weights_t[starts[layer] : starts[layer + 1]].reshape(W.shape[::-1])
        grad_W = np.ascontiguousarray(grad_t.T)
        if network.weight_decay:
            # the central difference of 0.5·λ·W² is λ·W exactly
            grad_W += network.weight_decay * W
        result.append((grad_W, grad_b))
    return result


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
    choose_threads: bool = True,
) -> None:
    """``chapter.sgd_worker`` over the steps, on ``threads`` threads or as many as pay.

    ``W1`` is copied into the kernel's blocks by hidden units
    (``_unit_blocks``) and back when the steps are done. Every row that one
    thread writes and another reads fills whole cache lines (padded), so
    that no line is written by two cores.

    With ``threads`` given, every step runs on that many threads, in as
    many blocks. Without, the blocks are cut for ``numba.get_num_threads()``
    threads, and with ``choose_threads`` a
    :class:`~fastgrad.backends.numba.threads.ThreadCountChooser` (one per
    shape, kept between calls) picks from measured step times how many of
    them run each slice of the steps: fewer when other processes hold the
    cores. The blocks alone fix the arithmetic, so the choice never changes
    a result.
    """
    W1, b1, W2, b2 = params
    steps, batch_size = batch_indices.shape
    hidden_size, classes = W2.shape
    most = usable_threads(min(numba.get_num_threads(), batch_size))
    unit_bounds, width = _unit_blocks(hidden_size, threads or most, W1.dtype.itemsize)
    blocks = unit_bounds.shape[0] - 1
    W1_blocks = _aligned_zeros((blocks, W1.shape[0], width), W1.dtype)
    W2T_blocks = _aligned_zeros((blocks, classes, width), W1.dtype)
    spans = list(itertools.pairwise(unit_bounds.tolist()))
    for k, (first, last) in enumerate(spans):
        W1_blocks[k, :, : last - first] = W1[:, first:last]
        W2T_blocks[k, :, : last - first] = W2[first:last].T
    logit_width = _whole_lines(classes, W1.dtype.itemsize)
    scratch = (
        W2T_blocks,
        _aligned_zeros((blocks, batch_size, width), W1.dtype),
        _aligned_zeros((blocks, batch_size, width), W1.dtype),
        _aligned_zeros((blocks, batch_size, logit_width), W1.dtype),
        _aligned_zeros((batch_size, logit_width), W1.dtype),
        _aligned_zeros((batch_size, _whole_lines(1, 8)), np.dtype(np.float64)),
    )
    step_lr = W1.dtype.type(lr)

    def run_slice(first: int, last: int, slice_threads: int) -> None:
        run_on_threads(
            chapter.sgd_worker,
            slice_threads,
            unit_bounds,
            starts,
            columns,
            values,
            labels,
            batch_indices[first:last],
            W1_blocks,
            b1,
            W2,
            b2,
            step_lr,
            losses[first:last],
            *scratch,
        )

    if threads is not None:
        run_slice(0, steps, threads)
    else:
        key = ("chapter", most, W1.shape, W1.dtype, batch_size)
        _run_steps(key, most, steps, run_slice, choose_threads)
    for k, (first, last) in enumerate(spans):
        W1[:, first:last] = W1_blocks[k, :, : last - first]


# One chooser per training shape: a run's epochs (one call each) share what
# the earlier ones measured.
_THREAD_CHOOSERS: dict[tuple[Any, ...], ThreadCountChooser] = {}


def _run_steps(
    key: tuple[Any, ...],
    most: int,
    steps: int,
    run_slice: Callable[[int, int, int], None],
    choose_threads: bool,
) -> None:
    """``run_slice(first, last, threads)`` over all steps: on ``most`` threads, or as chosen.

    With ``choose_threads``, the steps run in slices on the counts that the
    shape's :class:`ThreadCountChooser` (made on first use) picks.
    """
    if not choose_threads:
        run_slice(0, steps, most)
        return
    chooser = _THREAD_CHOOSERS.get(key)
    if chooser is None:
        chooser = _THREAD_CHOOSERS[key] = ThreadCountChooser(most)
    chooser.run(steps, run_slice)


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


def _chapter_arrays(
    network: Network, X: Array
) -> tuple[tuple[np.ndarray, ...], np.ndarray] | None:
    """``W1, b1, W2, b2`` and ``X`` as C-contiguous arrays of one dtype, or None.

    None where the chapter's fused kernels do not serve the network: not a
    one-hidden-layer sigmoid net without weight decay, or an unsupported dtype.
    """
    if network.depth != 2 or network.activation != "sigmoid" or network.weight_decay:
        return None
    arrays = network.arrays
    dtype = _dtype_of(*arrays, X)
    if dtype is None or np.ndim(X) != 2:
        return None
    converted = tuple(np.ascontiguousarray(array, dtype=dtype) for array in arrays)
    return converted, np.ascontiguousarray(X, dtype=dtype)


def _write_back(network: Network, arrays: tuple[np.ndarray, ...]) -> None:
    """Copy updated parameters back where ``_chapter_arrays`` had to convert them."""
    for original, array in zip(network.arrays, arrays, strict=True):
        if array is not original:
            original[...] = array


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
