"""The CuPy backend, tested as far as a machine without a GPU allows, and on one.

Without a GPU (CI): every CUDA source is compiled by ``nvcc`` (when it is on
the PATH); each raw kernel's index arithmetic runs on CPU through its NumPy
transliteration in ``tests/cupy_emulation.py``, on grids smaller than the
problem; the backend's own code runs on NumPy arrays, once through ``xp``
alone and once with the emulated kernels in place of the compiled ones; and
the three errors (CuPy missing, no device, mixed arrays) are raised with fake
``cupy`` modules. With a GPU: the tests marked ``gpu`` run the real kernels
(and the shared conformance suite covers the rest through the ``backend``
fixture).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.machinery
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import fastgrad
from fastgrad import BackendUnavailableError
from fastgrad.backends import _cupy_kernels, backend_of, resolve_backend, unavailable_reason
from fastgrad.backends._base import PARAM_NAMES, Backend
from fastgrad.backends.cupy_ import CupyBackend
from fastgrad.backends.numpy_ import NumpyBackend
from tests import cupy_emulation, naive
from tests.conftest import backend_or_skip

REFERENCE = NumpyBackend()
FLOATS = [np.float32, np.float64]


def close(dtype: type) -> dict[str, float]:
    """Tolerances against the reference: summation order differs, formulas do not."""
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def sparse_inputs(rng: np.random.Generator, rows: int, inputs: int, zeros: float) -> np.ndarray:
    """MNIST-like inputs: values in [0, 1), a share ``zeros`` of them exactly zero."""
    X = rng.random((rows, inputs))
    X[rng.random((rows, inputs)) < zeros] = 0.0
    return X


def random_params(
    rng: np.random.Generator, inputs: int, hidden: int, classes: int, dtype: type = np.float64
) -> dict[str, np.ndarray]:
    # Weights large enough that the softmax is far from uniform and every
    # term of the numerical gradient matters.
    return {
        "W1": (0.5 * rng.standard_normal((inputs, hidden))).astype(dtype),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(dtype),
        "W2": (0.5 * rng.standard_normal((hidden, classes))).astype(dtype),
        "b2": (0.1 * rng.standard_normal(classes)).astype(dtype),
    }


# ===================================================================== 1. nvcc
def _nvcc_arch() -> str:
    """sm_90 (H100) when this nvcc supports it, else the newest it lists."""
    listed = subprocess.run(
        ["nvcc", "--list-gpu-arch"], capture_output=True, text=True, check=True
    ).stdout.split()
    numbers = sorted(int(m.group(1)) for a in listed if (m := re.fullmatch(r"compute_(\d+)", a)))
    if 90 in numbers or not numbers:
        return "sm_90"
    return f"sm_{numbers[-1]}"


@pytest.fixture(scope="module")
def nvcc_arch() -> str:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compiled here")
    return _nvcc_arch()


@pytest.mark.parametrize("name", sorted(_cupy_kernels.cuda_sources()))
def test_cuda_source_compiles_with_nvcc(name, nvcc_arch, tmp_path):
    source = _cupy_kernels.cuda_sources()[name]
    path = tmp_path / f"{name}.cu"
    path.write_text(source)
    cubin = tmp_path / f"{name}.cubin"
    command = [
        "nvcc", f"-arch={nvcc_arch}", "-cubin", "--std=c++14",
        "-Werror", "all-warnings", "-o", str(cubin), str(path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stderr}"
    # Every kernel the backend launches was compiled, not merely parsed.
    binary = cubin.read_bytes()
    if name in _cupy_kernels.RAW_KERNELS:
        kernel_names = {e.split("<")[0] for e in _cupy_kernels.RAW_KERNELS[name].instantiations}
    else:
        kernel_names = {f"fg_elementwise_{name}"}
    for kernel in kernel_names:
        assert kernel.encode() in binary, f"{kernel} missing from the compiled {name}"


def test_every_kernel_has_a_source_and_a_cpu_emulator():
    sources = _cupy_kernels.cuda_sources()
    assert set(sources) == set(_cupy_kernels.RAW_KERNELS) | set(_cupy_kernels.ELEMENTWISE_KERNELS)
    assert set(cupy_emulation.RAW_EMULATORS) == set(_cupy_kernels.RAW_KERNELS)
    for spec in _cupy_kernels.RAW_KERNELS.values():
        assert "#include" not in spec.source, "NVRTC has no host headers"


def test_kernel_module_examples():
    result = doctest.testmod(_cupy_kernels, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_kernel_modules_import_without_cupy():
    code = (
        "import sys, fastgrad, fastgrad.backends.cupy_, fastgrad.backends._cupy_kernels as k; "
        "k.cuda_sources(); sys.exit('cupy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grid_size_is_capped_and_positive():
    assert _cupy_kernels.grid_size(1, 256) == 1
    assert _cupy_kernels.grid_size(257, 256) == 2
    assert _cupy_kernels.grid_size(10**12, 1) == _cupy_kernels.MAX_GRID


# ========================================== 2. the kernels' index arithmetic, on CPU
def _launch(name: str, grid: int, block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
    cupy_emulation.RawKernel(cupy_emulation.RAW_EMULATORS[name])((grid,), block, args, shared_mem)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("grid,block", [(2, 64), (1, 32), (50, 256)], ids=str)
def test_softmax_xent_rows_indexing(dtype, with_bias, grid, block):
    # 37 rows over 4 warps (grid-stride over rows); 70 columns over 32 lanes
    # (three passes, the last one partial).
    rng = np.random.default_rng(1)
    rows, cols = 37, 70
    logits = (3 * rng.standard_normal((rows, cols))).astype(dtype)
    bias = (rng.standard_normal(cols)).astype(dtype) if with_bias else None
    labels = rng.integers(0, cols, rows).astype(np.int64)
    row_loss = np.full(rows, np.nan)
    dlogits = np.full_like(logits, np.nan)
    args = (logits, bias, labels, rows, cols, row_loss, dlogits, float(rows))
    _launch("softmax_xent_rows", grid, (block,), args)
    shifted = logits + bias if with_bias else logits
    loss, expected = REFERENCE.softmax_cross_entropy_with_grad(shifted.astype(dtype), labels)
    np.testing.assert_allclose(row_loss.mean(), loss, **close(dtype))
    np.testing.assert_allclose(dlogits, expected, **close(dtype))
    # Forward only: a null dlogits pointer.
    forward_loss = np.full(rows, np.nan)
    _launch("softmax_xent_rows", grid, (block,), (*args[:5], forward_loss, None, 1.0))
    np.testing.assert_array_equal(forward_loss, row_loss)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("grid,block", [(2, 8), (1, 1), (64, 256)], ids=str)
def test_sgd_update_two_layer_indexing(dtype, grid, block):
    # 7*5 + 5 + 5*3 + 3 = 58 elements over 16 threads: four grid-stride rounds,
    # each crossing from one parameter's segment into the next.
    rng = np.random.default_rng(2)
    params = random_params(rng, 7, 5, 3, dtype)
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
    W1, b1, W2, b2 = (params[n] for n in PARAM_NAMES)
    args = (
        W1, grad_W1, W1.size, b1, grad_hidden, b1.size,
        W2, grad_W2, W2.size, b2, grad_logits, b2.size, 4, lr,
    )  # fmt: skip
    _launch("sgd_update_two_layer", grid, (block,), args)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(params[name], expected[name], **close(dtype))


@pytest.fixture(scope="module")
def small_problem():
    """A net and batch whose numerical gradient crosses every tile boundary.

    12 inputs (+ the bias row) over 5 blocks; 40 hidden units over 32-wide
    tiles (one full, one partial); 70 samples over 32 or 64 threads; 7 classes;
    60 % zero inputs (the skip path), and the naive loop's answer to compare.
    """
    rng = np.random.default_rng(3)
    params = random_params(rng, 12, 40, 7)
    X = sparse_inputs(rng, 70, 12, zeros=0.6)
    labels = rng.integers(0, 7, 70).astype(np.int64)
    reference = REFERENCE.two_layer_numerical_gradient(params, X, labels, 1e-4)
    oracle = naive.two_layer_numerical_gradient(params, X, labels, 1e-4)
    pre = X @ params["W1"] + params["b1"]
    hidden = REFERENCE.sigmoid(pre)
    probs = REFERENCE.softmax(hidden @ params["W2"] + params["b2"])
    return types.SimpleNamespace(
        params=params, X=X, labels=labels, reference=reference, oracle=oracle,
        pre=pre, hidden=hidden, probs=probs,
    )  # fmt: skip


@pytest.mark.parametrize("grid,block", [(5, 32), (3, 64), (1000, 128)], ids=str)
def test_numgrad_output_layer_indexing(small_problem, grid, block):
    p = small_problem
    hidden_size, classes = p.params["W2"].shape
    rows = p.X.shape[0]
    h = 1e-4
    grad = np.full((hidden_size + 1, classes), np.nan)
    args = (
        p.hidden, p.probs, p.labels, rows, hidden_size, classes, h, 1 / (2 * h * rows), grad,
    )  # fmt: skip
    _launch("numgrad_output_layer", grid, (block,), args, shared_mem=(block // 32) * 8)
    np.testing.assert_allclose(grad[:hidden_size], p.reference["W2"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad[hidden_size], p.reference["b2"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad[:hidden_size], p.oracle["W2"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(grad[hidden_size], p.oracle["b2"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("grid,block", [(5, (32, 4)), (2, (32, 8)), (100, (16, 3))], ids=str)
def test_numgrad_hidden_layer_indexing(small_problem, grid, block):
    p = small_problem
    rows, inputs = p.X.shape
    hidden_size, classes = p.params["W2"].shape
    h = 1e-4
    grad = np.full((inputs + 1, hidden_size), np.nan)
    args = (
        p.X, p.pre, p.hidden, p.probs, p.params["W2"], p.labels,
        rows, inputs, hidden_size, classes, h, 1 / (2 * h * rows), grad,
    )  # fmt: skip
    _launch("numgrad_hidden_layer", grid, block, args, shared_mem=block[0] * block[1] * 8)
    np.testing.assert_allclose(grad[:inputs], p.reference["W1"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad[inputs], p.reference["b1"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad[:inputs], p.oracle["W1"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(grad[inputs], p.oracle["b1"], rtol=0, atol=1e-9)


def test_emulated_reductions_match_a_plain_sum():
    values = np.random.default_rng(4).standard_normal(256)
    assert cupy_emulation.block_sum(values, 8) == pytest.approx(values.sum(), abs=1e-12)
    lanes = values[:32]
    assert (cupy_emulation.warp_sum(lanes) == cupy_emulation.warp_sum(lanes)[0]).all()
    assert (cupy_emulation.warp_max(lanes) == lanes.max()).all()


def test_perturbed_stack_indexing():
    flat = np.arange(5.0)
    stack = np.empty((3, 5))
    cupy_emulation._perturbed_stack(flat, 5, 1, 0.5, stack)
    expected = np.tile(flat, (3, 1))
    expected[[0, 1, 2], [1, 2, 3]] += 0.5
    np.testing.assert_array_equal(stack, expected)


# ============================ 3. the backend's own code on CPU, with NumPy as xp
class HostCupyBackend(CupyBackend):
    """The CuPy backend with NumPy as its namespace and no custom kernels.

    Only the device hooks (moving data, device memory, sync) are replaced;
    every other line of ``CupyBackend`` runs as written, so anything it does
    outside ``xp`` (a CuPy-only call) fails here.
    """

    custom_kernels = False

    def __init__(self) -> None:
        Backend.__init__(self, np)

    def asarray(self, x, dtype=None):
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def synchronize(self) -> None:
        pass

    def _free_device_bytes(self) -> int:
        return 64 * 2**10  # small, so the black-box gradient runs in several chunks


class EmulatedCupyBackend(HostCupyBackend):
    """The CuPy backend's fused code path, with the CPU emulators as its kernels."""

    custom_kernels = True


