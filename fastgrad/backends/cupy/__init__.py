"""The CuPy backend: the chapter's kernels on an NVIDIA GPU.

Everything the base class writes against ``xp`` already runs on CuPy; this
class overrides the hot paths with CuPy elementwise kernels
(:mod:`fastgrad.backends.cupy.kernels`) and numba.cuda kernels launched on
CuPy arrays (:mod:`fastgrad.backends.cupy.cuda_kernels`, whose own source CI
runs under Numba's CUDA simulator), and keeps data on the device: nothing
here copies between host and device or waits for the GPU unless the caller
asks for a value (:meth:`CupyBackend.to_numpy`, ``float(loss)``). Importing
this module imports neither CuPy nor Numba; creating the backend imports
CuPy, and the first custom kernel imports ``numba.cuda``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fastgrad.backends._base import (
    ACTIVATIONS,
    SMALL_LOGIT_SHIFT,
    Array,
    Backend,
    Network,
    SparseRows,
    _check_unchanged,
    _stack_values,
)
from fastgrad.backends.cupy import kernels
from fastgrad.errors import BackendUnavailableError

__all__ = ["CupyBackend"]

# Share of the free device memory one chunk of the black-box batched numerical
# gradient may fill with perturbed copies. The caller's function needs room
# for its own intermediates (often a few times the stack), hence a quarter.
FREE_MEMORY_SHARE = 0.25
# What a chunk row is assumed to cost relative to the stack itself: the stack,
# plus f's intermediates, which are unknown; four copies is a cautious guess.
STACK_COPIES_PER_ROW = 4

_FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
# The elementwise kernel of each activation's backward pass (identity has none to do).
_BACKWARD_KERNELS = {
    "sigmoid": "sigmoid_backward",
    "relu": "relu_backward",
    "tanh": "tanh_backward",
}


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


def _require_numba_cuda() -> None:
    """Refuse to start without numba-cuda, which compiles the custom kernels."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise BackendUnavailableError(
            "backend 'cupy' launches its custom kernels with numba-cuda, which is not "
            "installed: pip install 'fastgrad[cuda12x]' (or 'fastgrad[cuda13x]' for CUDA 13)"
        )


def _cuda_kernels() -> ModuleType:
    """The numba.cuda kernels, imported on first use (it imports ``numba.cuda``)."""
    from fastgrad.backends.cupy import cuda_kernels

    return cuda_kernels


