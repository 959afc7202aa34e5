"""The backend interface: every kernel of fastgrad, written once against ``xp``.

A backend is an array namespace (``numpy``, ``cupy``) plus layer primitives:
affine and activation forward/backward pairs, softmax cross-entropy, the SGD
update, and the numerical gradient of a whole network. The kernels here use
only ``self.xp`` so that any NumPy-like namespace runs them correctly; the
Numba and CuPy backends subclass :class:`Backend` and override only their hot
paths (the Thinc pattern), calling ``super()`` for the rest.

Kernels trust their inputs: shapes, dtypes and label ranges are checked once
at the public API (``fastgrad.functions``, ``fastgrad.models``), never in the
hot path. Losses come back as backend scalars (not Python floats) so that a
GPU backend does not have to synchronise for a value nobody asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

Array = Any
"""An array of the backend's own type (``numpy.ndarray``, ``cupy.ndarray``)."""

ACTIVATIONS = ("sigmoid", "relu", "tanh", "identity")
"""The hidden-layer activations every backend implements."""

# The book's guard against log(0) in cross_entropy_error; kept for its values.
BOOK_LOG_GUARD = 1e-7

# Upper bound on the scratch memory one chunk of a numerical-gradient kernel
# may take. Large enough that the chapter's net runs in a handful of chunks,
# small enough for a laptop or a busy GPU.
CHUNK_BUDGET_BYTES = 64 * 2**20

# How often, at most, the black-box loop compares all of x with its snapshot.
SNAPSHOT_COMPARES = 256