@pytest.fixture
def emulated(monkeypatch):
    kernels = cupy_emulation.EmulatedKernels()
    monkeypatch.setattr(_cupy_kernels, "raw_kernel", kernels.raw_kernel)
    monkeypatch.setattr(_cupy_kernels, "elementwise_kernel", kernels.elementwise_kernel)
    backend = EmulatedCupyBackend()
    backend.kernels = kernels  # type: ignore[attr-defined]
    return backend


@pytest.fixture(params=["generic", "emulated"])
def host_cupy(request, monkeypatch):
    """The backend's code path through ``xp`` alone, then through the emulated kernels."""
    if request.param == "generic":
        return HostCupyBackend()
    return request.getfixturevalue("emulated")


def _training_setup(dtype, steps=3, batch=6):
    rng = np.random.default_rng(5)
    X = sparse_inputs(rng, 30, 10, zeros=0.5).astype(dtype)
    labels = rng.integers(0, 4, 30)
    batches = np.stack([rng.choice(30, batch, replace=False) for _ in range(steps)])
    return random_params(rng, 10, 6, 4, dtype), X, labels, batches


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("gradient", ["backprop", "numerical"])
def test_sgd_steps_on_host(host_cupy, dtype, gradient):
    params, X, labels, batches = _training_setup(dtype)
    expected = {k: v.copy() for k, v in params.items()}
    want = REFERENCE.two_layer_sgd_steps(expected, X, labels, batches, 0.5, gradient)
    losses = host_cupy.two_layer_sgd_steps(params, X, labels, batches, 0.5, gradient)
    assert losses.dtype == np.float64 and losses.shape == (3,)
    np.testing.assert_allclose(losses, want, **close(dtype))
    for name in PARAM_NAMES:
        assert params[name].dtype == dtype
        np.testing.assert_allclose(params[name], expected[name], **close(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_losses_and_gradients_on_host(host_cupy, dtype):
    params, X, labels, _ = _training_setup(dtype)
    np.testing.assert_allclose(
        host_cupy.two_layer_loss(params, X, labels),
        REFERENCE.two_layer_loss(params, X, labels),
        **close(dtype),
    )
    loss, grads = host_cupy.two_layer_gradient(params, X, labels)
    want_loss, want = REFERENCE.two_layer_gradient(params, X, labels)
    assert np.asarray(loss).dtype == dtype
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    for name in PARAM_NAMES:
        np.testing.assert_allclose(grads[name], want[name], **close(dtype))
    logits = X[:, :4]
    for T in (labels, np.eye(4, dtype=dtype)[labels]):
        np.testing.assert_allclose(
            host_cupy.softmax_cross_entropy(logits, T),
            REFERENCE.softmax_cross_entropy(logits, T),
            **close(dtype),
        )
        got = host_cupy.softmax_cross_entropy_with_grad(logits, T)
        expect = REFERENCE.softmax_cross_entropy_with_grad(logits, T)
        for a, b in zip(got, expect):
            np.testing.assert_allclose(a, b, **close(dtype))
    for kernel in ("sigmoid", "sigmoid_grad"):
        np.testing.assert_allclose(
            getattr(host_cupy, kernel)(X - 0.5), getattr(REFERENCE, kernel)(X - 0.5), **close(dtype)
        )


def test_fast_numerical_gradient_on_host(host_cupy, small_problem):
    p = small_problem
    grads = host_cupy.two_layer_numerical_gradient(p.params, p.X, p.labels, 1e-4)
    for name in PARAM_NAMES:
        assert grads[name].dtype == np.float64 and grads[name].shape == p.params[name].shape
        np.testing.assert_allclose(grads[name], p.oracle[name], rtol=0, atol=1e-9)
        np.testing.assert_allclose(grads[name], p.reference[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_batched_numerical_gradient_on_host(host_cupy, method, chunk_size):
    x = np.random.default_rng(6).standard_normal((9, 41))  # 369 elements

    def f(stack):
        return (np.sin(stack) * stack).sum(axis=(1, 2))

    got = host_cupy.numerical_gradient_batched(f, x.copy(), 1e-4, method, chunk_size)
    want = REFERENCE.numerical_gradient_batched(f, x.copy(), 1e-4, method, chunk_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_chunks_follow_free_device_memory():
    backend = HostCupyBackend()
    x = np.zeros(1000)
    # 64 KiB free, a quarter of it, 4 copies of 8000 bytes per row: 0 -> 1 row.
    assert backend._chunk_rows(x) == 1
    backend._free_device_bytes = lambda: 2**30  # type: ignore[method-assign]
    assert backend._chunk_rows(x) == 1000  # capped at one perturbation per element
    backend._free_device_bytes = lambda: 8 * 2**20  # type: ignore[method-assign]
    assert 1 < backend._chunk_rows(x) < 1000


def test_fused_path_really_ran_the_kernels(emulated):
    params, X, labels, batches = _training_setup(np.float64)
    emulated.two_layer_sgd_steps(params, X, labels, batches, 0.1)
    emulated.two_layer_numerical_gradient(params, X, labels, 1e-4)
    launched = {name: len(kernel.launches) for name, kernel in emulated.kernels.raw.items()}
    assert launched == {
        "softmax_xent_rows": 3,
        "sgd_update_two_layer": 3,
        "numgrad_output_layer": 1,
        "numgrad_hidden_layer": 1,
    }
    assert emulated.kernels.elementwise_calls["bias_sigmoid"] == 3
    _grid, block, shared = emulated.kernels.raw["numgrad_hidden_layer"].launches[0]
    assert block[:2] == _cupy_kernels.HIDDEN_TILE and shared == block[0] * block[1] * 8


def test_fused_path_falls_back_for_non_contiguous_params(emulated):
    params, X, labels, batches = _training_setup(np.float64)
    params["W1"] = np.asfortranarray(params["W1"])
    expected = {k: v.copy() for k, v in params.items()}
    REFERENCE.two_layer_sgd_steps(expected, X, labels, batches, 0.1)
    emulated.two_layer_sgd_steps(params, X, labels, batches, 0.1)
    assert "sgd_update_two_layer" not in emulated.kernels.raw
    np.testing.assert_allclose(params["W1"], expected["W1"], rtol=1e-12, atol=1e-14)


def test_sgd_steps_checks_its_arguments():
    backend = HostCupyBackend()
    params, X, labels, batches = _training_setup(np.float64)
    with pytest.raises(ValueError, match="gradient must be"):
        backend.two_layer_sgd_steps(params, X, labels, batches, 0.1, gradient="adam")


# ================================================================= 4. the errors
def _fake_cupy(get_device_count) -> types.ModuleType:
    fake = types.ModuleType("cupy")
    fake.__version__ = "99.0.0"  # type: ignore[attr-defined]
    fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    fake.cuda = types.SimpleNamespace(runtime=runtime)  # type: ignore[attr-defined]
    fake.ndarray = type("ndarray", (), {})  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def no_cached_cupy(monkeypatch):
    """The registry without a loaded cupy backend, restored afterwards."""
    from fastgrad import backends

    monkeypatch.setattr(
        backends, "_instances", {k: v for k, v in backends._instances.items() if k != "cupy"}
    )


def _raise(message):
    def get_device_count():
        raise RuntimeError(message)

    return get_device_count


def test_error_cupy_not_installed(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", None)  # find_spec now reports it missing
    reason = unavailable_reason("cupy")
    assert reason is not None and "not installed" in reason
    assert "pip install 'fastgrad[cuda12x]'" in reason and "cuda13x" in reason
    with pytest.raises(BackendUnavailableError, match=r"fastgrad\[cuda12x\]"):
        CupyBackend()


@pytest.mark.parametrize(
    "device_count",
    [lambda: 0, _raise("cudaErrorNoDevice: no CUDA-capable device is detected")],
    ids=["zero-devices", "cudaErrorNoDevice"],
)
def test_error_cupy_installed_but_no_device(monkeypatch, no_cached_cupy, device_count):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count))
    with pytest.raises(
        BackendUnavailableError, match=r"CuPy 99\.0\.0 is installed, but no CUDA device"
    ):
        CupyBackend()
    reason = unavailable_reason("cupy")
    assert reason is not None and "no CUDA device is visible" in reason
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        fastgrad.get_backend("cupy")


def test_error_cupy_installed_but_no_driver(monkeypatch, no_cached_cupy):
    message = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(_raise(message)))
    with pytest.raises(BackendUnavailableError) as caught:
        CupyBackend()
    text = str(caught.value)
    assert "installed, but it cannot talk to a CUDA driver" in text
    assert "InsufficientDriver" in text and "fastgrad[cuda13x]" in text


def test_error_real_cupy_without_device(no_cached_cupy):
    """Where CuPy is really installed on a machine with no usable GPU."""
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed; the fake-module tests cover this error")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        count = 0
    if count:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailableError, match=r"CuPy \S+ is installed, but"):
        CupyBackend()


def test_error_mixed_numpy_and_cupy_arrays(monkeypatch):
    fake = _fake_cupy(lambda: 1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    device_array = fake.ndarray()
    device_array.shape = (2,)
    with pytest.raises(TypeError, match="both NumPy and CuPy arrays"):
        backend_of(np.zeros(2), device_array)
    with pytest.raises(TypeError, match="cannot use CuPy"):
        resolve_backend("numpy", device_array)
    # The backend's device-only entry points refuse host arrays too.
    foreign = types.SimpleNamespace(shape=(30, 10))
    params, _, labels, batches = _training_setup(np.float64)
    with pytest.raises(TypeError, match="move it explicitly"):
        HostCupyBackend().two_layer_sgd_steps(params, foreign, labels, batches, 0.1)


def test_the_three_errors_are_distinct(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", None)
    missing = unavailable_reason("cupy")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    no_device = unavailable_reason("cupy")
    device_array = sys.modules["cupy"].ndarray()  # type: ignore[union-attr]
    device_array.shape = (1,)
    with pytest.raises(TypeError) as mixed:
        backend_of(np.zeros(1), device_array)
    assert len({missing, no_device, str(mixed.value)}) == 3


# ============================================================== 5. on a real GPU
@pytest.fixture(scope="module")
def gpu():
    """The real CuPy backend; skipped without CuPy and a device (failed if required)."""
    return backend_or_skip("cupy")


def _to_gpu(gpu, arrays):
    return {k: gpu.asarray(v) for k, v in arrays.items()}


@pytest.mark.gpu
def test_gpu_describe_and_warmup(gpu):
    facts = gpu.describe()
    assert {"device", "device memory", "cuda runtime", "cuda driver"} <= set(facts)
    assert facts["array library"].startswith("cupy ")
    for dtype in FLOATS:
        assert gpu.warmup(dtype) >= 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_sgd_steps_match_reference_without_sync(gpu, dtype):
    import cupyx

    rng = np.random.default_rng(7)
    params = random_params(rng, 784, 50, 10, dtype)
    X = sparse_inputs(rng, 1000, 784, zeros=0.81).astype(dtype)
    labels = rng.integers(0, 10, 1000)
    batches = np.stack([rng.choice(1000, 100, replace=False) for _ in range(20)])
    expected = {k: v.copy() for k, v in params.items()}
    want = REFERENCE.two_layer_sgd_steps(expected, X, labels, batches, 0.1)
    device_params = _to_gpu(gpu, params)
    X_d, labels_d, batches_d = (gpu.asarray(a) for a in (X, labels, batches))
    gpu.warmup(dtype)
    with cupyx.allow_synchronize(False):
        losses = gpu.two_layer_sgd_steps(device_params, X_d, labels_d, batches_d, 0.1)
    assert gpu.is_native(losses) and all(gpu.is_native(v) for v in device_params.values())
    np.testing.assert_allclose(gpu.to_numpy(losses), want, **close(dtype))
    for name in PARAM_NAMES:
        np.testing.assert_allclose(
            gpu.to_numpy(device_params[name]), expected[name], **close(dtype)
        )


@pytest.mark.gpu
def test_gpu_numerical_gradient_matches_naive_loop(gpu, small_problem):
    p = small_problem
    grads = gpu.two_layer_numerical_gradient(
        _to_gpu(gpu, p.params), gpu.asarray(p.X), gpu.asarray(p.labels), 1e-4
    )
    for name in PARAM_NAMES:
        np.testing.assert_allclose(gpu.to_numpy(grads[name]), p.oracle[name], rtol=0, atol=1e-9)


@pytest.mark.gpu
def test_gpu_numerical_gradient_of_the_chapter_net(gpu):
    rng = np.random.default_rng(8)
    params = random_params(rng, 784, 50, 10)
    X = sparse_inputs(rng, 100, 784, zeros=0.81)
    labels = rng.integers(0, 10, 100)
    want = REFERENCE.two_layer_numerical_gradient(params, X, labels, 1e-4)
    got = gpu.two_layer_numerical_gradient(
        _to_gpu(gpu, params), gpu.asarray(X), gpu.asarray(labels), 1e-4
    )
    for name in PARAM_NAMES:
        # GPU and host libm round exp differently in the last bit; the spec's bar
        # (1e-9 against the naive loop) is checked in the test above.
        np.testing.assert_allclose(gpu.to_numpy(got[name]), want[name], rtol=0, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_gpu_batched_numerical_gradient(gpu, chunk_size):
    x = np.random.default_rng(9).standard_normal((7, 11))

    def f(stack):
        return (stack**3).sum(axis=(1, 2))

    want = REFERENCE.numerical_gradient_batched(f, x, 1e-4, "central", chunk_size)
    got = gpu.numerical_gradient_batched(f, gpu.asarray(x), 1e-4, "central", chunk_size)
    np.testing.assert_allclose(gpu.to_numpy(got), want, rtol=0, atol=1e-9)


@pytest.mark.gpu
def test_gpu_refuses_host_arrays(gpu):
    net = fastgrad.TwoLayerNet(4, 3, 2, seed=0, backend=gpu)
    with pytest.raises(TypeError, match="cannot use NumPy"):
        net.loss(np.ones((2, 4)), np.array([0, 1]))
    with pytest.raises(TypeError, match="move it explicitly"):
        gpu.two_layer_sgd_steps(net.params, np.ones((2, 4)), gpu.asarray([0, 1]),
                                gpu.asarray([[0, 1]]), 0.1)  # fmt: skip


@pytest.mark.gpu
def test_gpu_refuses_arrays_of_another_device(gpu):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with cupy.cuda.Device(1):
        other = cupy.zeros(3)
    with pytest.raises(TypeError, match="lives on CUDA device 1"):
        gpu.asarray(other)
