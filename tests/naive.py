"""Slow, obviously-correct loop versions of the kernels: the tests' oracles.

Written with Python loops and ``math`` so that they share no code (and no
bugs) with any backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def softmax_rows(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    out = np.empty_like(x)
    for n, row in enumerate(x):
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = math.fsum(exps)
        out[n] = [e / total for e in exps]
    return out


def log_softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    total = 0.0
    for row, label in zip(logits, labels):
        top = max(row)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in row))
        total += lse - row[int(label)]
    return total / len(labels)


def two_layer_loss(params: dict[str, np.ndarray], X: np.ndarray, labels: np.ndarray) -> float:
    W1, b1, W2, b2 = (np.asarray(params[k], dtype=np.float64) for k in ("W1", "b1", "W2", "b2"))
    hidden = 1.0 / (1.0 + np.exp(-(np.asarray(X, dtype=np.float64) @ W1 + b1)))
    return log_softmax_cross_entropy(hidden @ W2 + b2, labels)


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-4
) -> np.ndarray:
    """The book's per-element central-difference loop."""
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        original = float(x[index])
        x[index] = original + h
        plus = f(x)
        x[index] = original - h
        minus = f(x)
        x[index] = original
        grad[index] = (plus - minus) / (2 * h)
    return grad


def two_layer_numerical_gradient(
    params: dict[str, np.ndarray], X: np.ndarray, labels: np.ndarray, h: float = 1e-4
) -> dict[str, np.ndarray]:
    copies = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    return {
        name: numerical_gradient(lambda _: two_layer_loss(copies, X, labels), copies[name], h)
        for name in ("W1", "b1", "W2", "b2")
    }
