"""Groups ``distributed-*``: a black-box numerical gradient on a Dask cluster.

``distributed-scaling``: central differences of a black box of about 20 ms a
call (an 18 ms sleep, standing for a simulator, plus ~1 ms of NumPy work, so
that the 2-core bench machine can still show scaling) at ``x`` of 400 elements,
800 calls: the local serial loop against a ``LocalCluster`` of 1, 2, 4 and 8
single-thread worker processes, tasks planned by fastgrad itself. Speedup =
serial median / cluster median; efficiency = speedup / workers.
``distributed-overhead``: 200 one-element tasks of an ``f`` that costs next
to nothing, on one worker: the median over 200 is the overhead of one task
(submit, schedule, unpickle ``f`` and ``x``, run, gather).

Clusters start outside the timed rounds. Every round checks the gradient
bit for bit against the serial one. With ``--benchmark-disable`` (the test
session's smoke run) ``f`` takes 1 ms, ``x`` has 12 elements and the
clusters are in-process threads, so the file stays a quick smoke test.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad.distributed import plan_chunks
from tests.conftest import import_extra_or_skip

WORKERS = [1, 2, 4, 8]
FULL = {"size": 400, "sleep": 0.018, "rounds": 3, "overhead_tasks": 200}
SMOKE = {"size": 12, "sleep": 0.001, "rounds": 1, "overhead_tasks": 10}
MIXING = np.random.default_rng(0).standard_normal((400, 400)) / 20


def black_box(sleep_seconds: float, x: np.ndarray) -> float:
    time.sleep(sleep_seconds)
    y = x
    for _ in range(40):
        y = np.tanh(MIXING[: x.size, : x.size] @ y)
    return float(y.sum())


def cheap(x: np.ndarray) -> float:
    return float(np.sum(x * x))


def disabled(config: pytest.Config) -> bool:
    # pytest-benchmark's own rule for --benchmark-disable / --benchmark-enable.
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def sizes(request: pytest.FixtureRequest) -> dict[str, Any]:
    return SMOKE if disabled(request.config) else FULL


@pytest.fixture(scope="module")
def clusters(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Any]]:
    """``clusters(n)``: a client of ``n`` single-thread workers, one cluster alive at a time.

    The idle workers of an earlier size would otherwise share the two cores with
    the timed ones (heartbeats, event loops).
    """
    distributed = import_extra_or_skip("dask", "distributed")
    processes = not disabled(request.config)
    started: dict[int, tuple[Any, Any]] = {}

    def close_all() -> None:
        for cluster, client in started.values():
            client.close()
            cluster.close()
        started.clear()

    def client_of(workers: int) -> Any:
        if workers not in started:
            close_all()
            # In-process workers talk over inproc://, which takes no host.
            where = {"host": "127.0.0.1"} if processes else {}
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=":0",
                **where,
            )
            client = distributed.Client(cluster, set_as_default=False)
            client.wait_for_workers(workers)
            # Outside the clock: every worker imports fastgrad and this module (which
            # holds f) now, not during the first timed round.
            for module in ("fastgrad.distributed", __name__):
                client.run(importlib.import_module, module)
            fastgrad.numerical_gradient(cheap, np.ones(2), client=client)
            started[workers] = cluster, client
        return started[workers][1]

    yield client_of
    close_all()


@pytest.fixture(scope="module")
def workload(sizes: dict[str, Any]) -> tuple[Callable[[np.ndarray], float], np.ndarray, bytes]:
    """The black box, its point, and the serial gradient's bytes (from a no-sleep twin)."""
    x = np.linspace(-1.0, 1.0, sizes["size"])
    expected = fastgrad.numerical_gradient(functools.partial(black_box, 0.0), x)
    return functools.partial(black_box, sizes["sleep"]), x, expected.tobytes()


@pytest.mark.benchmark(group="distributed-scaling")
def test_serial_loop(benchmark: Any, workload: Any, sizes: dict[str, Any]) -> None:
    f, x, expected = workload
    benchmark.extra_info.update({"workers": 0, "elements": x.size})
    grad = benchmark.pedantic(
        fastgrad.numerical_gradient, args=(f, x), rounds=sizes["rounds"], warmup_rounds=0
    )
    assert grad.tobytes() == expected


@pytest.mark.benchmark(group="distributed-scaling")
@pytest.mark.parametrize("workers", WORKERS, ids=[f"{n}-workers" for n in WORKERS])
def test_cluster(
    benchmark: Any, workload: Any, sizes: dict[str, Any], clusters: Any, workers: int
) -> None:
    f, x, expected = workload
    client = clusters(workers)
    # The plan fastgrad makes for this run (it times f once itself, as here).
    started = time.perf_counter()
    f(x)
    per_call = time.perf_counter() - started
    tasks = len(plan_chunks(x.size, 2 * per_call, workers))
    benchmark.extra_info.update({"workers": workers, "elements": x.size, "tasks": tasks})
    grad = benchmark.pedantic(
        fastgrad.numerical_gradient,
        args=(f, x),
        kwargs={"client": client},
        rounds=sizes["rounds"],
        warmup_rounds=0,
    )
    assert grad.tobytes() == expected


@pytest.mark.benchmark(group="distributed-overhead")
def test_per_task_overhead(benchmark: Any, sizes: dict[str, Any], clusters: Any) -> None:
    client = clusters(1)
    tasks = sizes["overhead_tasks"]
    x = np.linspace(0.0, 1.0, tasks)
    benchmark.extra_info.update({"workers": 1, "tasks": tasks})
    grad = benchmark.pedantic(
        fastgrad.numerical_gradient,
        args=(cheap, x),
        kwargs={"client": client, "elements_per_task": 1},
        rounds=sizes["rounds"],
        warmup_rounds=0,
    )
    assert grad.tobytes() == fastgrad.numerical_gradient(cheap, x).tobytes()
