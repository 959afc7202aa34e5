"""Group ``loss``: MSE, CEE and the fused softmax cross-entropy (forward + backward).

The backend kernels themselves are timed (not the public functions, whose
argument checks would dominate at batch 100), at the chapter's batch of 100
and at 10,000, float64. Each value is checked against plain NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import backend_params, require_backend

BATCH_SIZES = [100, 10_000]
CLASSES = 10


def _inputs(batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(batch_size)
    logits = rng.standard_normal((batch_size, CLASSES))
    labels = rng.integers(0, CLASSES, batch_size)
    return logits, labels, np.eye(CLASSES)[labels]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _timed(benchmark: Any, backend: Any, kernel: Any, *args: Any) -> Any:
    def run() -> Any:
        value = kernel(*args)
        backend.synchronize()
        return value

    return benchmark.pedantic(run, rounds=20, iterations=10, warmup_rounds=1)


@pytest.mark.benchmark(group="loss")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_mean_squared_error(benchmark: Any, backend_name: str, batch_size: int) -> None:
    backend = require_backend(backend_name)
    logits, _, onehot = _inputs(batch_size)
    probabilities = _softmax(logits)
    Y, T = backend.asarray(probabilities), backend.asarray(onehot)
    value = float(backend.to_numpy(_timed(benchmark, backend, backend.mean_squared_error, Y, T)))
    expected = 0.5 * np.sum((probabilities - onehot) ** 2)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.benchmark(group="loss")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_cross_entropy_error(benchmark: Any, backend_name: str, batch_size: int) -> None:
    backend = require_backend(backend_name)
    logits, labels, _ = _inputs(batch_size)
    probabilities = _softmax(logits)
    Y, t = backend.asarray(probabilities), backend.asarray(labels)
    value = float(backend.to_numpy(_timed(benchmark, backend, backend.cross_entropy_error, Y, t)))
    expected = -np.mean(np.log(probabilities[np.arange(batch_size), labels] + 1e-7))
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.benchmark(group="loss")
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("backend_name", backend_params())
def test_softmax_cross_entropy_fused(benchmark: Any, backend_name: str, batch_size: int) -> None:
    """Loss and its gradient with respect to the logits in one call, as training uses it."""
    backend = require_backend(backend_name)
    logits, labels, onehot = _inputs(batch_size)
    Z, t = backend.asarray(logits), backend.asarray(labels)
    loss, dlogits = _timed(benchmark, backend, backend.softmax_cross_entropy_with_grad, Z, t)
    probabilities = _softmax(logits)
    expected = -np.mean(np.log(probabilities[np.arange(batch_size), labels]))
    assert float(backend.to_numpy(loss)) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(
        backend.to_numpy(dlogits), (probabilities - onehot) / batch_size, rtol=1e-10, atol=1e-15
    )
