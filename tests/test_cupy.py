"""The CuPy backend, tested as far as a machine without a GPU allows, and on one.

Without a GPU (CI): every CUDA C source (the elementwise kernels) is compiled
by ``nvcc`` when it is on the PATH; the backend's own code runs on NumPy
arrays through ``xp`` alone, under the models (``TwoLayerNet``,
``MultiLayerNet``) and against the NumPy reference and the loops of
``tests/naive.py``; and the errors (CuPy missing, no device, numba-cuda
missing, mixed arrays) are raised with fake modules. The numba.cuda kernels'
own source runs under Numba's CUDA simulator in ``tests/cuda_kernels/``
(started by ``tests/test_cuda_simulator.py``), which also reruns the host
tests here with those kernels launched. With a GPU: the tests marked ``gpu``
run the real kernels on CuPy arrays (and the shared conformance suite covers
the rest through the ``backend`` fixture).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.machinery
import itertools
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Sequence

import numpy as np
import pytest

import fastgrad
from fastgrad import BackendUnavailableError
from fastgrad.backends import backend_of, resolve_backend, unavailable_reason
from fastgrad.backends._base import ACTIVATIONS, Backend, Network
from fastgrad.backends.cupy import CupyBackend, kernels
from fastgrad.backends.numpy_ import NumpyBackend
from tests import naive
from tests.conftest import backend_or_skip

REFERENCE = NumpyBackend()
FLOATS = [np.float32, np.float64]
CHAPTER_NAMES = ("W1", "b1", "W2", "b2")


def close(dtype: type) -> dict[str, float]:
    """Tolerances against the reference: summation order differs, formulas do not."""
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def sparse_inputs(rng: np.random.Generator, rows: int, inputs: int, zeros: float) -> np.ndarray:
    """MNIST-like inputs: values in [0, 1), a share ``zeros`` of them exactly zero."""
    X = rng.random((rows, inputs))
    X[rng.random((rows, inputs)) < zeros] = 0.0
    return X


def random_params(
    rng: np.random.Generator, sizes: Sequence[int], dtype: type = np.float64
) -> dict[str, np.ndarray]:
    """``W1, b1, ..., WL, bL`` for layer widths ``sizes``, as host arrays.

    Weights large enough that the softmax is far from uniform and every term
    of the numerical gradient matters.
    """
    params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        params[f"W{layer}"] = (0.5 * rng.standard_normal((fan_in, fan_out))).astype(dtype)
        params[f"b{layer}"] = (0.1 * rng.standard_normal(fan_out)).astype(dtype)
    return params


def network_of(
    params: dict[str, object], activation: str = "sigmoid", weight_decay: float = 0.0
) -> Network:
    """``params`` (``W1, b1, ...``) as the kernels take them: the same arrays, no copies."""
    depth = len(params) // 2
    return Network(
        weights=tuple(params[f"W{layer}"] for layer in range(1, depth + 1)),
        biases=tuple(params[f"b{layer}"] for layer in range(1, depth + 1)),
        activation=activation,
        weight_decay=weight_decay,
    )


def by_name(pairs: Sequence[tuple[object, object]]) -> dict[str, object]:
    """``[(dW1, db1), ...]`` as ``{"W1": dW1, "b1": db1, ...}``."""
    grads = {}
    for layer, (dW, db) in enumerate(pairs, start=1):
        grads[f"W{layer}"], grads[f"b{layer}"] = dW, db
    return grads


def naive_numerical_gradient(params, X, labels, activation="sigmoid", weight_decay=0.0, h=1e-4):
    network = network_of(params)
    return by_name(
        naive.multilayer_numerical_gradient(
            network.weights, network.biases, X, labels, activation, weight_decay, h
        )
    )


def net_on(
    backend: Backend, params: dict[str, np.ndarray], activation="sigmoid", weight_decay=0.0
) -> fastgrad.MultiLayerNet:
    """A model on ``backend`` holding copies of ``params`` (in their memory layout).

    The chapter's net is a ``TwoLayerNet``, any other a ``MultiLayerNet``.
    """
    weights = network_of(params).weights
    sizes = [weights[0].shape[0], *(W.shape[1] for W in weights)]
    dtype = params["W1"].dtype
    if len(weights) == 2 and activation == "sigmoid" and not weight_decay:
        net: fastgrad.MultiLayerNet = fastgrad.TwoLayerNet(*sizes, dtype=dtype, backend=backend)
    else:
        net = fastgrad.MultiLayerNet(
            sizes[0],
            sizes[1:-1],
            sizes[-1],
            activation=activation,
            weight_decay_lambda=weight_decay,
            dtype=dtype,
            backend=backend,
        )
    net.params.update({k: backend.asarray(v.copy(order="K")) for k, v in params.items()})
    return net


def assert_params_close(net, expected_net, dtype) -> None:
    assert set(net.params) == set(expected_net.params)
    for name, array in net.params.items():
        assert array.dtype == dtype, name
        np.testing.assert_allclose(
            net.backend.to_numpy(array), expected_net.params[name], **close(dtype), err_msg=name
        )


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


@pytest.mark.parametrize("name", sorted(kernels.cuda_sources()))
def test_cuda_source_compiles_with_nvcc(name, nvcc_arch, tmp_path):
    source = kernels.cuda_sources()[name]
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
    kernel = f"fg_elementwise_{name}"
    assert kernel.encode() in cubin.read_bytes(), f"{kernel} missing from the compiled {name}"


def test_every_elementwise_kernel_has_a_source():
    sources = kernels.cuda_sources()
    assert set(sources) == set(kernels.ELEMENTWISE_KERNELS)
    for name, source in sources.items():
        assert "#include" not in source, f"{name}: NVRTC has no host headers"


def test_kernel_module_examples():
    result = doctest.testmod(kernels, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_kernel_modules_import_without_cupy_or_numba():
    # numba.cuda is imported by the first custom kernel, not by the backend's module.
    code = (
        "import sys, fastgrad, fastgrad.backends.cupy, fastgrad.backends.cupy.kernels as k; "
        "k.cuda_sources(); heavy = [m for m in ('cupy', 'numba') if m in sys.modules]; "
        "print(heavy); sys.exit(int(bool(heavy)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ============================ 3. the backend's own code on CPU, with NumPy as xp
class HostCupyBackend(CupyBackend):
    """The CuPy backend with NumPy as its namespace and no custom kernels.

    Only the device hooks (moving data, device memory, sync, the kernels'
    stream) are replaced; every other line of ``CupyBackend`` runs as
    written, so anything it does outside ``xp`` (a CuPy-only call) fails here.
    """

    custom_kernels = False
    elementwise_kernels = False

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

    def _kernel_stream(self) -> int:
        return 0  # the default stream: all the simulator has


@pytest.fixture
def host_cupy():
    """The backend's code path through ``xp`` alone.

    ``tests/cuda_kernels/test_simulated_backend.py`` reruns the tests that take this
    fixture with the numba.cuda kernels launched under the simulator.
    """
    return HostCupyBackend()


@pytest.fixture(scope="module")
def small_problem():
    """A net and batch whose numerical gradient crosses every tile boundary.

    5 inputs (+ the bias row); 34 hidden units over 32-wide tiles (one full,
    one partial); 70 samples; 5 classes; 60 % zero inputs (the skip path), and
    the naive loop's answer to compare (small enough for its pure-Python loops
    to take a few seconds).
    """
    rng = np.random.default_rng(3)
    params = random_params(rng, (5, 34, 5))
    X = sparse_inputs(rng, 70, 5, zeros=0.6)
    labels = rng.integers(0, 5, 70).astype(np.int64)
    network = network_of(params)
    reference = by_name(REFERENCE.network_numerical_gradient(network, X, labels, 1e-4))
    oracle = naive_numerical_gradient(params, X, labels)
    return types.SimpleNamespace(
        params=params, network=network, X=X, labels=labels, reference=reference, oracle=oracle
    )


def _training_setup(dtype, steps=3, batch=6):
    rng = np.random.default_rng(5)
    X = sparse_inputs(rng, 30, 10, zeros=0.5).astype(dtype)
    labels = rng.integers(0, 4, 30)
    batches = np.stack([rng.choice(30, batch, replace=False) for _ in range(steps)])
    return random_params(rng, (10, 6, 4), dtype), X, labels, batches


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("gradient", ["backprop", "numerical"])
def test_sgd_steps_on_host(host_cupy, dtype, gradient):
    params, X, labels, batches = _training_setup(dtype)
    net, expected = net_on(host_cupy, params), net_on(REFERENCE, params)
    want = expected.sgd_steps(X, labels, batches, 0.5, gradient)
    losses = net.sgd_steps(X, labels, batches, 0.5, gradient)
    assert losses.dtype == np.float64 and losses.shape == (3,)
    np.testing.assert_allclose(losses, want, **close(dtype))
    assert_params_close(net, expected, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_losses_and_gradients_on_host(host_cupy, dtype):
    params, X, labels, _ = _training_setup(dtype)
    net, expected = net_on(host_cupy, params), net_on(REFERENCE, params)
    np.testing.assert_allclose(net.loss(X, labels), expected.loss(X, labels), **close(dtype))
    loss, grads = net.prepared_gradient(X, labels)
    want_loss, want = expected.prepared_gradient(X, labels)
    assert np.asarray(loss).dtype == dtype
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    for name in CHAPTER_NAMES:
        assert grads[name].dtype == dtype
        np.testing.assert_allclose(grads[name], want[name], **close(dtype), err_msg=name)
    np.testing.assert_allclose(net.predict(X), expected.predict(X), **close(dtype))
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


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_primitives_on_host(host_cupy, dtype, activation):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((7, 33)).astype(dtype)
    X[0, :5] = 0.0  # ReLU's derivative at exactly 0 is 0
    dY = rng.standard_normal(X.shape).astype(dtype)
    Y = host_cupy.activation_forward(X, activation)
    assert Y.dtype == dtype
    np.testing.assert_allclose(Y, REFERENCE.activation_forward(X, activation), **close(dtype))
    untouched = dY.copy()
    dX = host_cupy.activation_backward(dY, X, Y, activation)
    np.testing.assert_array_equal(dY, untouched)  # the incoming gradient is not overwritten
    assert dX.dtype == dtype
    want = REFERENCE.activation_backward(dY, X, Y, activation)
    np.testing.assert_allclose(dX, want, **close(dtype))
    with pytest.raises(ValueError, match="activation must be one of"):
        host_cupy.activation_backward(dY, X, Y, "softplus")


@pytest.mark.parametrize("weight_decay", [0.0, 0.3], ids=["no-decay", "decay"])
def test_fast_numerical_gradient_on_host(host_cupy, small_problem, weight_decay):
    p = small_problem
    network = network_of(p.params, weight_decay=weight_decay)
    reference = by_name(REFERENCE.network_numerical_gradient(network, p.X, p.labels, 1e-4))
    for X in (p.X, host_cupy.sparse_rows(p.X)):
        grads = by_name(host_cupy.network_numerical_gradient(network, X, p.labels, 1e-4))
        for name, array in p.params.items():
            # the decay term's central difference is λ·W exactly
            oracle = p.oracle[name] + (weight_decay * array if name[0] == "W" else 0.0)
            assert grads[name].dtype == np.float64 and grads[name].shape == array.shape
            np.testing.assert_allclose(grads[name], oracle, rtol=0, atol=1e-9, err_msg=name)
            np.testing.assert_allclose(
                grads[name], reference[name], rtol=0, atol=1e-12, err_msg=name
            )


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["no-decay", "decay"])
def test_multilayer_relu_net_end_to_end_on_host(host_cupy, dtype, weight_decay):
    """Depth 3, ReLU: loss, gradients, numerical gradients and training, via the primitives."""
    rng = np.random.default_rng(10)
    params = random_params(rng, (7, 6, 5, 3), dtype)
    X = sparse_inputs(rng, 12, 7, zeros=0.5).astype(dtype)
    labels = rng.integers(0, 3, 12)
    batches = np.stack([rng.choice(12, 4, replace=False) for _ in range(3)])
    net = net_on(host_cupy, params, "relu", weight_decay)
    expected = net_on(REFERENCE, params, "relu", weight_decay)
    assert net.depth == 3 and net.activation == "relu"
    np.testing.assert_allclose(net.loss(X, labels), expected.loss(X, labels), **close(dtype))
    grads, want = net.gradient(X, labels), expected.gradient(X, labels)
    for name in params:
        assert grads[name].dtype == dtype
        np.testing.assert_allclose(grads[name], want[name], **close(dtype), err_msg=name)
    numerical = net.numerical_gradient_float64(*net.prepare(X, labels))
    want = expected.numerical_gradient_float64(*expected.prepare(X, labels))
    oracle = naive_numerical_gradient(params, X, labels, "relu", weight_decay)
    for name in params:
        np.testing.assert_allclose(numerical[name], want[name], rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(numerical[name], oracle[name], rtol=0, atol=1e-9, err_msg=name)
    assert net.numerical_gradient(X, labels)["W3"].dtype == dtype
    for gradient in ("backprop", "numerical"):
        losses = net.sgd_steps(X, labels, batches, 0.3, gradient)
        np.testing.assert_allclose(
            losses, expected.sgd_steps(X, labels, batches, 0.3, gradient), **close(dtype)
        )
        assert_params_close(net, expected, dtype)


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


def test_warmup_on_host(host_cupy):
    for dtype in FLOATS:
        assert host_cupy.warmup(dtype) >= 0.0


def test_primitives_dispatch_to_the_elementwise_kernels(monkeypatch):
    """Which CuPy kernel each primitive calls, with which arguments (values: the gpu tests)."""
    calls = []

    def recording_kernel(name):
        def launch(*args):
            calls.append((name, args))
            return name

        return launch

    monkeypatch.setattr(kernels, "elementwise_kernel", recording_kernel)
    backend = HostCupyBackend()
    backend.elementwise_kernels = True
    rng = np.random.default_rng(12)
    X, Y, dY = (rng.standard_normal((5, 40)) for _ in range(3))
    for activation in ("sigmoid", "relu", "tanh"):
        assert backend.activation_backward(dY, X, Y, activation) == f"{activation}_backward"
    # ReLU's derivative reads the layer's input; sigmoid's and tanh's its output.
    assert [args[1] is X for _, args in calls] == [False, True, False]
    assert all(args[0] is dY for _, args in calls)
    assert backend.activation_backward(dY, X, X, "identity") is dY
    W, grad = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    backend.sgd_update([W], [grad], 0.1)
    assert calls[-1][0] == "sgd_update" and calls[-1][1][2] is W
    assert backend.sigmoid(X) == "sigmoid" and backend.sigmoid_grad(X) == "sigmoid_grad"
    # Mixed dtypes (float64 numerical gradients of float32 parameters) run the
    # reference: the kernels bind one type T. So do integer arrays.
    count = len(calls)
    W32 = W.astype(np.float32)
    want32 = W32 - (0.1 * grad).astype(np.float32)
    backend.sgd_update([W32], [grad], 0.1)
    np.testing.assert_array_equal(W32, want32)
    backend.activation_backward(dY.astype(np.float32), X, X, "tanh")
    backend.sigmoid(np.arange(3))
    assert len(calls) == count


def test_sgd_steps_checks_its_arguments():
    params, X, labels, batches = _training_setup(np.float64)
    net = net_on(HostCupyBackend(), params)
    with pytest.raises(ValueError, match="gradient must be"):
        net.sgd_steps(X, labels, batches, 0.1, gradient="adam")


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


def test_error_numba_cuda_not_installed(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 1))
    monkeypatch.setitem(sys.modules, "numba_cuda", None)  # find_spec now reports it missing
    with pytest.raises(BackendUnavailableError, match="numba-cuda") as caught:
        CupyBackend()
    assert "pip install 'fastgrad[cuda12x]'" in str(caught.value)


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
    # The backend's device-only entry points refuse host arrays too: for the
    # data, the batch indices and the parameters, on the fused path or not.
    foreign = types.SimpleNamespace(shape=(30, 10))
    params, X, labels, batches = _training_setup(np.float64)
    backend = HostCupyBackend()
    network = network_of(params)
    for arguments in (
        (network, foreign, labels, batches),
        (network, X, labels, types.SimpleNamespace(shape=batches.shape)),
        (network_of({**params, "W2": foreign}, "relu"), X, labels, batches),
    ):
        with pytest.raises(TypeError, match=r"fused_sgd_steps: .* move it explicitly"):
            backend.fused_sgd_steps(*arguments, 0.1, "backprop")
    with pytest.raises(TypeError, match=r"network_numerical_gradient: .* move it explicitly"):
        backend.network_numerical_gradient(network, foreign, labels, 1e-4)
    with pytest.raises(TypeError, match=r"network_numerical_gradient: .* move it explicitly"):
        backend.network_numerical_gradient(network_of(params, "tanh"), X, foreign, 1e-4)


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


@pytest.mark.gpu
def test_gpu_describe_and_warmup(gpu):
    facts = gpu.describe()
    assert {"device", "device memory", "cuda runtime", "cuda driver"} <= set(facts)
    assert facts["array library"].startswith("cupy ")
    assert facts["custom kernels"].startswith("numba-cuda ")
    for dtype in FLOATS:
        assert gpu.warmup(dtype) >= 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_sgd_steps_match_reference_without_sync(gpu, dtype):
    import cupyx

    rng = np.random.default_rng(7)
    params = random_params(rng, (784, 50, 10), dtype)
    X = sparse_inputs(rng, 1000, 784, zeros=0.81).astype(dtype)
    labels = rng.integers(0, 10, 1000)
    batches = np.stack([rng.choice(1000, 100, replace=False) for _ in range(20)])
    expected = net_on(REFERENCE, params)
    want = expected.sgd_steps(X, labels, batches, 0.1)
    net = net_on(gpu, params)
    X_d, labels_d = net.prepare(gpu.asarray(X), gpu.asarray(labels))
    batches_d = gpu.asarray(batches)
    gpu.warmup(dtype)
    with cupyx.allow_synchronize(False):
        losses = gpu.fused_sgd_steps(net.network(), X_d, labels_d, batches_d, 0.1, "backprop")
    assert losses is not None, "the fused path must serve the chapter's net"
    assert gpu.is_native(losses) and all(gpu.is_native(v) for v in net.params.values())
    np.testing.assert_allclose(gpu.to_numpy(losses), want, **close(dtype))
    assert_params_close(net, expected, dtype)


@pytest.mark.gpu
def test_gpu_kernels_queue_on_cupys_current_stream(gpu):
    """On a non-blocking stream the numba.cuda launches must follow CuPy's own work there."""
    import cupy

    rng = np.random.default_rng(15)
    params = random_params(rng, (784, 50, 10))
    X = sparse_inputs(rng, 500, 784, zeros=0.81)
    labels = rng.integers(0, 10, 500)
    batches = np.stack([rng.choice(500, 100, replace=False) for _ in range(10)])
    expected = net_on(REFERENCE, params)
    want_losses = expected.sgd_steps(X, labels, batches, 0.1)
    want_gradient = expected.numerical_gradient_float64(X[:100], labels[:100])
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        net = net_on(gpu, params)
        X_d, labels_d = net.prepare(gpu.asarray(X), gpu.asarray(labels))
        losses = net.sgd_steps(X_d, labels_d, gpu.asarray(batches), 0.1)
        gradient = net.numerical_gradient_float64(X_d[:100], labels_d[:100])
    stream.synchronize()
    np.testing.assert_allclose(gpu.to_numpy(losses), want_losses, **close(np.float64))
    assert_params_close(net, expected, np.float64)
    for name in CHAPTER_NAMES:
        np.testing.assert_allclose(
            gpu.to_numpy(gradient[name]), want_gradient[name], rtol=0, atol=1e-11, err_msg=name
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_multilayer_relu_net_matches_reference(gpu, dtype):
    rng = np.random.default_rng(13)
    params = random_params(rng, (64, 40, 30, 10), dtype)
    X = sparse_inputs(rng, 200, 64, zeros=0.5).astype(dtype)
    labels = rng.integers(0, 10, 200)
    batches = np.stack([rng.choice(200, 50, replace=False) for _ in range(5)])
    net = net_on(gpu, params, "relu", 0.01)
    expected = net_on(REFERENCE, params, "relu", 0.01)
    X_d, labels_d = net.prepare(gpu.asarray(X), gpu.asarray(labels))
    np.testing.assert_allclose(net.loss(X_d, labels_d), expected.loss(X, labels), **close(dtype))
    numerical = net.numerical_gradient_float64(X_d[:20], labels_d[:20])
    want = expected.numerical_gradient_float64(X[:20], labels[:20])
    for name in params:
        np.testing.assert_allclose(
            gpu.to_numpy(numerical[name]), want[name], rtol=0, atol=1e-11, err_msg=name
        )
    for gradient in ("backprop", "numerical"):
        losses = net.sgd_steps(X_d, labels_d, gpu.asarray(batches), 0.1, gradient)
        want_losses = expected.sgd_steps(X, labels, batches, 0.1, gradient)
        np.testing.assert_allclose(gpu.to_numpy(losses), want_losses, **close(dtype))
        assert_params_close(net, expected, dtype)


def _network_on_gpu(gpu, params):
    return network_of({name: gpu.asarray(array) for name, array in params.items()})


@pytest.mark.gpu
def test_gpu_numerical_gradient_matches_naive_loop(gpu, small_problem):
    p = small_problem
    grads = by_name(
        gpu.network_numerical_gradient(
            _network_on_gpu(gpu, p.params), gpu.asarray(p.X), gpu.asarray(p.labels), 1e-4
        )
    )
    for name in CHAPTER_NAMES:
        np.testing.assert_allclose(gpu.to_numpy(grads[name]), p.oracle[name], rtol=0, atol=1e-9)


@pytest.mark.gpu
def test_gpu_numerical_gradient_of_the_chapter_net(gpu):
    rng = np.random.default_rng(8)
    params = random_params(rng, (784, 50, 10))
    X = sparse_inputs(rng, 100, 784, zeros=0.81)
    labels = rng.integers(0, 10, 100)
    want = by_name(REFERENCE.network_numerical_gradient(network_of(params), X, labels, 1e-4))
    got = by_name(
        gpu.network_numerical_gradient(
            _network_on_gpu(gpu, params), gpu.asarray(X), gpu.asarray(labels), 1e-4
        )
    )
    for name in CHAPTER_NAMES:
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
        gpu.fused_sgd_steps(net.network(), np.ones((2, 4)), gpu.asarray([0, 1]),
                            gpu.asarray([[0, 1]]), 0.1, "backprop")  # fmt: skip
    with pytest.raises(TypeError, match="move it explicitly"):
        gpu.network_numerical_gradient(net.network(), np.ones((2, 4)), gpu.asarray([0, 1]), 1e-4)


@pytest.mark.gpu
def test_gpu_refuses_arrays_of_another_device(gpu):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with cupy.cuda.Device(1):
        other = cupy.zeros(3)
    with pytest.raises(TypeError, match="lives on CUDA device 1"):
        gpu.asarray(other)
