"""Group ``train-step``: SGD at batch 100, lr 0.1, on the chapter's net and the deep one.

``test_sgd_step``: one iteration (forward, backward, update) of
TwoLayerNet(784, 50, 10) per backend and dtype on a fixed batch.
``test_chapter_run``: the chapter's training run (workload A) through
``TwoLayerNet.sgd_steps`` (many steps in one backend call), with
``--bench-steps`` iterations (20 by default) or the chapter's 10,000 with
``--bench-full``; it reports in group ``train-step (chapter run, N it)``.
The book's own loop is the baseline in both, next to NumPy.
``test_deep_run``: workload C, MultiLayerNet(784, [100, 100, 100], 10,
"relu") with He init, as many iterations, in group ``train-deep (N it)``;
its baseline is the same net written out in plain NumPy (the book's
chapter-6 MultiLayerNet and loop), next to the NumPy backend.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case
from peers import peer_params, require_peer

from fastgrad.benchmarks.workloads import BOOK, CHAPTER_NET, DEEP_TRAIN_NET, WorkloadFactory

DTYPES = ["float64", "float32"]


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_sgd_step(benchmark: Any, factory: WorkloadFactory, backend_name: str, dtype: str) -> None:
    require_backend(backend_name)
    run_case(benchmark, factory.train_step_case(backend_name, dtype), rounds=50)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_book(benchmark: Any, factory: WorkloadFactory, dtype: str) -> None:
    run_case(benchmark, factory.train_step_case(BOOK, dtype), rounds=50)


def _training_run(
    benchmark: Any, factory: WorkloadFactory, name: str, dtype: str, steps: int, deep: bool
) -> None:
    net = DEEP_TRAIN_NET if deep else CHAPTER_NET
    if deep:
        benchmark.group = f"train-deep ({steps} it)"
    else:
        benchmark.group = f"train-step (chapter run, {steps} it)"
    case = factory.train_case(name, dtype, steps, net)
    assert case.workload == ("train-deep" if deep else "train")
    run_case(benchmark, case, rounds=3 if steps > 1000 else 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_chapter_run(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, backend_name: str, dtype: str
) -> None:
    require_backend(backend_name)
    _training_run(benchmark, factory, backend_name, dtype, train_steps, deep=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chapter_run_book(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, dtype: str
) -> None:
    _training_run(benchmark, factory, BOOK, dtype, train_steps, deep=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peer", peer_params())
def test_chapter_run_peer(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, peer: str, dtype: str
) -> None:
    require_peer(peer)
    _training_run(benchmark, factory, peer, dtype, train_steps, deep=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_deep_run(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, backend_name: str, dtype: str
) -> None:
    require_backend(backend_name)
    _training_run(benchmark, factory, backend_name, dtype, train_steps, deep=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_run_book(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, dtype: str
) -> None:
    _training_run(benchmark, factory, BOOK, dtype, train_steps, deep=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peer", peer_params())
def test_deep_run_peer(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, peer: str, dtype: str
) -> None:
    require_peer(peer)
    _training_run(benchmark, factory, peer, dtype, train_steps, deep=True)
