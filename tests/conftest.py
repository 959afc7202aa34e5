"""The backend fixture every conformance test runs under.

Tests that take ``backend`` run once per backend (ids ``numpy``, ``numba``,
``cupy``). A backend that cannot run here is skipped with the reason the
registry gives; ``FASTGRAD_REQUIRE_BACKENDS=numba,cupy`` turns those skips
into failures, so a machine that should have a backend cannot lose it quietly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastgrad
from fastgrad.backends import unavailable_reason

BACKEND_MARKS = {"numpy": (), "numba": (pytest.mark.jit,), "cupy": (pytest.mark.gpu,)}


def required_backends() -> set[str]:
    value = os.environ.get("FASTGRAD_REQUIRE_BACKENDS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def backend_or_skip(name: str) -> fastgrad.Backend:
    reason = unavailable_reason(name)
    if reason is not None:
        if name in required_backends():
            pytest.fail(
                f"FASTGRAD_REQUIRE_BACKENDS names {name!r}, but it is unavailable: {reason}"
            )
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return fastgrad.get_backend(name)


@pytest.fixture(
    params=[pytest.param(name, marks=marks, id=name) for name, marks in BACKEND_MARKS.items()]
)
def backend(request: pytest.FixtureRequest) -> fastgrad.Backend:
    """Each backend in turn; skipped (or failed, if required) when unavailable."""
    return backend_or_skip(request.param)


@pytest.fixture
def reference() -> fastgrad.Backend:
    """The NumPy reference backend every other backend is compared against."""
    return fastgrad.get_backend("numpy")


def tolerance(dtype: np.dtype | type) -> float:
    """Absolute/relative tolerance for comparing a backend with the reference.

    float64: 100 ulp of 1.0; float32: looser, since summation order differs
    between BLAS, Numba loops and cuBLAS and float32 sums lose ~1e-6 per add.
    """
    resolved = np.dtype(dtype)
    if resolved == np.float32:
        return 2e-5
    return 100 * float(np.finfo(resolved).eps)


def to_host(backend: fastgrad.Backend, value: object) -> np.ndarray:
    return backend.to_numpy(value) if hasattr(value, "shape") else np.asarray(value)


def random_net(sizes, dtype=np.float64, scale=0.8, seed=0):
    """TwoLayerNet parameters for ``sizes = (D, H, C)``, larger than the 0.01 init
    so that every gradient is well away from zero."""
    rng = np.random.default_rng(seed)
    D, H, C = sizes
    return {
        "W1": (scale * rng.standard_normal((D, H))).astype(dtype),
        "b1": (0.1 * rng.standard_normal(H)).astype(dtype),
        "W2": (scale * rng.standard_normal((H, C))).astype(dtype),
        "b2": (0.1 * rng.standard_normal(C)).astype(dtype),
    }


def mnist_like(batch_size, features, dtype=np.float64, seed=0):
    """Inputs in [0, 1] with ~80% exact zeros, like MNIST pixels."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, features))
    x[rng.random((batch_size, features)) < 0.8] = 0.0
    return x.astype(dtype)
