"""The CuPy backend: the chapter's kernels on an NVIDIA GPU.

Everything the base class writes against ``xp`` already runs on CuPy; this
class overrides the hot paths with fused kernels from
:mod:`fastgrad.backends._cupy_kernels` and keeps data on the device: nothing
here copies between host and device or waits for the GPU unless the caller
asks for a value (:meth:`CupyBackend.to_numpy`, ``float(loss)``). Importing
this module does not import CuPy; creating the backend does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fastgrad.backends import _cupy_kernels as kernels
from fastgrad.backends._base import PARAM_NAMES, Array, Backend, Params, _stack_values
from fastgrad.errors import BackendUnavailableError

__all__ = ["CupyBackend"]

# Share of the free device memory one chunk of the black-box batched numerical
# gradient may fill with perturbed copies. The caller's function needs room
# for its own intermediates (often a few times the stack), hence a quarter.
FREE_MEMORY_SHARE = 0.25
# What a chunk row is assumed to cost relative to the stack itself: the stack,
# plus f's intermediates, which are unknown; four copies is a cautious guess.
STACK_COPIES_PER_ROW = 4

_FLOAT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _version(number: int) -> str:
    """CUDA's packed version (12040) as text ("12.4")."""
    return f"{number // 1000}.{(number % 1000) // 10}"


def _import_cupy() -> Any:
    """Import CuPy and check that it can reach a CUDA device.

    Raises
    ------
    BackendUnavailableError
        With distinct messages for: CuPy missing or failing to import; CuPy
        imported but the CUDA driver is missing or too old; driver present but
        no device.
    """
    try:
        import cupy
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend 'cupy' needs CuPy, which failed to import ({error}): "
            "pip install 'fastgrad[cuda12x]' (or 'fastgrad[cuda13x]' for CUDA 13)"
        ) from error
    version = getattr(cupy, "__version__", "?")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as error:  # CuPy reports a missing driver/library in several types
        text = str(error)
        if "NoDevice" in text or "no CUDA-capable device" in text:
            count = 0
        else:
            raise BackendUnavailableError(
                f"CuPy {version} is installed, but it cannot talk to a CUDA driver ({text}). "
                "This machine may have no NVIDIA GPU or driver (check nvidia-smi), or the "
                "driver is older than CuPy's CUDA: install the extra that matches the driver, "
                "'fastgrad[cuda12x]' for CUDA 12 or 'fastgrad[cuda13x]' for CUDA 13"
            ) from error
    if count == 0:
        raise BackendUnavailableError(
            f"CuPy {version} is installed, but no CUDA device is visible: this machine has "
            "no NVIDIA GPU, or CUDA_VISIBLE_DEVICES hides it; use backend 'numpy' or 'numba'"
        )
    return cupy


