"""Group ``train-load``: the chapter's training steps on an idle machine and beside another process.

The Numba backend's chapter loop runs its threads in lock-step, meeting
twice a step; next to a CPU-bound process a thread that the operating
system sets aside holds every other one up. The backend therefore chooses
its thread count from measured step times
(:class:`fastgrad.backends.numba.threads.ThreadCountChooser`). Each
benchmark runs ``--bench-steps`` SGD steps (batch 100, lr 0.1) of
TwoLayerNet(784, 50, 10) float64 through ``sgd_steps``, in three
configurations:

* ``one-thread``: ``numba.set_num_threads(1)``;
* ``all-threads``: every step on all of Numba's threads (``choose_threads``
  off: the loop as it was before the chooser);
* ``chosen``: the default, the chooser starting afresh each round.

``load="busy"`` starts one CPU-bound competitor process (a Python busy loop)
for the benchmark and stops it afterwards; ``load="idle"`` runs none. The
aim: ``chosen`` no slower than ``one-thread`` when busy, and within 10 % of
``all-threads`` when idle. Run it alone (``pytest bench/bench_load.py
--benchmark-enable --bench-steps 2000``): any other work on the machine is
load too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require_backend

import fastgrad
from fastgrad.data import load_mnist

numba = pytest.importorskip("numba")

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
CONFIGURATIONS = ["one-thread", "all-threads", "chosen"]


@pytest.fixture(scope="module")
def training_set() -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from ``../shared/data/mnist`` when present, else the embedded subset."""
    if MNIST.is_dir():
        (x, t), _ = load_mnist(data_dir=MNIST, dtype=np.float64)
    else:
        (x, t), _ = load_mnist(dtype=np.float64, subset="mini")
    return x, t


@pytest.fixture(params=["idle", "busy"])
def load(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "idle":
        yield "idle"
        return
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running before the first round
    try:
        yield "busy"
    finally:
        competitor.kill()
        competitor.wait()


@pytest.mark.benchmark(group="train-load")
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_chapter_steps_under_load(
    benchmark: Any,
    training_set: tuple[np.ndarray, np.ndarray],
    train_steps: int,
    load: str,
    configuration: str,
) -> None:
    from fastgrad.backends import numba as numba_backend_module

    backend = require_backend("numba")
    x, t = training_set
    indices = np.random.default_rng(0).integers(0, len(x), (train_steps, 100)).astype(np.intp)
    threads_before = numba.get_num_threads()
    benchmark.extra_info.update({"load": load, "configuration": configuration})

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        numba.set_num_threads(1 if configuration == "one-thread" else threads_before)
        backend.choose_threads = configuration == "chosen"  # type: ignore[attr-defined]
        numba_backend_module._THREAD_CHOOSERS.clear()
        net = fastgrad.TwoLayerNet(784, 50, 10, dtype="float64", seed=0, backend=backend)
        X, labels = net.prepare(x, t)
        return (net, net.training_inputs(X), labels), {}

    def run(net: Any, X: Any, labels: Any) -> np.ndarray:
        return net.sgd_steps(X, labels, indices, 0.1)

    try:
        losses = benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    finally:
        numba.set_num_threads(threads_before)
        backend.choose_threads = True  # type: ignore[attr-defined]
    assert losses.shape == (train_steps,) and np.isfinite(losses).all()