@functools.cache
def _numba_stream(pointer: int) -> Any:
    """The numba view of the CUDA stream ``pointer``, made once per stream.

    CuPy's null stream has pointer 0 and is the legacy default stream; numba
    is handed it as ``cudaStreamLegacy`` (1), which names the same stream to
    the driver and is also DLPack's value for it, so the arrays' hand-over
    orders nothing extra.
    """
    from numba import cuda

    return cuda.external_stream(pointer or 1)


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

    #: Whether the hot paths launch the numba.cuda kernels (fused softmax
    #: cross-entropy, the fused two-layer update, the numerical gradients).
    custom_kernels: bool = True
    #: Whether the elementwise hot paths use CuPy ``ElementwiseKernel``\ s.
    #: With both False the methods run through ``xp`` alone, which is how the
    #: tests check on a CPU that the generic code path is namespace-clean; the
    #: simulator tests turn only this one off, since CuPy compiles these.
    elementwise_kernels: bool = True

    # Launch geometry of the numba.cuda kernels; the simulator tests shrink it
    # so that small problems still span several blocks.
    #: Threads per block of the one-dimensional kernels: 8 warps, enough to
    #: hide latency on any GPU since Kepler while leaving room for many
    #: resident blocks.
    block: int = 256
    #: Threads per block of the per-parameter reduction over samples.
    reduce_block: int = 128
    #: (x, y) block of the hidden-layer numerical gradient: x runs over hidden
    #: units and is one warp wide, so every warp shares one sample and one
    #: input pixel and the kernel's zero-pixel skip does not diverge.
    hidden_tile: tuple[int, int] = (32, 8)

    def __init__(self) -> None:
        super().__init__(_import_cupy())
        _require_numba_cuda()

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

    def _kernel_stream(self) -> Any:
        """The stream the numba.cuda kernels launch on: CuPy's current one.

        Launched there they queue behind the CuPy work that produces their
        inputs, with no synchronisation between the libraries.
        """
        return _numba_stream(int(self.xp.cuda.get_current_stream().ptr))

    def describe(self) -> dict[str, str]:
        """GPU name, memory, compute capability, CUDA runtime/driver, CuPy and numba-cuda."""
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
            "custom kernels": f"numba-cuda {importlib.metadata.version('numba-cuda')}",
        }

    def warmup(
        self, dtype: Any = np.float64, gradient: str = "all", network: Network | None = None
    ) -> float:
        """Compile every kernel a training run uses for ``dtype``; returns seconds.

        Runs a few fused training steps, a numerical-gradient step and each
        primitive of every activation on a tiny network on the device, so
        NVRTC and numba-cuda compilation (both cached on disk for the next
        process), cuBLAS handle creation and the memory pool's first
        allocations happen here and not in a timed loop. ``gradient`` and
        ``network`` are accepted for the common interface: the kernels are
        few and small, so all of them are compiled whatever they say.
        """
        start = time.perf_counter()
        resolved = np.dtype(dtype)
        rng = np.random.default_rng(0)
        network = Network(
            weights=(
                self.random_normal((3, 4), 0.1, resolved, rng),
                self.random_normal((4, 2), 0.1, resolved, rng),
            ),
            biases=(self.zeros(4, dtype=resolved), self.zeros(2, dtype=resolved)),
            activation="sigmoid",
        )
        X = self.asarray(rng.random((5, 3)).astype(resolved))
        labels = self.asarray(np.array([0, 1, 0, 1, 1]))
        batches = self.asarray(np.array([[0, 1], [2, 3]]))
        self.fused_sgd_steps(network, X, labels, batches, 0.1, "backprop")
        # A numerical-gradient step, as the model's loop runs it.
        pairs = self.network_numerical_gradient(network, X, labels, 1e-4)
        self.sgd_update(network.arrays, [grad for pair in pairs for grad in pair], 0.1)
        # The primitives of the loop that runs every other network.
        pre = self.affine_forward(X, network.weights[0], network.biases[0])
        for activation in ACTIVATIONS:
            Y = self.activation_forward(pre, activation)
            self.activation_backward(pre, pre, Y, activation)
        logits = self.affine_forward(self.sigmoid(pre), network.weights[1], network.biases[1])
        self.softmax_cross_entropy(logits, labels)
        self.softmax_cross_entropy_with_grad(logits, labels)
        self.sgd_update(network.arrays, [self.xp.zeros_like(a) for a in network.arrays], 0.1)
        self.sigmoid_grad(X)
        flat = self.asarray(np.zeros(3, dtype=resolved))
        self.numerical_gradient_batched(
            lambda stack: stack.sum(axis=1), flat, 1e-4, "central", None
        )
        self.synchronize()
        return time.perf_counter() - start

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _one_float_type(arrays: Sequence[Array]) -> bool:
        """Whether ``arrays`` share float32 or float64: the custom kernels bind one type."""
        dtype = np.dtype(arrays[0].dtype)
        return dtype in _FLOAT_TYPES and all(array.dtype == dtype for array in arrays)

    def _elementwise(self, *arrays: Array) -> bool:
        """Whether the CuPy elementwise kernels serve ``arrays``."""
        return self.elementwise_kernels and self._one_float_type(arrays)

    def _custom(self, *arrays: Array) -> bool:
        """Whether the numba.cuda kernels serve ``arrays``."""
        return self.custom_kernels and self._one_float_type(arrays)

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

    def _serves_chapter(self, network: Network, X: Array) -> bool:
        """Whether the fused chapter kernels serve ``network`` on ``X``.

        They serve one-hidden-layer sigmoid nets without weight decay whose
        arrays share one float dtype; the fused update writes the parameters'
        memory through flat views, so those must be C-contiguous.
        """
        if network.depth != 2 or network.activation != "sigmoid" or network.weight_decay:
            return False
        if X.ndim != 2 or not all(array.flags.c_contiguous for array in network.arrays):
            return False
        return self._custom(X, *network.arrays)

    # ------------------------------------------------------------- activations
    def sigmoid(self, X: Array) -> Array:
        if not self._elementwise(X):
            return super().sigmoid(X)
        return kernels.elementwise_kernel("sigmoid")(X)

    def sigmoid_grad(self, X: Array) -> Array:
        if not self._elementwise(X):
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
        # One compiled specialisation per dtype, for C-contiguous arrays.
        logits = xp.ascontiguousarray(logits)
        if bias is not None:
            bias = xp.ascontiguousarray(bias)
        row_loss = xp.empty(logits.shape[0], dtype=np.float64)
        dlogits = xp.empty_like(logits) if want_grad else None
        _cuda_kernels().softmax_xent_rows(
            logits,
            bias,
            self._labels64(labels),
            row_loss,
            dlogits,
            divisor,
            threads=self.block,
            stream=self._kernel_stream(),
        )
        return row_loss, dlogits

    def softmax_cross_entropy(self, logits: Array, T: Array) -> Array:
        if T.ndim != 1 or not self._custom(logits) or logits.shape[0] == 0:
            return super().softmax_cross_entropy(logits, T)
        row_loss, _ = self._softmax_xent(logits, None, T, 1.0, want_grad=False)
        return (row_loss.sum() / logits.shape[0]).astype(logits.dtype)

    def softmax_cross_entropy_with_grad(self, logits: Array, T: Array) -> tuple[Array, Array]:
        if T.ndim != 1 or not self._custom(logits) or logits.shape[0] == 0:
            return super().softmax_cross_entropy_with_grad(logits, T)
        batch_size = logits.shape[0]
        row_loss, dlogits = self._softmax_xent(logits, None, T, float(batch_size), want_grad=True)
        return (row_loss.sum() / batch_size).astype(logits.dtype), dlogits

    # -------------------------------------------------------- layer primitives
    # affine_forward/backward stay the reference's: cuBLAS products and one
    # reduction. The bias add cannot join the sigmoid here, since the loop
    # keeps both the pre-activation and the output; the fused path does it.
    def activation_backward(self, dY: Array, X: Array, Y: Array, activation: str) -> Array:
        """One elementwise kernel per activation (the reference's values); see the base."""
        kernel = _BACKWARD_KERNELS.get(activation)
        if kernel is None or not self._elementwise(dY, X, Y):
            return super().activation_backward(dY, X, Y, activation)
        # ReLU's derivative reads the layer's input; sigmoid's and tanh's its output.
        return kernels.elementwise_kernel(kernel)(dY, X if activation == "relu" else Y)

    def sgd_update(self, arrays: Sequence[Array], grads: Sequence[Array], lr: float) -> None:
        """``array -= lr * grad`` in place, one kernel per array of the gradient's dtype."""
        for array, grad in zip(arrays, grads, strict=True):
            if not self._elementwise(array, grad):
                super().sgd_update([array], [grad], lr)
            else:
                kernels.elementwise_kernel("sgd_update")(grad, array.dtype.type(lr), array)

    # --------------------------------------------------- the chapter's fused path
    def _fused_gradient(
        self, network: Network, X: Array, labels: Array
    ) -> tuple[Array, Array, Array, Array, Array]:
        """Forward and backward: (row losses, hidden grad, W1 grad, logits grad, W2 grad).

        The bias gradients are left as the column sums of the hidden and logits
        gradients, for the update kernel to form.
        """
        (W1, W2), (b1, b2) = network.weights, network.biases
        # sigmoid(X @ W1 + b1): cuBLAS, then bias and sigmoid in one pass in place.
        hidden = X @ W1
        if self._elementwise(b1, hidden):
            kernels.elementwise_kernel("bias_sigmoid")(b1, hidden)
        else:
            hidden = super().sigmoid(hidden + b1)
        row_loss, dlogits = self._softmax_xent(
            hidden @ W2, b2, labels, float(X.shape[0]), want_grad=True
        )
        dhidden = self.activation_backward(dlogits @ W2.T, hidden, hidden, "sigmoid")
        return row_loss, dhidden, X.T @ dhidden, dlogits, hidden.T @ dlogits

    def _fused_sgd_step(self, network: Network, X: Array, labels: Array, lr: float) -> Array:
        """One fused step; returns the batch loss as a float64 device scalar."""
        row_loss, dhidden, grad_W1, dlogits, grad_W2 = self._fused_gradient(network, X, labels)
        _cuda_kernels().sgd_update_two_layer(
            network.arrays,
            (grad_W1, dhidden, grad_W2, dlogits),
            lr,
            threads=self.block,
            stream=self._kernel_stream(),
        )
        return row_loss.sum() / X.shape[0]

    def fused_sgd_steps(
        self,
        network: Network,
        X: Array | SparseRows,
        labels: Array,
        batch_indices: Array,
        lr: float,
        gradient: str,
    ) -> Array | None:
        """Backprop steps of a one-hidden-layer sigmoid net on the device; else None.

        ``X``, ``labels``, ``batch_indices`` and the network's arrays must
        already be device arrays (moved once by the caller), for every
        network. Each step gathers its batch on the device; between its cuBLAS
        products, bias and sigmoid, softmax cross-entropy and its gradient,
        and the sigmoid's backward pass are one kernel each, and a last launch
        updates all four arrays in place with the bias gradients summed on
        the fly. Each loss stays on the device: the loop queues kernels
        without a single host-device copy or synchronisation. Returns the
        ``(steps,)`` float64 losses as a device array. Other networks
        (deeper, another activation, weight decay, mixed dtypes, parameters
        that are not C-contiguous), empty batches and ``gradient="numerical"``
        (whose cost is the numerical gradient, which the model's loop takes
        from :meth:`network_numerical_gradient` anyway) return None.
        """
        dense = X.dense if isinstance(X, SparseRows) else X
        self._require_native("fused_sgd_steps", dense, labels, batch_indices, *network.arrays)
        if (
            gradient != "backprop"
            or not self._serves_chapter(network, dense)
            or batch_indices.ndim != 2
            or batch_indices.shape[1] == 0
        ):
            return None
        xp = self.xp
        labels = self._labels64(labels)  # once, not per step inside the kernel call
        losses = xp.empty(batch_indices.shape[0], dtype=np.float64)
        for step in range(batch_indices.shape[0]):
            rows = batch_indices[step]  # a view: no copy, no sync
            X_batch = xp.take(dense, rows, axis=0)
            losses[step] = self._fused_sgd_step(network, X_batch, xp.take(labels, rows), lr)
        return losses

    def network_numerical_gradient(
        self, network: Network, X: Array | SparseRows, labels: Array, h: float
    ) -> list[tuple[Array, Array]]:
        """The structure-aware central differences (see the base docstring), on the GPU.

        For a one-hidden-layer sigmoid net, two kernels evaluate every
        perturbed loss in parallel from the shared forward pass: one block per
        output-layer parameter (a reduction over samples), and one block per
        input pixel for the hidden layer, skipping zero pixels; weight decay
        adds its exact difference ``λ·W``. Float64 throughout; nothing is
        copied to the host, so it can run inside a training loop without a
        synchronisation. Other networks, and steps ``h`` above
        ``SMALL_LOGIT_SHIFT``, run the reference kernel on the device: the
        kernels form each loss change with ``expm1``, which overflows once a
        logit moves by more than ~700 (the reference then sums the moved
        log-probabilities instead). A logit moves by at most ``h`` times
        ``max(1, |x| * |W2|)``; with ``h`` at most 1 an overflow needs inputs
        and weights far beyond a trained net's, and the models refuse the
        non-finite result that would follow.
        """
        dense = X.dense if isinstance(X, SparseRows) else X
        self._require_native("network_numerical_gradient", dense, labels, *network.arrays)
        if (
            not self.custom_kernels
            or network.depth != 2
            or network.activation != "sigmoid"
            or dense.shape[0] == 0
            or h > SMALL_LOGIT_SHIFT
        ):
            return super().network_numerical_gradient(network, X, labels, h)
        xp = self.xp
        f64 = np.float64
        W1, b1, W2, b2 = (xp.ascontiguousarray(array, dtype=f64) for array in network.arrays)
        X64 = xp.ascontiguousarray(dense, dtype=f64)
        labels64 = self._labels64(labels)
        rows, inputs = X64.shape
        hidden_size, classes = W2.shape
        pre = X64 @ W1 + b1
        hidden = self.sigmoid(pre)
        probabilities = self.softmax(hidden @ W2 + b2)
        scale = 1.0 / (2.0 * h * rows)

        cuda_kernels, stream = _cuda_kernels(), self._kernel_stream()
        # Row hidden_size of out_grad is b2 (a hidden unit fixed at 1).
        out_grad = xp.empty((hidden_size + 1, classes), dtype=f64)
        cuda_kernels.numgrad_output_layer(
            hidden, probabilities, labels64, h, scale, out_grad,
            threads=self.reduce_block, stream=stream,
        )  # fmt: skip
        # Row `inputs` of in_grad is b1 (an input pixel fixed at 1).
        in_grad = xp.empty((inputs + 1, hidden_size), dtype=f64)
        cuda_kernels.numgrad_hidden_layer(
            X64, pre, hidden, probabilities, W2, labels64, h, scale, in_grad,
            tile=self.hidden_tile, stream=stream,
        )  # fmt: skip
        grad_W1, grad_W2 = in_grad[:inputs], out_grad[:hidden_size]
        if network.weight_decay:
            # the central difference of 0.5·λ·W² is λ·W exactly
            grad_W1 += network.weight_decay * W1
            grad_W2 += network.weight_decay * W2
        return [(grad_W1, in_grad[inputs]), (grad_W2, out_grad[hidden_size])]

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
        if not self._elementwise(x):
            return super().numerical_gradient_batched(f, x, h, method, chunk_size)
        xp = self.xp
        flat = xp.ascontiguousarray(x.reshape(-1))
        size = flat.shape[0]
        grad = xp.zeros(size, dtype=x.dtype)
        if size == 0:
            return grad.reshape(x.shape)
        perturb = kernels.elementwise_kernel("perturbed_stack")
        scalar = x.dtype.type
        # as the base: an f that writes to x through a closure is an error
        snapshot = x.copy()
        base_value = None
        if method == "forward":
            # a copy: flat may be a view of x, which f may write through its argument
            base_value = _stack_values(f, flat[None, :].copy(), x.shape, 1)[0]
            _check_unchanged(xp, x, snapshot, "f")
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            count = stop - start
            stack = xp.empty((count, size), dtype=x.dtype)
            perturb(flat, np.int64(size), np.int64(start), scalar(h), stack)
            plus = _stack_values(f, stack, x.shape, count, start)
            if method == "central":
                perturb(flat, np.int64(size), np.int64(start), scalar(-h), stack)
                minus = _stack_values(f, stack, x.shape, count, start)
                grad[start:stop] = (plus - minus) / (2 * h)
            else:
                grad[start:stop] = (plus - base_value) / h
            _check_unchanged(xp, x, snapshot, f"f at elements {start}..{stop - 1}")
        return grad.reshape(x.shape)
