"""Group ``train-step``: SGD on TwoLayerNet(784, 50, 10), batch 100, lr 0.1.

``test_sgd_step``: one iteration (forward, backward, update) per backend and
dtype on a fixed batch. ``test_chapter_run``: the chapter's training run
through ``two_layer_sgd_steps`` (many steps in one backend call), with
``--bench-steps`` iterations (20 by default) or the chapter's 10,000 with
``--bench-full``; it reports in group ``train-step (chapter run, N it)``.
The book's own loop is the baseline in both, next to NumPy.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import backend_params, require_backend, run_case
from peers import peer_params, require_peer

from fastgrad._bench_workloads import BOOK, WorkloadFactory

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


def _chapter_run(
    benchmark: Any, factory: WorkloadFactory, name: str, dtype: str, steps: int
) -> None:
    benchmark.group = f"train-step (chapter run, {steps} it)"
    run_case(benchmark, factory.train_case(name, dtype, steps), rounds=3 if steps > 1000 else 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_chapter_run(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, backend_name: str, dtype: str
) -> None:
    require_backend(backend_name)
    _chapter_run(benchmark, factory, backend_name, dtype, train_steps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chapter_run_book(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, dtype: str
) -> None:
    _chapter_run(benchmark, factory, BOOK, dtype, train_steps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peer", peer_params())
def test_chapter_run_peer(
    benchmark: Any, factory: WorkloadFactory, train_steps: int, peer: str, dtype: str
) -> None:
    require_peer(peer)
    _chapter_run(benchmark, factory, peer, dtype, train_steps)
