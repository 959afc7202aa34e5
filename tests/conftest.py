"""The backend fixture every conformance test runs under, and the tests' shared data.

Tests that take ``backend`` run once per backend (ids ``numpy``, ``numba``,
``cupy``). A backend that cannot run here is skipped with the reason the
registry gives; ``FASTGRAD_REQUIRE_BACKENDS=numba,cupy`` turns those skips
into failures, so a machine that should have a backend cannot lose it quietly.
Optional extras that are not backends (Dask) work alike:
:func:`import_extra_or_skip` skips without them, and
``FASTGRAD_REQUIRE_EXTRAS=dask`` makes their absence a failure.
Networks for the tests are made on the host (:func:`random_network`) and
copied onto a backend as kernels take them (:func:`network_on`) or as a model
(:func:`net_with`).
"""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import pytest

import fastgrad
from fastgrad.backends import unavailable_reason
from fastgrad.backends._base import Network

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


def required_extras() -> set[str]:
    value = os.environ.get("FASTGRAD_REQUIRE_EXTRAS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def import_extra_or_skip(extra: str, module: str) -> ModuleType:
    """``module``, installed by ``fastgrad[extra]``; a skip without it (a failure if required)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if extra in required_extras():
            pytest.fail(
                f"FASTGRAD_REQUIRE_EXTRAS names {extra!r}, but {module} cannot be imported: "
                f"{error}",
                pytrace=False,
            )
        pytest.skip(f"{module} not installed ({error}): pip install 'fastgrad[{extra}]'")


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


def random_network(
    layer_sizes: Sequence[int],
    activation: str = "sigmoid",
    dtype: np.dtype | type = np.float64,
    scale: float = 0.8,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> Network:
    """A :class:`Network` of host arrays for ``layer_sizes = [D, H_1, ..., C]``.

    Weights larger than a model's initial ones and non-zero biases, so that
    every gradient is well away from zero.
    """
    rng = np.random.default_rng(seed)
    pairs = list(itertools.pairwise(layer_sizes))
    weights = tuple((scale * rng.standard_normal(shape)).astype(dtype) for shape in pairs)
    biases = tuple((0.1 * rng.standard_normal(fan_out)).astype(dtype) for _, fan_out in pairs)
    return Network(weights, biases, activation, weight_decay)


def network_on(backend: fastgrad.Backend, network: Network) -> Network:
    """Copies of a host ``network``'s arrays on ``backend`` (the original is never written)."""
    return Network(
        tuple(backend.asarray(np.array(W)) for W in network.weights),
        tuple(backend.asarray(np.array(b)) for b in network.biases),
        network.activation,
        network.weight_decay,
    )


def net_with(network: Network, backend: fastgrad.Backend) -> fastgrad.MultiLayerNet:
    """A ``MultiLayerNet`` on ``backend`` whose parameters are copies of a host ``network``'s."""
    sizes = [int(network.weights[0].shape[0])] + [int(W.shape[1]) for W in network.weights]
    net = fastgrad.MultiLayerNet(
        sizes[0],
        sizes[1:-1],
        sizes[-1],
        network.activation,
        weight_decay_lambda=network.weight_decay,
        dtype=network.weights[0].dtype,
        backend=backend,
    )
    for layer, (W, b) in enumerate(zip(network.weights, network.biases), start=1):
        net.params[f"W{layer}"][...] = backend.asarray(W)
        net.params[f"b{layer}"][...] = backend.asarray(b)
    return net


def host_network(net: fastgrad.MultiLayerNet) -> Network:
    """``net``'s parameters as a :class:`Network` of host copies (for the oracles)."""
    network = net.network()
    return Network(
        tuple(net.backend.to_numpy(W).copy() for W in network.weights),
        tuple(net.backend.to_numpy(b).copy() for b in network.biases),
        network.activation,
        network.weight_decay,
    )


def mnist_like(batch_size, features, dtype=np.float64, seed=0):
    """Inputs in [0, 1] with ~80% exact zeros, like MNIST pixels."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, features))
    x[rng.random((batch_size, features)) < 0.8] = 0.0
    return x.astype(dtype)
