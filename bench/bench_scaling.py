"""Group ``scaling``: gradient cost against network size and depth, at batch 100.

Backprop and the fast numerical gradient per backend, float64. One hidden
layer: the chapter's sigmoid net at hidden 5 to 500 (3,985 to 397,510
parameters). Two and three hidden layers: ReLU nets (He init) of equal
widths 5 to 50 here (``fastgrad bench`` goes to 100; wider, the fast
gradient takes minutes). The naive loop's curve is the cost model 2·P
forward passes (``fastgrad bench`` draws it); timing it here would take
hours at hidden 500.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case

from fastgrad.benchmarks.workloads import WorkloadFactory, scaling_net

HIDDEN_SIZES = [5, 10, 50, 100, 500]
DEEP_HIDDEN_SIZES = [5, 10, 50]
SIZES = [(width, 1) for width in HIDDEN_SIZES] + [
    (width, depth) for depth in (2, 3) for width in DEEP_HIDDEN_SIZES
]


@pytest.mark.benchmark(group="scaling")
@pytest.mark.parametrize("method", ["backprop", "fast"])
@pytest.mark.parametrize(
    ("hidden_size", "hidden_layers"), SIZES, ids=[f"h{w}x{d}" for w, d in SIZES]
)
@pytest.mark.parametrize("backend_name", backend_params())
def test_scaling(
    benchmark: Any,
    factory: WorkloadFactory,
    backend_name: str,
    hidden_size: int,
    hidden_layers: int,
    method: str,
) -> None:
    require_backend(backend_name)
    net = scaling_net(hidden_size, hidden_layers)
    case = factory.gradient_case(backend_name, method, net, workload="scaling")
    assert case.net.hidden_layers == hidden_layers
    run_case(benchmark, case, rounds=3 if method == "fast" else 10)
