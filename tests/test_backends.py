"""The registry: selection order, context-local choice, lazy imports, clear errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import fastgrad
from fastgrad import BackendUnavailableError
from fastgrad.backends import backend_of, known_backends, resolve_backend, unavailable_reason


def test_import_is_light():
    code = (
        "import sys, fastgrad; "
        "heavy = [m for m in ('numba', 'cupy', 'torch', 'matplotlib', 'jax') if m in sys.modules]; "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_numpy_is_always_available():
    assert fastgrad.available_backends()[0] == "numpy"
    assert set(fastgrad.available_backends()) <= set(known_backends())
    assert fastgrad.get_backend("numpy").name == "numpy"


def test_unavailable_backends_say_why_and_what_to_install():
    for name in known_backends():
        reason = unavailable_reason(name)
        if reason is None:
            continue
        assert name in reason.lower()
        if "not installed" in reason:
            assert "pip install 'fastgrad[" in reason
        with pytest.raises(BackendUnavailableError):
            fastgrad.get_backend(name)


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    from fastgrad import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "numba" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(
        backends, "_instances", {k: v for k, v in backends._instances.items() if k != "numba"}
    )
    with pytest.raises(
        BackendUnavailableError, match=r"needs the numba package.*fastgrad\[numba\]"
    ):
        fastgrad.get_backend("numba")
    with pytest.raises(BackendUnavailableError, match=r"fastgrad\[numba\]"):
        fastgrad.TwoLayerNet(3, 2, 2, backend="numba")


def test_use_backend_is_scoped_and_restores(monkeypatch):
    monkeypatch.delenv("FASTGRAD_BACKEND", raising=False)
    assert fastgrad.get_backend().name == "numpy"
    with fastgrad.use_backend("numpy") as chosen:
        assert chosen is fastgrad.get_backend()
        with pytest.raises(RuntimeError, match="inner"):
            with fastgrad.use_backend(fastgrad.get_backend("numpy")):
                raise RuntimeError("inner")
        assert fastgrad.get_backend() is chosen
    assert fastgrad.get_backend().name == "numpy"


def test_use_backend_is_thread_local(monkeypatch):
    from fastgrad import backends

    seen = {}
    # A sentinel backend that only this thread's context should see.
    sentinel = types.SimpleNamespace(name="sentinel")
    monkeypatch.setitem(backends._instances, "sentinel", sentinel)
    monkeypatch.setitem(backends._SPECS, "sentinel", backends._SPECS["numpy"])
    with fastgrad.use_backend("sentinel"):
        worker = threading.Thread(
            target=lambda: seen.setdefault("other", fastgrad.get_backend().name)
        )
        worker.start()
        worker.join()
        assert fastgrad.get_backend() is sentinel
    assert seen["other"] == "numpy"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTGRAD_BACKEND", "numpy")
    assert fastgrad.get_backend().name == "numpy"
    monkeypatch.setenv("FASTGRAD_BACKEND", "bogus")
    with pytest.raises(
        BackendUnavailableError, match="FASTGRAD_BACKEND='bogus' names an unknown backend"
    ):
        fastgrad.get_backend()
    with fastgrad.use_backend("numpy"):  # an explicit choice wins over the environment
        assert fastgrad.get_backend().name == "numpy"


def test_set_backend_validates_and_clears():
    with pytest.raises(BackendUnavailableError):
        fastgrad.set_backend("nope")
    fastgrad.set_backend("numpy")
    try:
        assert fastgrad.get_backend().name == "numpy"
    finally:
        fastgrad.set_backend(None)


def test_backend_argument_type_checked():
    with pytest.raises(TypeError, match="backend must be a name or a Backend"):
        fastgrad.get_backend(3)


class FakeDeviceArray:
    """Stands in for cupy.ndarray so the array-type rules can be tested on CPU."""

    def __init__(self, data):
        self.data = np.asarray(data)
        self.shape = self.data.shape
        self.dtype = self.data.dtype


def test_mixed_and_foreign_arrays_are_refused(monkeypatch):
    fake_cupy = types.SimpleNamespace(ndarray=FakeDeviceArray)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    device = FakeDeviceArray([1.0])
    assert backend_of(device) == "cupy"
    assert backend_of(np.ones(1), [1.0]) is None
    with pytest.raises(TypeError, match="both NumPy and CuPy arrays"):
        backend_of(device, np.ones(1))
    with pytest.raises(TypeError, match="backend 'numpy' cannot use CuPy"):
        resolve_backend("numpy", device)


def test_models_live_on_their_backend():
    net = fastgrad.TwoLayerNet(3, 2, 2, backend="numpy", seed=0)
    assert net.backend.name == "numpy"
    assert all(isinstance(p, np.ndarray) for p in net.params.values())
    same = fastgrad.TwoLayerNet(3, 2, 2, seed=0)
    for name in net.params:
        np.testing.assert_array_equal(net.params[name], same.params[name])


def test_describe_reports_facts():
    facts = fastgrad.get_backend("numpy").describe()
    assert facts["array library"].startswith("numpy ")
    assert "blas" in facts


def test_backend_packages_and_their_modules():
    import importlib.util

    for gone in ("numba_", "_numba_kernels", "_numba_math", "cupy_", "_cupy_kernels"):
        assert importlib.util.find_spec(f"fastgrad.backends.{gone}") is None, gone
    # The CuPy kernels' sources load without CuPy (they also run under a simulator).
    importlib.import_module("fastgrad.backends.cupy.kernels")
    if unavailable_reason("numba") is None:
        numba_backend = fastgrad.get_backend("numba")
        assert type(numba_backend).__module__ == "fastgrad.backends.numba"
        for name in (
            "chapter",
            "primitives",
            "numerical",
            "threads",
            "sync",
            "simd",
            "vector_math",
        ):
            importlib.import_module(f"fastgrad.backends.numba.{name}")