class CupyBackend(Backend):
    """Runs every kernel on the current CUDA device with CuPy.

    Parameters, data and gradients are CuPy arrays. :meth:`asarray` is the one
    explicit host-to-device move and :meth:`to_numpy` the way back; mixing
    NumPy and CuPy arrays in one call raises ``TypeError``.

    Examples
    --------
    Needs CuPy and a CUDA device, so not run by the doctests:

    >>> import numpy as np, fastgrad                      # doctest: +SKIP
    >>> gpu = fastgrad.get_backend("cupy")                # doctest: +SKIP
    >>> x = gpu.asarray(np.array([0.0, 2.0]))             # doctest: +SKIP
    >>> gpu.to_numpy(gpu.sigmoid(x)).round(4).tolist()    # doctest: +SKIP
    [0.5, 0.8808]
    """

    name = "cupy"
    extra = "cuda12x"
    array_family = "cupy"

    #: Whether the hot paths use the fused CUDA kernels. False runs the same
    #: methods through ``xp`` alone, which is how the tests check on a CPU that
    #: the generic code path is namespace-clean.
    custom_kernels: bool = True

    def __init__(self) -> None:
        super().__init__(_import_cupy())

    # ------------------------------------------------------------- device hooks
    # The only methods that call CuPy-specific API; a CPU stand-in overrides these.
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """``x`` on the current device: the explicit host-to-device move.

        A CuPy array on another device is refused rather than copied between
        devices behind the caller's back.
        """
        if self.is_native(x):
            current = self.xp.cuda.Device().id
            if x.device.id != current:
                raise TypeError(
                    f"array lives on CUDA device {x.device.id}, but the backend runs on device "
                    f"{current}; move it explicitly (with cupy.cuda.Device({current}): "
                    "cupy.asarray(x)) or switch devices"
                )
        return self.xp.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` copied to the host (waits for the work that produces it)."""
        return self.xp.asnumpy(x)

    def synchronize(self) -> None:
        """Wait until every kernel queued on the current device has finished."""
        self.xp.cuda.Device().synchronize()

    def _free_device_bytes(self) -> int:
        """Device memory a new allocation can use: free on the GPU plus held by the pool."""
        free, _total = self.xp.cuda.Device().mem_info
        return int(free) + int(self.xp.get_default_memory_pool().free_bytes())

    def describe(self) -> dict[str, str]:
        """GPU name, memory, compute capability, CUDA runtime/driver, CuPy version."""
        cupy = self.xp
        device = cupy.cuda.Device()
        properties = cupy.cuda.runtime.getDeviceProperties(device.id)
        gpu_name = properties["name"]
        if isinstance(gpu_name, bytes):
            gpu_name = gpu_name.decode()
        free, total = device.mem_info
        return {
            "array library": f"cupy {cupy.__version__}",
            "device": f"{gpu_name} (device {device.id}, compute capability "
            f"{device.compute_capability[:-1]}.{device.compute_capability[-1]})",
            "device memory": f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
            "cuda runtime": _version(cupy.cuda.runtime.runtimeGetVersion()),
            "cuda driver": _version(cupy.cuda.runtime.driverGetVersion()),
        }

    def warmup(self, dtype: Any = np.float64, gradient: str = "all") -> float:
        """Compile every kernel a training run uses for ``dtype``; returns seconds.

        Runs a tiny training step, a loss and a numerical gradient on the
        device, so NVRTC compilation, cuBLAS handle creation and the memory
        pool's first allocations happen here and not in a timed loop.
        ``gradient`` is accepted for the common interface: the kernels are few
        and small, so all of them are compiled whatever it says.
        """
        start = time.perf_counter()
        resolved = np.dtype(dtype)
        rng = np.random.default_rng(0)
        params = {
            "W1": self.random_normal((3, 4), 0.1, resolved, rng),
            "b1": self.zeros(4, dtype=resolved),
            "W2": self.random_normal((4, 2), 0.1, resolved, rng),
            "b2": self.zeros(2, dtype=resolved),
        }
        X = self.asarray(rng.random((5, 3)).astype(resolved))
        labels = self.asarray(np.array([0, 1, 0, 1, 1]))
        batches = self.asarray(np.array([[0, 1], [2, 3]]))
        self.two_layer_sgd_steps(params, X, labels, batches, 0.1)
        self.two_layer_sgd_steps(params, X, labels, batches, 0.1, gradient="numerical")
        self.softmax_cross_entropy(self.two_layer_logits(params, X), labels)
        self.sigmoid_grad(X)
        flat = self.asarray(np.zeros(3, dtype=resolved))
        self.numerical_gradient_batched(
            lambda stack: stack.sum(axis=1), flat, 1e-4, "central", None
        )
        self.synchronize()
        return time.perf_counter() - start

    # ---------------------------------------------------------------- helpers
    def _fused(self, *arrays: Array) -> str | None:
        """The C type for the fused kernels, or None when they do not apply."""
        if not self.custom_kernels:
            return None
        c_type = _FLOAT_TYPES.get(np.dtype(arrays[0].dtype))
        if c_type is None or any(array.dtype != arrays[0].dtype for array in arrays):
            return None
        return c_type

    def _require_native(self, what: str, *arrays: Any) -> None:
        """Refuse host arrays where device arrays are needed: never copy silently."""
        for array in arrays:
            if hasattr(array, "shape") and not self.is_native(array):
                raise TypeError(
                    f"{what}: got a {type(array).__module__}.{type(array).__name__} where a "
                    f"{self.xp.__name__} array is needed; move it explicitly with "
                    f"fastgrad.get_backend({self.name!r}).asarray(...) (once, outside loops)"
                )

    def _labels64(self, labels: Array) -> Array:
        return self.xp.ascontiguousarray(labels, dtype=np.int64)

    # ------------------------------------------------------------- activations
    def sigmoid(self, X: Array) -> Array:
        if self._fused(X) is None:
            return super().sigmoid(X)
        return kernels.elementwise_kernel("sigmoid")(X)

    def sigmoid_grad(self, X: Array) -> Array:
        if self._fused(X) is None:
            return super().sigmoid_grad(X)
        return kernels.elementwise_kernel("sigmoid_grad")(X)

    # ------------------------------------------------------------------ losses
    def _softmax_xent(
        self, logits: Array, bias: Array | None, labels: Array, divisor: float, want_grad: bool
    ) -> tuple[Array, Array | None]:
        """Per-row losses (float64) and, if asked, ``(softmax - onehot) / divisor``.

        ``bias`` is added to every row of ``logits`` inside the kernel.
        """
        xp = self.xp
        c_type = _FLOAT_TYPES[np.dtype(logits.dtype)]
        # The kernel reads through raw pointers: it needs C-contiguous buffers.
        logits = xp.ascontiguousarray(logits)
        if bias is not None:
            bias = xp.ascontiguousarray(bias)
        rows, cols = logits.shape
        row_loss = xp.empty(rows, dtype=np.float64)
        dlogits = xp.empty_like(logits) if want_grad else None
        warps_per_block = kernels.BLOCK // 32
        grid = kernels.grid_size(rows, warps_per_block)
        kernels.raw_kernel("softmax_xent_rows", c_type)(
            (grid,),
            (kernels.BLOCK,),
            (
                logits,
                bias,
                self._labels64(labels),
                np.int64(rows),
                np.int64(cols),
                row_loss,
                dlogits,
                np.float64(divisor),
            ),
        )
        return row_loss, dlogits

    def softmax_cross_entropy(self, logits: Array, T: Array) -> Array:
        if T.ndim != 1 or self._fused(logits) is None or logits.shape[0] == 0:
            return super().softmax_cross_entropy(logits, T)
        row_loss, _ = self._softmax_xent(logits, None, T, 1.0, want_grad=False)
        return (row_loss.sum() / logits.shape[0]).astype(logits.dtype)

    def softmax_cross_entropy_with_grad(self, logits: Array, T: Array) -> tuple[Array, Array]:
        if T.ndim != 1 or self._fused(logits) is None or logits.shape[0] == 0:
            return super().softmax_cross_entropy_with_grad(logits, T)
        batch_size = logits.shape[0]
        row_loss, dlogits = self._softmax_xent(logits, None, T, float(batch_size), want_grad=True)
        return (row_loss.sum() / batch_size).astype(logits.dtype), dlogits

    # -------------------------------------------------------------- two-layer net
    def _hidden(self, params: Params, X: Array) -> Array:
        """sigmoid(X @ W1 + b1): cuBLAS, then bias and sigmoid in one pass in place."""
        hidden = X @ params["W1"]
        kernels.elementwise_kernel("bias_sigmoid")(params["b1"], hidden)
        return hidden

    def two_layer_loss(self, params: Params, X: Array, labels: Array) -> Array:
        if self._fused(X, *params.values()) is None or X.shape[0] == 0:
            return super().two_layer_loss(params, X, labels)
        hidden = self._hidden(params, X)
        row_loss, _ = self._softmax_xent(
            hidden @ params["W2"], params["b2"], labels, 1.0, want_grad=False
        )
        return (row_loss.sum() / X.shape[0]).astype(X.dtype)

    def _fused_gradient(
        self, params: Params, X: Array, labels: Array
    ) -> tuple[Array, Array, Array, Array, Array]:
        """Forward and backward: (row losses, hidden grad, W1 grad, logits grad, W2 grad).

        The bias gradients are left as the column sums of the hidden and logits
        gradients, for the caller to form (or fuse into the update).
        """
        W2 = params["W2"]
        hidden = self._hidden(params, X)
        row_loss, dlogits = self._softmax_xent(
            hidden @ W2, params["b2"], labels, float(X.shape[0]), want_grad=True
        )
        dhidden = dlogits @ W2.T
        kernels.elementwise_kernel("sigmoid_backward")(hidden, dhidden)
        return row_loss, dhidden, X.T @ dhidden, dlogits, hidden.T @ dlogits

    def two_layer_gradient(self, params: Params, X: Array, labels: Array) -> tuple[Array, Params]:
        if self._fused(X, *params.values()) is None or X.shape[0] == 0:
            return super().two_layer_gradient(params, X, labels)
        row_loss, dhidden, grad_W1, dlogits, grad_W2 = self._fused_gradient(params, X, labels)
        grads = {
            "W1": grad_W1,
            "b1": dhidden.sum(axis=0),
            "W2": grad_W2,
            "b2": dlogits.sum(axis=0),
        }
        return (row_loss.sum() / X.shape[0]).astype(X.dtype), grads

    def _fused_sgd_step(self, params: Params, X: Array, labels: Array, lr: float) -> Array:
        """One fused step; returns the batch loss as a float64 device scalar."""
        row_loss, dhidden, grad_W1, dlogits, grad_W2 = self._fused_gradient(params, X, labels)
        W1, b1, W2, b2 = (params[name] for name in PARAM_NAMES)
        total = W1.size + b1.size + W2.size + b2.size
        kernels.raw_kernel("sgd_update_two_layer", _FLOAT_TYPES[np.dtype(X.dtype)])(
            (kernels.grid_size(total, kernels.BLOCK),),
            (kernels.BLOCK,),
            (
                W1, grad_W1, np.int64(W1.size),
                b1, dhidden, np.int64(b1.size),
                W2, grad_W2, np.int64(W2.size),
                b2, dlogits, np.int64(b2.size),
                np.int64(X.shape[0]),
                np.float64(lr),
            ),
        )  # fmt: skip
        return row_loss.sum() / X.shape[0]

    def _fusable_params(self, params: Params, X: Array) -> bool:
        """The fused update writes the parameters' memory directly: C-contiguous only."""
        return (
            self._fused(X, *params.values()) is not None
            and X.shape[0] > 0
            and all(params[name].flags.c_contiguous for name in PARAM_NAMES)
        )

    def two_layer_sgd_step(self, params: Params, X: Array, labels: Array, lr: float) -> Array:
        if not self._fusable_params(params, X):
            return super().two_layer_sgd_step(params, X, labels, lr)
        return self._fused_sgd_step(params, X, labels, lr).astype(X.dtype)

    def two_layer_sgd_steps(
        self,
        params: Params,
        X: Array,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str = "backprop",
    ) -> Array:
        """All steps on the device; see :meth:`Backend.two_layer_sgd_steps`.

        ``X``, ``labels`` and ``batch_indices`` must already be device arrays
        (moved once by the caller). Each step gathers its batch on the device,
        and each loss stays there: the loop queues kernels without a single
        host-device copy or synchronisation, and the ``(steps,)`` float64
        losses come back as a device array for the caller to fetch when it
        wants them.
        """
        if gradient not in ("backprop", "numerical"):
            raise ValueError(f"gradient must be 'backprop' or 'numerical', got {gradient!r}")
        self._require_native(
            "two_layer_sgd_steps", X, labels, batch_indices, *(params[n] for n in PARAM_NAMES)
        )
        xp = self.xp
        steps = batch_indices.shape[0]
        losses = xp.empty(steps, dtype=np.float64)
        fused = self._fusable_params(params, X)
        if fused:
            labels = self._labels64(labels)  # once, not per step inside the kernel call
        for step in range(steps):
            rows = batch_indices[step]  # a view: no copy, no sync
            X_batch = xp.take(X, rows, axis=0)
            labels_batch = xp.take(labels, rows)
            if gradient == "numerical":
                losses[step] = self.two_layer_loss(params, X_batch, labels_batch)
                grads = self.two_layer_numerical_gradient(params, X_batch, labels_batch, 1e-4)
                for name in PARAM_NAMES:
                    params[name] -= (lr * grads[name]).astype(params[name].dtype, copy=False)
            elif fused:
                losses[step] = self._fused_sgd_step(params, X_batch, labels_batch, lr)
            else:
                losses[step] = super().two_layer_sgd_step(params, X_batch, labels_batch, lr)
        return losses

    def two_layer_numerical_gradient(
        self, params: Params, X: Array, labels: Array, h: float
    ) -> Params:
        """The structure-aware central differences (see the base docstring), on the GPU.

        Two kernels evaluate every perturbed loss in parallel from the shared
        forward pass: one block per output-layer parameter (a reduction over
        samples), and one block per input pixel for the hidden layer, skipping
        zero pixels. Float64 throughout; nothing is copied to the host, so it
        can run inside a training loop without a synchronisation.
        """
        if not self.custom_kernels or X.shape[0] == 0:
            return super().two_layer_numerical_gradient(params, X, labels, h)
        xp = self.xp
        f64 = np.float64
        W1, b1, W2, b2 = (xp.ascontiguousarray(params[name], dtype=f64) for name in PARAM_NAMES)
        X64 = xp.ascontiguousarray(X, dtype=f64)
        labels64 = self._labels64(labels)
        rows, inputs = X64.shape
        hidden_size, classes = W2.shape
        pre = X64 @ W1 + b1
        hidden = self.sigmoid(pre)
        probabilities = self.softmax(hidden @ W2 + b2)
        scale = 1.0 / (2.0 * h * rows)

        # Row hidden_size of out_grad is b2 (a hidden unit fixed at 1).
        out_grad = xp.empty((hidden_size + 1, classes), dtype=f64)
        block = kernels.REDUCE_BLOCK
        kernels.raw_kernel("numgrad_output_layer")(
            (kernels.grid_size(out_grad.size, 1),),
            (block,),
            (
                hidden, probabilities, labels64,
                np.int64(rows), np.int64(hidden_size), np.int64(classes),
                f64(h), f64(scale), out_grad,
            ),
            shared_mem=(block // 32) * 8,
        )  # fmt: skip

        # Row `inputs` of in_grad is b1 (an input pixel fixed at 1).
        in_grad = xp.empty((inputs + 1, hidden_size), dtype=f64)
        tile_x, tile_y = kernels.HIDDEN_TILE
        kernels.raw_kernel("numgrad_hidden_layer")(
            (kernels.grid_size(inputs + 1, 1),),
            (tile_x, tile_y),
            (
                X64, pre, hidden, probabilities, W2, labels64,
                np.int64(rows), np.int64(inputs), np.int64(hidden_size), np.int64(classes),
                f64(h), f64(scale), in_grad,
            ),
            shared_mem=tile_x * tile_y * 8,
        )  # fmt: skip
        return {
            "W1": in_grad[:inputs],
            "b1": in_grad[inputs],
            "W2": out_grad[:hidden_size],
            "b2": out_grad[hidden_size],
        }

    # ----------------------------------------------- black-box numerical gradients
    def _chunk_rows(self, x: Array) -> int:
        """Perturbations per chunk: a share of the free device memory, at least 1."""
        row_bytes = max(1, x.size * x.dtype.itemsize * STACK_COPIES_PER_ROW)
        budget = int(self._free_device_bytes() * FREE_MEMORY_SHARE)
        return int(max(1, min(x.size, budget // row_bytes)))

    def numerical_gradient_batched(
        self, f: Callable[[Array], Any], x: Array, h: float, method: str, chunk_size: int | None
    ) -> Array:
        """The base contract, with chunks sized from free GPU memory.

        The perturbed stack of each chunk is written by one fused kernel
        (copy and perturbation in a single pass) instead of a broadcast copy
        and a scatter.
        """
        self._require_native("numerical_gradient_batched", x)
        if chunk_size is None:
            chunk_size = self._chunk_rows(x)
        if self._fused(x) is None:
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        xp = self.xp
        flat = xp.ascontiguousarray(x.reshape(-1))
        size = flat.shape[0]
        grad = xp.zeros(size, dtype=x.dtype)
        if size == 0:
            return grad.reshape(x.shape)
        perturb = kernels.elementwise_kernel("perturbed_stack")
        scalar = x.dtype.type
        base_value = None
        if method == "forward":
            base_value = _stack_values(f, flat[None, :], x.shape, 1)[0]
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            count = stop - start
            stack = xp.empty((count, size), dtype=x.dtype)
            perturb(flat, np.int64(size), np.int64(start), scalar(h), stack)
            plus = _stack_values(f, stack, x.shape, count)
            if method == "central":
                perturb(flat, np.int64(size), np.int64(start), scalar(-h), stack)
                minus = _stack_values(f, stack, x.shape, count)
                grad[start:stop] = (plus - minus) / (2 * h)
            else:
                grad[start:stop] = (plus - base_value) / h
        return grad.reshape(x.shape)
