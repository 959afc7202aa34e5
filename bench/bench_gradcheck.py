"""Groups ``gradcheck-*``: what a gradient check costs.

``gradcheck-hand-written``: a from-scratch NumPy model (the tests' book-style
layered net, 784-100-10 sigmoid) at batch 100, ``mode="fast"`` (a few loss
evaluations per parameter, whatever its size) against ``mode="full"`` (four
per element, 318,040 losses; one round). ``gradcheck-own``: fastgrad's
``TwoLayerNet(784, 50, 10)`` on numba, ``mode="full"`` (two structure-aware
kernels and one backprop) against one numerical gradient of the same net.
With ``--benchmark-disable`` (the test session's smoke run) the hand-written
model shrinks to 784-3-10 so that ``full`` stays short.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import require_backend

import fastgrad
from tests.conftest import mnist_like
from tests.test_gradcheck import HandNet


def _batch(features: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return mnist_like(100, features, seed=seed), np.random.default_rng(seed).integers(0, 10, 100)


@pytest.mark.benchmark(group="gradcheck-hand-written")
@pytest.mark.parametrize("mode", ["fast", "full"])
def test_gradcheck_hand_written(benchmark: Any, mode: str) -> None:
    hidden = 3 if benchmark.disabled else 100
    net = HandNet((784, hidden, 10), "sigmoid")
    x, t = _batch(784)
    benchmark.extra_info.update({"mode": mode, "num_params": 784 * hidden + 11 * hidden + 10})
    rounds = 1 if mode == "full" else 5
    report = benchmark.pedantic(
        fastgrad.gradient_check,
        args=(net, x, t),
        kwargs={"mode": mode},
        rounds=rounds,
        warmup_rounds=0,
    )
    assert report.passed, str(report)
    if mode == "fast":
        assert report.loss_evaluations <= 40
    benchmark.extra_info["loss_evaluations"] = report.loss_evaluations


@pytest.mark.benchmark(group="gradcheck-own")
@pytest.mark.parametrize("what", ["gradient_check", "numerical_gradient"])
def test_gradcheck_own_model(benchmark: Any, what: str) -> None:
    backend = require_backend("numba")
    net = fastgrad.TwoLayerNet(784, 50, 10, seed=0, backend=backend)
    x, t = _batch(784)
    X, labels = net.prepare(x, t)
    backend.warmup("float64", "all")
    if what == "gradient_check":
        report = benchmark.pedantic(
            fastgrad.gradient_check, args=(net, x, t), rounds=10, warmup_rounds=1
        )
        assert report.passed and report.mode == "full", str(report)
    else:
        grads = benchmark.pedantic(
            net.numerical_gradient_float64, args=(X, labels), rounds=10, warmup_rounds=1
        )
        assert set(grads) == set(net.params)
