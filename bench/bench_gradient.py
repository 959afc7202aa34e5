"""Groups ``gradient`` and ``gradient-deep``: one float64 gradient at batch 100.

``gradient``: TwoLayerNet(784, 50, 10), the chapter's net. ``gradient-deep``:
MultiLayerNet(784, [100, 100], 10, "relu"), He init. Methods: ``backprop``;
``fast`` (the structure-aware central differences); ``naive`` (the
per-element loop, two full losses per parameter). The naive loop is timed on
a documented fixed fraction of the parameters: every ``s``-th element of each
parameter array with ``s = P // 400`` (99 for 784-50-10, 404 parameters);
``extra_info["scale_to_full"]`` (98.4 there) turns its time into the full
gradient's. A ReLU net's numerical gradients are checked against the NumPy
backend's fast kernel, the sampled naive loop within 1e-9. Baselines: the
NumPy backend and the book's code. The smoke run with ``--benchmark-disable``
checks 40 naive samples instead, and the deep group on a 784-20-20-10 net.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case
from peers import peer_params, require_peer

from fastgrad.benchmarks.workloads import (
    BOOK,
    CHAPTER_NET,
    DEEP_GRADIENT_NET,
    NetSpec,
    WorkloadFactory,
)

NAIVE_SAMPLES = 400
# With --benchmark-disable (the test session's smoke run) nothing is timed, so
# a tenth of the sample checks the same code in a tenth of the time, and a
# narrow deep net the deep code path in a fraction of a second.
SMOKE_NAIVE_SAMPLES = 40
SMOKE_DEEP_NET = NetSpec((20, 20), "relu", "relu")


def naive_samples(benchmark: Any) -> int:
    return SMOKE_NAIVE_SAMPLES if benchmark.disabled else NAIVE_SAMPLES


def deep_net(benchmark: Any) -> NetSpec:
    return SMOKE_DEEP_NET if benchmark.disabled else DEEP_GRADIENT_NET


def rounds_for(method: str) -> int:
    return 3 if method in ("naive", "fast") else 10


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("method", ["backprop", "fast", "naive"])
@pytest.mark.parametrize("backend_name", backend_params())
def test_gradient(benchmark: Any, factory: WorkloadFactory, backend_name: str, method: str) -> None:
    require_backend(backend_name)
    case = factory.gradient_case(
        backend_name, method, CHAPTER_NET, naive_samples=naive_samples(benchmark)
    )
    run_case(benchmark, case, rounds=3 if method == "naive" else 10)


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("method", ["backprop", "naive"])
def test_gradient_book(benchmark: Any, factory: WorkloadFactory, method: str) -> None:
    case = factory.gradient_case(BOOK, method, CHAPTER_NET, naive_samples=naive_samples(benchmark))
    run_case(benchmark, case, rounds=3 if method == "naive" else 10)


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("peer", peer_params())
def test_gradient_peer(benchmark: Any, factory: WorkloadFactory, peer: str) -> None:
    require_peer(peer)
    run_case(benchmark, factory.gradient_case(peer, "backprop", CHAPTER_NET), rounds=10)


@pytest.mark.benchmark(group="gradient-deep")
@pytest.mark.parametrize("method", ["backprop", "fast", "naive"])
@pytest.mark.parametrize("backend_name", backend_params())
def test_gradient_deep(
    benchmark: Any, factory: WorkloadFactory, backend_name: str, method: str
) -> None:
    require_backend(backend_name)
    net = deep_net(benchmark)
    case = factory.gradient_case(backend_name, method, net, naive_samples=naive_samples(benchmark))
    assert case.workload == "gradient-deep" and not net.smooth
    run_case(benchmark, case, rounds=rounds_for(method))


@pytest.mark.benchmark(group="gradient-deep")
@pytest.mark.parametrize("method", ["backprop", "naive"])
def test_gradient_deep_book(benchmark: Any, factory: WorkloadFactory, method: str) -> None:
    case = factory.gradient_case(
        BOOK, method, deep_net(benchmark), naive_samples=naive_samples(benchmark)
    )
    run_case(benchmark, case, rounds=rounds_for(method))
