"""Fixtures of the pytest-benchmark suite: backends, data, and the timing helper.

Every benchmark file times the same :class:`fastgrad.benchmarks.workloads.Case`
objects that ``fastgrad bench`` times, so the two can never disagree about
what a workload is. The test session runs this folder with
``--benchmark-disable`` (pyproject's addopts): each benchmark then runs its
workload once and checks the value, a smoke test; ``nox -s bench`` (or
``pytest bench --benchmark-enable``) times it for real.

Options: ``--bench-steps N`` sets the training iterations of the chapter-run
and deep-run benchmarks (default 20), ``--bench-full`` runs the chapter's 10,000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import fastgrad
from fastgrad.backends import known_backends, unavailable_reason
from fastgrad.benchmarks.workloads import (
    Case,
    WorkloadFactory,
    read_mnist,
    synthetic_mnist,
)

BACKEND_MARKS = {"numpy": (), "numba": (pytest.mark.jit,), "cupy": (pytest.mark.gpu,)}
CHAPTER_STEPS = 10_000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastgrad bench")
    group.addoption(
        "--bench-steps",
        type=int,
        default=20,
        help="training iterations of the chapter run and the deep run",
    )
    group.addoption(
        "--bench-full", action="store_true", help="run the chapter's 10,000 training iterations"
    )


def backend_params() -> list[Any]:
    """One pytest param per known backend, id'd by name, with its marks."""
    return [
        pytest.param(name, marks=BACKEND_MARKS.get(name, ()), id=name) for name in known_backends()
    ]


def required_backends() -> set[str]:
    value = os.environ.get("FASTGRAD_REQUIRE_BACKENDS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def require_backend(name: str) -> fastgrad.Backend:
    """The backend, or a skip with the registry's reason (a failure if required)."""
    reason = unavailable_reason(name)
    if reason is not None:
        if name in required_backends():
            pytest.fail(
                f"FASTGRAD_REQUIRE_BACKENDS names {name!r}, but it is unavailable: {reason}"
            )
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    backend = fastgrad.get_backend(name)
    _warm(backend)
    return backend


_warmed: set[str] = set()


def _warm(backend: fastgrad.Backend) -> None:
    # JIT compilation happens here, once per session, outside every timed round.
    if backend.name not in _warmed:
        for dtype in ("float64", "float32"):
            backend.warmup(dtype)
        _warmed.add(backend.name)


def find_mnist(start: Path) -> Path | None:
    """``../shared/data/mnist`` next to the repository that holds ``start``, if it is there."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder.parent / "shared" / "data" / "mnist"
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
        if (folder / ".git").exists() or (folder / "pyproject.toml").is_file():
            break
    return None


@pytest.fixture(scope="session")
def factory() -> WorkloadFactory:
    """Workloads over real MNIST from ``../shared/data/mnist`` when present, else synthetic."""
    folder = find_mnist(Path(__file__).parent)
    dataset = read_mnist(folder, "train") if folder is not None else synthetic_mnist(10_000)
    return WorkloadFactory(dataset, seed=0)


@pytest.fixture(scope="session")
def train_steps(request: pytest.FixtureRequest) -> int:
    if request.config.getoption("--bench-full"):
        return CHAPTER_STEPS
    return int(request.config.getoption("--bench-steps"))


def run_case(benchmark: Any, case: Case, rounds: int = 5) -> Any:
    """Time ``case`` with one warm-up round, fresh state per round, and check its value.

    ``case.run`` waits for the device itself, so GPU timings are complete.
    A sampled (extrapolated) case records its scale in ``extra_info``.
    """
    benchmark.extra_info.update(case.extra_info)
    result = benchmark.pedantic(
        case.run, setup=lambda: ((case.setup(),), {}), rounds=rounds, warmup_rounds=1
    )
    case.check(result)
    return result
