"""Group ``scaling``: gradient cost against network size, hidden 5 to 500 at batch 100.

Backprop and the fast numerical gradient per backend, float64; the parameter
count runs from 3,985 (hidden 5) to 397,510 (hidden 500). The naive loop's
curve is the cost model 2·P forward passes (``fastgrad bench`` draws it);
timing it here would take hours at hidden 500.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case

from fastgrad._bench_workloads import WorkloadFactory

HIDDEN_SIZES = [5, 10, 50, 100, 500]


@pytest.mark.benchmark(group="scaling")
@pytest.mark.parametrize("method", ["backprop", "fast"])
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_scaling(
    benchmark: Any, factory: WorkloadFactory, backend_name: str, hidden_size: int, method: str
) -> None:
    require_backend(backend_name)
    case = factory.gradient_case(backend_name, method, hidden_size, workload="scaling")
    run_case(benchmark, case, rounds=3 if method == "fast" else 10)