#: Largest logit change for which the numerical kernels form a loss change as
#: ``log1p(sum_c p_c·expm1(d_c))``. Up to it, ``1 + sum`` >= ``e^-1`` (nothing
#: cancels) and ``expm1`` cannot overflow; beyond it they use the
#: log-sum-exp of the moved log-probabilities, whose rounding error (~eps·|d|)
#: is then no larger than the change's own.
SMALL_LOGIT_SHIFT = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """What a backend kernel knows of a multilayer net: its arrays and its rule.

    Layer ``l`` computes ``A_l = H_{l-1} @ weights[l] + biases[l]``, then
    ``H_l = activation(A_l)`` for every layer but the last, whose ``A_L`` are
    the logits of a softmax cross-entropy loss, plus
    ``0.5 * weight_decay * sum(W**2)`` over every weight matrix. The arrays
    are the model's own (not copies): kernels that update them do so in place.
    Only models build these; nothing below a model knows parameter names.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    activation: str
    weight_decay: float = 0.0

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def arrays(self) -> tuple[Array, ...]:
        """``W_1, b_1, ..., W_L, b_L``: the order of gradients and updates."""
        return tuple(a for pair in zip(self.weights, self.biases, strict=True) for a in pair)


@dataclasses.dataclass(frozen=True, eq=False)
class SparseRows:
    """A batch or training set together with its non-zeros, row by row (CSR).

    Row ``n`` of ``dense`` has its non-zeros at
    ``columns/values[starts[n]:starts[n + 1]]``. Made by
    :meth:`Backend.sparse_rows`; :meth:`Backend.affine_forward` and
    :meth:`Backend.affine_backward` accept it wherever they accept a dense
    input, and a backend may then skip the zeros (MNIST is ~81 % zeros).

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> rows = fastgrad.get_backend("numpy").sparse_rows(np.array([[0.0, 0.5], [0.25, 0.0]]))
    >>> rows.starts.tolist(), rows.columns.tolist(), rows.values.tolist()
    ([0, 1, 2], [1, 0], [0.5, 0.25])
    """

    dense: Array
    starts: Array
    columns: Array
    values: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dense.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dense.dtype)


def check_activation(activation: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS`, else a clear ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _dense(X: Any) -> Any:
    return X.dense if isinstance(X, SparseRows) else X


class Backend:
    """One array library and the chapter's kernels written against it.

    Subclasses set :attr:`name`, :attr:`extra` and :attr:`array_family` and pass
    their namespace to ``__init__``. Everything below works for any NumPy-like
    ``xp``; overriding a kernel must not change its result beyond
    floating-point reassociation (the conformance suite checks this).

    Examples
    --------
    >>> import fastgrad
    >>> backend = fastgrad.get_backend("numpy")
    >>> float(backend.sigmoid(backend.asarray([0.0]))[0])
    0.5
    """

    name: ClassVar[str] = "abstract"
    #: The ``pip install 'fastgrad[...]'`` extra that brings this backend's package.
    extra: ClassVar[str | None] = None
    #: The kind of array the backend works on; arrays of another family are refused.
    array_family: ClassVar[str] = "numpy"

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp

    def __repr__(self) -> str:
        return f"<fastgrad backend {self.name!r}>"

    # ------------------------------------------------------------------ arrays
    def is_native(self, x: object) -> bool:
        """Whether ``x`` is already an array of this backend's type."""
        return isinstance(x, self.xp.ndarray)

    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """``x`` as this backend's array (no copy when it already is one)."""
        return self.xp.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a host NumPy array (a device-to-host copy on GPU backends)."""
        return np.asarray(x)

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = np.float64) -> Array:
        return self.xp.zeros(shape, dtype=dtype)

    def random_normal(
        self, shape: tuple[int, ...], scale: float, dtype: Any, rng: np.random.Generator
    ) -> Array:
        """Normal(0, scale) samples drawn on the host, then moved here once.

        Drawing on the host makes a seeded model start from the same weights on
        every backend, so results can be compared across backends.
        """
        host = (scale * rng.standard_normal(shape)).astype(dtype)
        return self.asarray(host)

    def synchronize(self) -> None:
        """Wait for queued device work; CPU backends have none."""

    def warmup(
        self, dtype: Any = np.float64, gradient: str = "backprop", network: Network | None = None
    ) -> float:
        """Compile ahead what a training run with ``gradient`` needs; returns seconds spent.

        ``gradient`` is ``"backprop"``, ``"numerical"`` or ``"all"``; with
        ``network``, a backend may compile only what that network's training
        needs. Backends without a compiler have nothing to do.
        """
        return 0.0

    def single_threaded_blas(self) -> contextlib.AbstractContextManager[object]:
        """A context in which the host BLAS runs one thread (needs threadpoolctl).

        The chapter's matrix products (batch 100, hidden 50) are too small to
        split: on two cores the idle OpenBLAS threads spin, and made the book's
        loop and the numerical gradients several times slower (PERF-NOTES).
        Whole-set evaluations should run outside it. GPU backends have no host
        BLAS to limit; without threadpoolctl nothing is limited.
        """
        if self.array_family != "numpy":
            return contextlib.nullcontext()
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return contextlib.nullcontext()
        return threadpool_limits(limits=1, user_api="blas")

    def describe(self) -> dict[str, str]:
        """Facts for ``fastgrad info``: library versions, device, threads."""
        return {"array library": f"{self.xp.__name__} {self.xp.__version__}"}

    # ------------------------------------------------------------- activations
    def sigmoid(self, X: Array) -> Array:
        xp = self.xp
        # exp(-|X|) never overflows, unlike the textbook 1 / (1 + exp(-X)) for
        # very negative X; the two forms agree to the last bit or so elsewhere.
        e = xp.exp(-xp.abs(X))
        positive = 1.0 / (1.0 + e)
        return xp.where(X >= 0, positive, e * positive)

    def sigmoid_grad(self, X: Array) -> Array:
        """Derivative of the sigmoid at the pre-activation ``X`` (book's name)."""
        s = self.sigmoid(X)
        return (1.0 - s) * s

    def relu(self, X: Array) -> Array:
        return self.xp.maximum(X, 0)

    def tanh(self, X: Array) -> Array:
        return self.xp.tanh(X)

    def identity(self, X: Array) -> Array:
        return X

    def softmax(self, X: Array) -> Array:
        """Softmax along the last axis, shifted by the row maximum against overflow."""
        xp = self.xp
        shifted = X - xp.max(X, axis=-1, keepdims=True)
        e = xp.exp(shifted)
        return e / xp.sum(e, axis=-1, keepdims=True)

    # ------------------------------------------------------------------ losses
    # Y is (N, C); T is either integer labels (N,) or dense targets (N, C).
    def mean_squared_error(self, Y: Array, T: Array) -> Array:
        return 0.5 * self.xp.sum((Y - T) ** 2)

    def cross_entropy_error(self, Y: Array, T: Array) -> Array:
        """The book's batch-averaged cross-entropy with its ``+1e-7`` guard."""
        xp = self.xp
        batch_size = Y.shape[0]
        if T.ndim == 1:
            picked = Y[xp.arange(batch_size), T]
            return -xp.sum(xp.log(picked + BOOK_LOG_GUARD)) / batch_size
        return -xp.sum(T * xp.log(Y + BOOK_LOG_GUARD)) / batch_size

    def log_softmax(self, logits: Array) -> Array:
        xp = self.xp
        shifted = logits - xp.max(logits, axis=-1, keepdims=True)
        return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))

    def softmax_cross_entropy(self, logits: Array, T: Array) -> Array:
        """Exact batch-mean cross-entropy of ``softmax(logits)``; no guard term."""
        xp = self.xp
        batch_size = logits.shape[0]
        log_p = self.log_softmax(logits)
        if T.ndim == 1:
            return -xp.sum(log_p[xp.arange(batch_size), T]) / batch_size
        return -xp.sum(T * log_p) / batch_size

    def softmax_cross_entropy_with_grad(self, logits: Array, T: Array) -> tuple[Array, Array]:
        """Loss and its gradient with respect to ``logits``, sharing one softmax."""
        xp = self.xp
        batch_size = logits.shape[0]
        log_p = self.log_softmax(logits)
        p = xp.exp(log_p)
        if T.ndim == 1:
            rows = xp.arange(batch_size)
            loss = -xp.sum(log_p[rows, T]) / batch_size
            dlogits = p
            dlogits[rows, T] -= 1.0
            return loss, dlogits / batch_size
        loss = -xp.sum(T * log_p) / batch_size
        # d/dz of -sum_c t_c log p_c is p * sum_c t_c - t: soft targets too.
        dlogits = p * xp.sum(T, axis=-1, keepdims=True) - T
        return loss, dlogits / batch_size

    # -------------------------------------------------------- layer primitives
    # Forward/backward pairs share their argument names: X is a layer's input,
    # Y its output, dY the loss gradient with respect to Y and dX with respect
    # to X. A network is these primitives composed (fastgrad.models), so every
    # depth and activation runs on every backend.
    def affine_forward(self, X: Array | SparseRows, W: Array, b: Array) -> Array:
        """``Y = X @ W + b``; ``X`` may be :class:`SparseRows` (a first layer's input)."""
        return _dense(X) @ W + b

    def affine_backward(
        self, dY: Array, X: Array | SparseRows, W: Array, need_dX: bool = True
    ) -> tuple[Array | None, Array, Array]:
        """``(dX, dW, db)`` of :meth:`affine_forward`; ``dX`` is None unless ``need_dX``.

        A first layer needs no ``dX`` (nothing lies below it), which saves the
        largest matrix product of its backward pass.
        """
        dX = dY @ W.T if need_dX else None
        return dX, _dense(X).T @ dY, dY.sum(axis=0)

    def activation_forward(self, X: Array, activation: str) -> Array:
        """``Y = activation(X)`` for one of :data:`ACTIVATIONS`."""
        return getattr(self, check_activation(activation))(X)

    def activation_backward(self, dY: Array, X: Array, Y: Array, activation: str) -> Array:
        """``dX`` of :meth:`activation_forward`, from its input ``X`` and output ``Y``.

        ReLU's derivative at exactly 0 is taken as 0 (the book's ``x <= 0`` mask).
        """
        kind = check_activation(activation)
        if kind == "sigmoid":
            return dY * (1.0 - Y) * Y
        if kind == "relu":
            return dY * (X > 0)
        if kind == "tanh":
            return dY * (1.0 - Y * Y)
        return dY

    def sgd_update(self, arrays: Sequence[Array], grads: Sequence[Array], lr: float) -> None:
        """``array -= lr * grad`` in place for each pair, in the array's own dtype."""
        for array, grad in zip(arrays, grads, strict=True):
            array -= (lr * grad).astype(array.dtype, copy=False)

    def sparse_rows(self, X: Array) -> SparseRows:
        """``X`` with the non-zeros of each row listed (CSR), for :meth:`affine_forward`."""
        xp = self.xp
        nonzero = X != 0
        starts = xp.zeros(X.shape[0] + 1, dtype=xp.intp)
        starts[1:] = xp.cumsum(nonzero.sum(axis=1))
        rows, columns = xp.nonzero(nonzero)
        return SparseRows(X, starts, columns.astype(xp.intp), X[rows, columns])

    def training_inputs(self, X: Array) -> Array | SparseRows:
        """``X`` in the form this backend's training steps read fastest, made once per run.

        The reference returns ``X`` itself; a backend whose kernels skip zero
        inputs returns :meth:`sparse_rows` of it, so that a loop calling the
        steps every epoch does not list the non-zeros again. The result is a
        snapshot of ``X``.
        """
        return X

    def fused_sgd_steps(
        self,
        network: Network,
        X: Array | SparseRows,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str,
    ) -> Array | None:
        """Many SGD steps of ``network`` in one call, or None where no fused path serves it.

        An override for the networks a backend has a whole-step kernel for
        (the Numba backend's chapter net); the model runs its own loop of
        primitives when this returns None. Arguments as
        :meth:`fastgrad.MultiLayerNet.sgd_steps`; updates the arrays of
        ``network`` in place and returns the ``(steps,)`` float64 batch losses.
        The conformance suite checks every override against the primitive loop.
        """
        return None

    def network_numerical_gradient(
        self, network: Network, X: Array | SparseRows, labels: Array, h: float
    ) -> list[tuple[Array, Array]]:
        """Central differences ``(L(θ + h·e_i) - L(θ - h·e_i)) / 2h`` of every parameter.

        The same differences as the book's per-element loop, without a whole
        forward pass per parameter. With ``A_l = H_{l-1} W_l + b_l`` (``H_0 =
        X``) and ``H_l = act(A_l)``:

        * moving ``W_l[i, j]`` by ``±h`` moves only column ``j`` of ``A_l``,
          by ``±h·H_{l-1}[n, i]``, and so only samples whose ``H_{l-1}[n, i]``
          is non-zero (most MNIST pixels are zero); moving ``b_l[j]`` moves
          the same column by ``±h`` in every sample;
        * from that column, layers ``l+1..L`` are recomputed exactly for the
          moved samples (the activation of the moved pre-activation is
          evaluated, so a ReLU whose input crosses zero within the step gives
          the naive loop's value): ``ΔH_l = act(A_l + δ) - H_l`` in column
          ``j``, then ``ΔA_{m+1} = (act(A_m + ΔA_m) - H_m) @ W_{m+1}``;
        * a sample whose logits move by ``d`` changes its loss by
          ``log(sum_c p_c·exp(d_c)) - d_label`` = ``log1p(sum_c p_c·expm1(d_c))
          - d_label``: the difference is formed from the small change itself,
          not lost to cancellation against the loss. Where some ``|d_c|``
          exceeds :data:`SMALL_LOGIT_SHIFT` (a large ``h``, inputs or
          weights), ``expm1`` could overflow and ``1 + sum`` cancel, and the
          same change is formed as ``logsumexp_c(log p_c + d_c) - d_label``
          instead, from the log-probabilities (never overflows, and keeps the
          classes whose ``p_c`` underflows), as exact as the naive loop.

        The weight-decay term ``0.5·λ·sum(W**2)`` has the central difference
        ``λ·W`` exactly, which is added. Everything runs in float64 (``h =
        1e-4`` is too coarse for float32); returns float64 ``(dW, db)`` per layer.
        """
        xp = self.xp
        f64 = np.float64
        weights = [xp.asarray(W, dtype=f64) for W in network.weights]
        biases = [xp.asarray(b, dtype=f64) for b in network.biases]
        X = xp.asarray(_dense(X), dtype=f64)
        batch_size, depth = X.shape[0], len(weights)
        inputs, pre = [X], []  # H_0..H_{L-1} and A_1..A_L, 0-indexed by layer
        for layer in range(depth):
            pre.append(inputs[layer] @ weights[layer] + biases[layer])
            if layer < depth - 1:
                inputs.append(self.activation_forward(pre[layer], network.activation))
        probabilities = self.softmax(pre[-1])
        log_probabilities = self.log_softmax(pre[-1])
        onehot = xp.zeros_like(probabilities)
        onehot[xp.arange(batch_size), labels] = 1.0

        def partition_changes(rows: Array, shift: Array) -> Array:
            """``log(sum_c p_c·exp(d_c))`` of sample ``rows[k]`` moved by ``d = shift[k]``.

            ``rows``: (K,), ``shift``: (K, C); returns (K,).
            """
            p = probabilities[rows]
            # Two whole-array reductions (no temporary) decide the usual case.
            if max(float(shift.max()), -float(shift.min())) <= SMALL_LOGIT_SHIFT:
                return xp.log1p(xp.sum(p * xp.expm1(shift), axis=-1))
            small = xp.max(xp.abs(shift), axis=-1) <= SMALL_LOGIT_SHIFT
            safe = xp.where(small[:, None], shift, 0.0)
            change = xp.log1p(xp.sum(p * xp.expm1(safe), axis=-1))
            large = xp.nonzero(~small)[0]
            change[large] = _log_sum_exp(xp, log_probabilities[rows[large]] + shift[large])
            return change

        def column_diffs(layer: int, samples: Array, step: Array) -> Array:
            """Loss changes when column j of A_layer[samples] moves by step, for every j.

            samples: (K,), step: (K, 1) signed shift; returns (K, width of layer).
            """
            if layer == depth - 1:
                p = probabilities[samples]
                if bool((xp.abs(step) <= SMALL_LOGIT_SHIFT).all()):
                    return xp.log1p(p * xp.expm1(step)) - step * onehot[samples]
                # Column j of the logits moves: shift (K·C, C), row (k, j) = step[k]·e_j.
                count, classes = p.shape
                units = xp.eye(classes, dtype=f64)
                shift = (step[:, :, None] * units[None, :, :]).reshape(count * classes, classes)
                moved = partition_changes(xp.repeat(samples, classes), shift)
                return moved.reshape(count, classes) - step * onehot[samples]
            moved = self.activation_forward(pre[layer][samples] + step, network.activation)
            change = moved - inputs[layer + 1][samples]  # (K, J)
            count, width = change.shape
            shift = (change[:, :, None] * weights[layer + 1][None, :, :]).reshape(count * width, -1)
            repeated = xp.repeat(samples, width)
            for later in range(layer + 1, depth - 1):
                moved = self.activation_forward(pre[later][repeated] + shift, network.activation)
                shift = (moved - inputs[later + 1][repeated]) @ weights[later + 1]
            change_of_loss = partition_changes(repeated, shift)
            change_of_loss -= xp.sum(shift * onehot[repeated], axis=-1)
            return change_of_loss.reshape(count, width)

        def central(layer: int, samples: Array, step: Array) -> Array:
            return column_diffs(layer, samples, step) - column_diffs(layer, samples, -step)

        scale = 1.0 / (2.0 * h * batch_size)
        all_samples = xp.arange(batch_size)
        result = []
        for layer in range(depth):
            width = weights[layer].shape[1]
            downstream = sum(int(W.shape[1]) for W in weights[layer + 1 :]) or 1
            per_chunk = self._rows_per_chunk(6 * width * downstream)
            grad_b = xp.zeros(width, dtype=f64)
            for start in range(0, batch_size, per_chunk):
                samples = all_samples[start : start + per_chunk]
                step = xp.full((samples.shape[0], 1), h)
                grad_b += central(layer, samples, step).sum(axis=0)
            below = inputs[layer]
            grad_W = xp.zeros_like(weights[layer])
            nonzero_per_feature = self.to_numpy((below != 0).sum(axis=0))
            for first, last in _chunk_bounds(nonzero_per_feature, per_chunk):
                block = below[:, first:last].T  # (F, N): entries come out grouped by feature
                feature, samples = xp.nonzero(block)
                if feature.shape[0] == 0:
                    continue
                diffs = central(layer, samples, h * block[feature, samples][:, None])
                # Sum entries per feature with a 0/1 matrix product: exact, and
                # available in every array namespace (unlike ufunc.at/reduceat).
                membership = (xp.arange(last - first)[:, None] == feature[None, :]).astype(f64)
                grad_W[first:last] = membership @ diffs
            grad_W *= scale
            if network.weight_decay:
                grad_W += network.weight_decay * weights[layer]
            result.append((grad_W, grad_b * scale))
        return result

    # ----------------------------------------------- black-box numerical gradients
    def numerical_gradient(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str
    ) -> Array:
        """The book's loop: perturb ``x`` in place one element at a time.

        ``x`` is restored after every element, and to the caller's values when
        ``f`` raises. An ``f`` that writes to ``x`` itself is an error
        (``RuntimeError``), not a gradient of a moving target: after every
        evaluation the perturbed element must still hold its perturbed value,
        and every ``ceil(x.size / 256)`` elements the whole of ``x`` is
        compared with a snapshot, so the comparisons cost at most 256 passes
        over ``x`` in all, next to the ``2 * x.size`` calls of ``f``. A
        difference quotient beyond ``x``'s dtype is a ``ValueError``.
        """
        xp = self.xp
        grad = xp.zeros(x.shape, dtype=x.dtype)
        snapshot = x.copy()
        size = int(np.prod(x.shape))
        every = -(-size // SNAPSHOT_COMPARES)
        largest = float(np.finfo(x.dtype).max)
        try:
            base_value = _scalar(f(x), "f(x)") if method == "forward" else 0.0
            if method == "forward":
                _check_unchanged(xp, x, snapshot, "f(x)")
            for count, index in enumerate(np.ndindex(*x.shape), start=1):
                original = x[index].copy()
                moved = original + h
                x[index] = moved
                plus = _scalar(f(x), "f(x + h)", index)
                if x[index] != moved:
                    _element_changed(x, index, moved, "f(x + h)")
                if method == "central":
                    moved = original - h
                    x[index] = moved
                    minus = _scalar(f(x), "f(x - h)", index)
                    if x[index] != moved:
                        _element_changed(x, index, moved, "f(x - h)")
                    slope = (plus - minus) / (2 * h)
                else:
                    slope = (plus - base_value) / h
                if not -largest <= slope <= largest:
                    _out_of_range(slope, index, x.dtype)
                grad[index] = slope
                x[index] = original
                if count % every == 0 or count == size:
                    _check_unchanged(xp, x, snapshot, f"f at x{list(index)}")
        except BaseException:
            x[...] = snapshot
            raise
        return grad

    def numerical_gradient_batched(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str, chunk_size: int | None
    ) -> Array:
        """Differences of a vectorised ``f``: ``f(stack)`` maps ``(k, *x.shape) -> (k,)``.

        Each chunk stacks ``k`` copies of ``x``, copy ``m`` moved by ``±h`` at
        element ``m``, so ``x`` itself is never written. The ``-h`` stack is
        rebuilt from ``x``, since ``f`` may have written to the ``+h`` one (its
        own argument), and ``x`` is compared with a snapshot after each chunk:
        an ``f`` that writes to ``x`` through a closure is a ``RuntimeError``.
        """
        xp = self.xp
        flat = x.reshape(-1)
        size = flat.shape[0]
        grad = xp.zeros(size, dtype=x.dtype)
        if size == 0:
            return grad.reshape(x.shape)
        if chunk_size is None:
            chunk_size = self._rows_per_chunk(max(1, size))
        snapshot = x.copy()
        base_value = None
        if method == "forward":
            base_value = _stack_values(f, flat[None, :].copy(), x.shape, 1)[0]
            _check_unchanged(xp, x, snapshot, "f")
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            count = stop - start
            rows = xp.arange(count)
            columns = xp.arange(start, stop)
            stack = xp.broadcast_to(flat, (count, size)).copy()
            stack[rows, columns] = flat[start:stop] + h
            plus = _stack_values(f, stack, x.shape, count, start)
            # Differences beyond x's dtype become inf here, refused by the caller.
            if method == "central":
                stack[...] = flat
                stack[rows, columns] = flat[start:stop] - h
                minus = _stack_values(f, stack, x.shape, count, start)
                with np.errstate(over="ignore"):
                    grad[start:stop] = (plus - minus) / (2 * h)
            else:
                with np.errstate(over="ignore"):
                    grad[start:stop] = (plus - base_value) / h
            _check_unchanged(xp, x, snapshot, f"f at elements {start}..{stop - 1}")
        return grad.reshape(x.shape)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _rows_per_chunk(floats_per_row: int) -> int:
        return max(1, CHUNK_BUDGET_BYTES // (8 * max(1, floats_per_row)))


def _log_sum_exp(xp: ModuleType, values: Array) -> Array:
    """``log(sum(exp(values)))`` along the last axis, shifted by the maximum (never overflows)."""
    top = xp.max(values, axis=-1, keepdims=True)
    return top[..., 0] + xp.log(xp.sum(xp.exp(values - top), axis=-1))


def _chunk_bounds(weights: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split ``range(len(weights))`` into runs whose weights sum to about ``budget``."""
    bounds = []
    first = 0
    total = 0
    for index, weight in enumerate(weights.tolist()):
        if total and total + weight > budget:
            bounds.append((first, index))
            first, total = index, 0
        total += weight
    if first < len(weights):
        bounds.append((first, len(weights)))
    return bounds


def _scalar(value: Any, what: str, index: tuple[int, ...] | None = None) -> float:
    """``value`` as a float, refusing arrays with more than one element, complex and non-finite.

    ``index`` (the perturbed element) is named in the error; it is formatted
    only then, since this runs once per evaluation of ``f``.
    """
    if isinstance(value, float):
        # Python floats and NumPy float64 scalars, the usual case: no further checks.
        result = float(value)
    else:
        if isinstance(value, complex) or getattr(getattr(value, "dtype", None), "kind", "") == "c":
            raise TypeError(
                f"{_at(what, index)} returned a complex value; f must return a real scalar"
            )
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{_at(what, index)} must return a scalar, got {type(value).__name__} "
                f"with shape {getattr(value, 'shape', '?')}"
            ) from None
    if not math.isfinite(result):
        if result != result:
            raise ValueError(
                f"{_at(what, index)} returned NaN; a gradient of NaN values is meaningless"
            )
        raise ValueError(
            f"{_at(what, index)} returned {result}; a gradient needs finite values of f"
        )
    return result


def _at(what: str, index: tuple[int, ...] | None) -> str:
    return what if index is None else f"{what} at index {list(index)}"


def _stack_values(
    f: Callable[[Array], Any],
    stack: Array,
    shape: tuple[int, ...],
    count: int,
    first: int | None = None,
) -> Array:
    """``f(stack)`` checked: shape ``(count,)``, real, finite; a copy, never a view of ``stack``.

    ``first`` is the flat index of the element the first row perturbs, for
    the error message.
    """
    values = f(stack.reshape((count, *shape)))
    if getattr(values, "shape", None) != (count,):
        raise _stack_length_error(count, shape, getattr(values, "shape", type(values).__name__))
    kind = getattr(getattr(values, "dtype", None), "kind", None)
    if kind == "c":
        raise TypeError("batched f returned complex values; it must return real numbers")
    if kind not in ("i", "u", "f"):
        raise TypeError(
            f"batched f must return an array of numbers, got {getattr(values, 'dtype', values)}"
        )
    # A comparison false for NaN and ±inf alike, with methods NumPy and CuPy share.
    finite = abs(values) <= float(np.finfo(values.dtype).max) if kind == "f" else values == values
    if not bool(finite.all()):
        row = int(finite.argmin())
        raise _stack_value_error(float(values[row]), None if first is None else first + row)
    # A copy: f may return a view of its argument, which the next stack overwrites.
    return values.copy()


def _stack_length_error(count: int, shape: tuple[int, ...], got: Any) -> ValueError:
    """The error of a batched ``f`` that returned ``got`` (a shape) for ``count`` rows."""
    return ValueError(
        f"batched f must map an array of shape {(count, *shape)} to shape ({count},), got {got}"
    )


def _stack_value_error(value: float, flat_index: int | None) -> ValueError:
    """The error of a batched ``f`` that returned the non-finite ``value``."""
    where = "" if flat_index is None else f" for the element at flat index {flat_index}"
    return ValueError(f"batched f returned {value}{where}; a gradient needs finite values of f")


def _out_of_range(slope: float, index: tuple[int, ...], dtype: Any) -> None:
    raise ValueError(
        f"the numerical gradient is {slope:.3g} at index {list(index)}, beyond the range of "
        f"{np.dtype(dtype).name}: its difference over 2h overflows; differentiate in float64"
    )


def _element_changed(x: Array, index: tuple[int, ...], moved: Any, what: str) -> None:
    """Raise: ``f`` left another value at the element the loop had perturbed to ``moved``."""
    if moved == moved:  # a NaN never equals itself; the loop's callers refuse NaN anyway
        raise _element_changed_error(what, index, float(x[index]), float(moved))


def _element_changed_error(
    what: str, index: tuple[int, ...], found: float, moved: float
) -> RuntimeError:
    """The error of an ``f`` that left ``found`` at the element perturbed to ``moved``."""
    return RuntimeError(
        f"{what} changed x: x{list(index)} holds {found} after the call, but "
        f"numerical_gradient had set it to {moved}; numerical_gradient perturbs x "
        "in place, so f must not write to it (copy inside f, or use batched=True)"
    )


def _x_changed_error(what: str, index: tuple[int, ...], now: float, before: float) -> RuntimeError:
    """The error of an ``f`` that changed element ``index`` of ``x`` from ``before`` to ``now``."""
    return RuntimeError(
        f"{what} changed x: x{list(index)} held {now} but {before} before numerical_gradient "
        "started; f must not write to the x being differentiated (copy inside f); x has been "
        "restored"
    )


def _check_unchanged(xp: ModuleType, x: Array, snapshot: Array, what: str) -> None:
    """Raise when ``x`` no longer equals the snapshot taken before the first call of ``f``."""
    if bool((x == snapshot).all()):
        return
    changed = (x != snapshot) & ~(xp.isnan(x) & xp.isnan(snapshot))
    if not bool(changed.any()):
        return  # only NaNs, which never equal themselves, and which f did not change
    index = tuple(int(i) for i in np.unravel_index(int(xp.argmax(changed.reshape(-1))), x.shape))
    now, before = float(x[index]), float(snapshot[index])
    x[...] = snapshot
    raise _x_changed_error(what, index, now, before)
