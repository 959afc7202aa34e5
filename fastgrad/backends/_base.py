"""The backend interface: every kernel of fastgrad, written once against ``xp``.

A backend is an array namespace (``numpy``, ``cupy``) plus the kernels the
chapter needs. The kernels here use only ``self.xp`` so that any NumPy-like
namespace runs them correctly; the Numba and CuPy backends subclass
:class:`Backend` and override only their hot paths (the Thinc pattern), calling
``super()`` for the rest.

Kernels trust their inputs: shapes, dtypes and label ranges are checked once
at the public API (``fastgrad.functions``, ``fastgrad.models``), never in the
hot path. Losses come back as backend scalars (not Python floats) so that a
GPU backend does not have to synchronise for a value nobody asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

Array = Any
"""An array of the backend's own type (``numpy.ndarray``, ``cupy.ndarray``)."""

Params = dict[str, Array]
"""TwoLayerNet parameters: ``W1 (D, H)``, ``b1 (H,)``, ``W2 (H, C)``, ``b2 (C,)``."""

PARAM_NAMES = ("W1", "b1", "W2", "b2")

# The book's guard against log(0) in cross_entropy_error; kept for its values.
BOOK_LOG_GUARD = 1e-7

# Upper bound on the scratch memory one chunk of a numerical-gradient kernel
# may take. Large enough that the chapter's net runs in a handful of chunks,
# small enough for a laptop or a busy GPU.
CHUNK_BUDGET_BYTES = 64 * 2**20


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

    def warmup(self, dtype: Any = np.float64, gradient: str = "backprop") -> float:
        """Compile ahead what a training run with ``gradient`` needs; returns seconds spent.

        ``gradient`` is ``"backprop"``, ``"numerical"`` or ``"all"``. Backends
        without a compiler have nothing to do.
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

    # -------------------------------------------------------------- two-layer net
    # params holds W1 (D, H), b1 (H,), W2 (H, C), b2 (C,); labels are (N,) ints.
    def two_layer_logits(self, params: Params, X: Array) -> Array:
        hidden = self.sigmoid(X @ params["W1"] + params["b1"])
        return hidden @ params["W2"] + params["b2"]

    def two_layer_loss(self, params: Params, X: Array, labels: Array) -> Array:
        return self.softmax_cross_entropy(self.two_layer_logits(params, X), labels)

    def two_layer_accuracy(self, params: Params, X: Array, labels: Array) -> Array:
        predicted = self.xp.argmax(self.two_layer_logits(params, X), axis=1)
        return self.xp.mean(predicted == labels)

    def two_layer_gradient(self, params: Params, X: Array, labels: Array) -> tuple[Array, Params]:
        """Backpropagation: the loss and the gradient of every parameter."""
        W2 = params["W2"]
        hidden = self.sigmoid(X @ params["W1"] + params["b1"])
        logits = hidden @ W2 + params["b2"]
        loss, dlogits = self.softmax_cross_entropy_with_grad(logits, labels)
        dhidden_pre = (dlogits @ W2.T) * hidden * (1.0 - hidden)
        grads = {
            "W1": X.T @ dhidden_pre,
            "b1": dhidden_pre.sum(axis=0),
            "W2": hidden.T @ dlogits,
            "b2": dlogits.sum(axis=0),
        }
        return loss, grads

    def two_layer_sgd_step(self, params: Params, X: Array, labels: Array, lr: float) -> Array:
        """One SGD iteration, updating ``params`` in place; returns the batch loss."""
        loss, grads = self.two_layer_gradient(params, X, labels)
        for name in PARAM_NAMES:
            params[name] -= lr * grads[name]
        return loss

    def training_inputs(self, X: Array) -> Any:
        """``X`` in the form ``two_layer_sgd_steps`` reads fastest, made once per training run.

        The reference returns ``X`` itself; the Numba backend lists its
        non-zeros once (``SparseRows``), so that a loop calling
        ``two_layer_sgd_steps`` every epoch does not redo that work. Pass the
        result as ``X`` to ``two_layer_sgd_steps`` only; it is a snapshot of
        ``X``.
        """
        return X

    def two_layer_sgd_steps(
        self,
        params: Params,
        X: Array,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str = "backprop",
    ) -> Array:
        """Run ``len(batch_indices)`` SGD steps; step ``s`` trains on rows ``batch_indices[s]``.

        ``X`` and ``labels`` are the whole training set on this backend and
        ``batch_indices`` an integer ``(steps, batch_size)`` array, so a backend
        can run many steps in one compiled call, or without leaving the device.
        ``gradient`` is ``"backprop"`` or ``"numerical"`` (the fast central
        differences). Updates ``params`` in place; returns the ``(steps,)``
        batch losses, each measured before its step's update.
        """
        losses = self.xp.empty(batch_indices.shape[0], dtype=np.float64)
        for step in range(batch_indices.shape[0]):
            rows = batch_indices[step]
            X_batch, labels_batch = X[rows], labels[rows]
            if gradient == "backprop":
                losses[step] = self.two_layer_sgd_step(params, X_batch, labels_batch, lr)
                continue
            losses[step] = self.two_layer_loss(params, X_batch, labels_batch)
            grads = self.two_layer_numerical_gradient(params, X_batch, labels_batch, 1e-4)
            for name in PARAM_NAMES:
                params[name] -= (lr * grads[name]).astype(params[name].dtype, copy=False)
        return losses

    def two_layer_numerical_gradient(
        self, params: Params, X: Array, labels: Array, h: float
    ) -> Params:
        """Central differences (L(θ + h·e_i) - L(θ - h·e_i)) / 2h for every parameter.

        The same quantity the book's per-element loop computes, without
        re-running the whole forward pass per parameter:

        * moving ``W2[j, k]`` or ``b2[k]`` shifts only logit column ``k``, by
          ``±h·z[:, j]`` (or ``±h``);
        * moving ``W1[i, j]`` or ``b1[j]`` changes only hidden unit ``j``, and
          only for samples whose input ``x[n, i]`` is non-zero (most MNIST
          pixels are zero).

        For a sample whose logits move by ``d``, its loss moves by
        ``log(sum_c p_c·exp(d_c)) - d_label`` = ``log1p(sum_c p_c·expm1(d_c)) -
        d_label``: the loss *difference* is formed directly from the small
        change, so it is not lost to cancellation against the loss itself.
        Everything runs in float64 whatever the parameters' dtype (h = 1e-4 is
        too coarse for float32); the result comes back in float64.
        """
        xp = self.xp
        f64 = np.float64
        W1, b1, W2, b2 = (xp.asarray(params[name], dtype=f64) for name in PARAM_NAMES)
        X = xp.asarray(X, dtype=f64)
        batch_size = X.shape[0]
        pre_hidden = X @ W1 + b1
        hidden = self.sigmoid(pre_hidden)
        probabilities = self.softmax(hidden @ W2 + b2)
        label_weights = W2[:, labels].T  # (N, H): W2[j, label_n]
        label_onehot = xp.zeros_like(probabilities)
        label_onehot[xp.arange(batch_size), labels] = 1.0
        scale = 1.0 / (2.0 * h * batch_size)

        def output_layer_diff(step: Array) -> Array:
            # step: (N, J) logit shifts for column k of every (j, k); -> (J, C) sums
            up = xp.log1p(probabilities[:, None, :] * xp.expm1(step[:, :, None]))
            down = xp.log1p(probabilities[:, None, :] * xp.expm1(-step[:, :, None]))
            diff = up - down - 2.0 * step[:, :, None] * label_onehot[:, None, :]
            return diff.sum(axis=0)

        grad_W2 = xp.empty_like(W2)
        rows_per_chunk = self._rows_per_chunk(batch_size * W2.shape[1] * 4)
        for start in range(0, W2.shape[0], rows_per_chunk):
            stop = min(start + rows_per_chunk, W2.shape[0])
            grad_W2[start:stop] = output_layer_diff(h * hidden[:, start:stop])
        grad_b2 = output_layer_diff(xp.full((batch_size, 1), h))[0]

        def hidden_layer_diff(samples: Array, step: Array) -> Array:
            # samples: (E,) sample of each entry; step: (E, 1) or (E, H) input shift
            base_pre = pre_hidden[samples]
            base_hidden = hidden[samples]
            p = probabilities[samples][:, None, :]
            out = []
            for sign in (1.0, -1.0):
                change = self.sigmoid(base_pre + sign * step) - base_hidden  # (E, H)
                logit_shift = change[:, :, None] * W2[None, :, :]  # (E, H, C)
                moved = xp.log1p(xp.sum(p * xp.expm1(logit_shift), axis=-1))
                out.append(moved - change * label_weights[samples])
            return out[0] - out[1]

        hidden_size = W1.shape[1]
        entry_cost = hidden_size * W2.shape[1] * 6
        grad_b1 = xp.zeros_like(b1)
        all_samples = xp.arange(batch_size)
        per_chunk = self._rows_per_chunk(entry_cost)
        for start in range(0, batch_size, per_chunk):
            samples = all_samples[start : start + per_chunk]
            grad_b1 += hidden_layer_diff(samples, xp.full((samples.shape[0], 1), h)).sum(axis=0)

        grad_W1 = xp.zeros_like(W1)
        nonzero_per_feature = self.to_numpy((X != 0).sum(axis=0))
        for first, last in _chunk_bounds(nonzero_per_feature, self._rows_per_chunk(entry_cost)):
            block = X[:, first:last].T  # (F, N): entries come out grouped by feature
            feature, samples = xp.nonzero(block)
            if feature.shape[0] == 0:
                continue
            diff = hidden_layer_diff(samples, h * block[feature, samples][:, None])
            # Sum entries per feature with a 0/1 matrix product: exact, and
            # available in every array namespace (unlike ufunc.at/reduceat).
            membership = (xp.arange(last - first)[:, None] == feature[None, :]).astype(f64)
            grad_W1[first:last] = membership @ diff

        return {
            "W1": grad_W1 * scale,
            "b1": grad_b1 * scale,
            "W2": grad_W2 * scale,
            "b2": grad_b2 * scale,
        }

    # ----------------------------------------------- black-box numerical gradients
    def numerical_gradient(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str
    ) -> Array:
        """The book's loop: perturb ``x`` in place one element at a time.

        ``x`` is restored after every element, and also when ``f`` raises.
        """
        xp = self.xp
        grad = xp.zeros(x.shape, dtype=x.dtype)
        base_value = _scalar(f(x), "f(x)") if method == "forward" else 0.0
        for index in np.ndindex(*x.shape):
            original = x[index].copy()
            try:
                x[index] = original + h
                plus = _scalar(f(x), "f(x + h)")
                if method == "central":
                    x[index] = original - h
                    minus = _scalar(f(x), "f(x - h)")
                    grad[index] = (plus - minus) / (2 * h)
                else:
                    grad[index] = (plus - base_value) / h
            finally:
                x[index] = original
        return grad

    def numerical_gradient_batched(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str, chunk_size: int | None
    ) -> Array:
        """Differences of a vectorised ``f``: ``f(stack)`` maps ``(k, *x.shape) -> (k,)``.

        Each chunk stacks ``k`` copies of ``x``, copy ``m`` moved by ``±h`` at
        element ``m``, so ``x`` itself is never written.
        """
        xp = self.xp
        flat = x.reshape(-1)
        size = flat.shape[0]
        grad = xp.zeros(size, dtype=x.dtype)
        if size == 0:
            return grad.reshape(x.shape)
        if chunk_size is None:
            chunk_size = self._rows_per_chunk(max(1, size))
        base_value = None
        if method == "forward":
            base_value = _stack_values(f, flat[None, :], x.shape, 1)[0]
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            count = stop - start
            rows = xp.arange(count)
            columns = xp.arange(start, stop)
            stack = xp.broadcast_to(flat, (count, size)).copy()
            stack[rows, columns] = flat[start:stop] + h
            plus = _stack_values(f, stack, x.shape, count)
            if method == "central":
                stack[rows, columns] = flat[start:stop] - h
                minus = _stack_values(f, stack, x.shape, count)
                grad[start:stop] = (plus - minus) / (2 * h)
            else:
                grad[start:stop] = (plus - base_value) / h
        return grad.reshape(x.shape)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _rows_per_chunk(floats_per_row: int) -> int:
        return max(1, CHUNK_BUDGET_BYTES // (8 * max(1, floats_per_row)))


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


def _scalar(value: Any, what: str) -> float:
    """``value`` as a float, refusing arrays with more than one element and NaN."""
    try:
        result = float(value)
    except TypeError:
        raise TypeError(
            f"{what} must return a scalar, got {type(value).__name__} "
            f"with shape {getattr(value, 'shape', '?')}"
        ) from None
    if result != result:
        raise ValueError(f"{what} returned NaN; a gradient of NaN values is meaningless")
    return result


def _stack_values(
    f: Callable[[Array], Any], stack: Array, shape: tuple[int, ...], count: int
) -> Array:
    values = f(stack.reshape((count, *shape)))
    if getattr(values, "shape", None) != (count,):
        raise ValueError(
            f"batched f must map an array of shape {(count, *shape)} to shape ({count},), "
            f"got {getattr(values, 'shape', type(values).__name__)}"
        )
    return values
