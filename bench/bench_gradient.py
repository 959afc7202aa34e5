"""Group ``gradient``: one float64 gradient of TwoLayerNet(784, 50, 10) at batch 100.

Methods: ``backprop``; ``fast`` (the structure-aware central differences);
``naive`` (the per-element loop, two full losses per parameter). The naive
loop is timed on a documented fixed fraction of the parameters: every
``s``-th element of each parameter array with ``s = 39,760 // 400 = 99``,
404 parameters; ``extra_info["scale_to_full"]`` (98.4) turns its time into
the full gradient's (the smoke run with ``--benchmark-disable`` checks 40
instead). Baselines: the NumPy backend and the book's code.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case
from peers import peer_params, require_peer

from fastgrad._bench_workloads import BOOK, WorkloadFactory

NAIVE_SAMPLES = 400
# With --benchmark-disable (the test session's smoke run) nothing is timed, so
# a tenth of the sample checks the same code in a tenth of the time.
SMOKE_NAIVE_SAMPLES = 40


def naive_samples(benchmark: Any) -> int:
    return SMOKE_NAIVE_SAMPLES if benchmark.disabled else NAIVE_SAMPLES


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("method", ["backprop", "fast", "naive"])
@pytest.mark.parametrize("backend_name", backend_params())
def test_gradient(
    benchmark: Any, factory: WorkloadFactory, backend_name: str, method: str
) -> None:
    require_backend(backend_name)
    case = factory.gradient_case(backend_name, method, 50, naive_samples=naive_samples(benchmark))
    run_case(benchmark, case, rounds=3 if method == "naive" else 10)


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("method", ["backprop", "naive"])
def test_gradient_book(benchmark: Any, factory: WorkloadFactory, method: str) -> None:
    case = factory.gradient_case(BOOK, method, 50, naive_samples=naive_samples(benchmark))
    run_case(benchmark, case, rounds=3 if method == "naive" else 10)


@pytest.mark.benchmark(group="gradient")
@pytest.mark.parametrize("peer", peer_params())
def test_gradient_peer(benchmark: Any, factory: WorkloadFactory, peer: str) -> None:
    require_peer(peer)
    run_case(benchmark, factory.gradient_case(peer, "backprop", 50), rounds=10)
