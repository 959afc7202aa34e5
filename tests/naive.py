"""Slow, obviously-correct loop versions of the kernels: the tests' oracles.

Written with Python loops and ``math`` so that they share no code (and no
bugs) with any backend. Networks come as plain sequences of NumPy arrays
(``weights[l]`` of shape ``(fan_in, fan_out)``, ``biases[l]`` of shape
``(fan_out,)``), never as a backend's own structures.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

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


def _sigmoid(a: float) -> float:
    # Two branches so that math.exp never overflows (it raises, unlike np.exp).
    if a >= 0:
        return 1.0 / (1.0 + math.exp(-a))
    e = math.exp(a)
    return e / (1.0 + e)


ACTIVATIONS: dict[str, Callable[[float], float]] = {
    "sigmoid": _sigmoid,
    "relu": lambda a: a if a > 0 else 0.0,
    "tanh": math.tanh,
    "identity": lambda a: a,
}


def multilayer_logits(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    X: np.ndarray,
    activation: str,
) -> list[list[float]]:
    """``A_L`` of every sample, one multiply-add at a time."""
    act = ACTIVATIONS[activation]
    # Each unit's incoming weights as one list (a column of W), so that a
    # pre-activation is one exactly rounded sum of products.
    layers = [
        (np.asarray(W, dtype=np.float64).T.tolist(), np.asarray(b, dtype=np.float64).tolist())
        for W, b in zip(weights, biases, strict=True)
    ]
    logits = []
    for sample in np.asarray(X, dtype=np.float64).tolist():
        values = sample
        for depth, (columns, b) in enumerate(layers, start=1):
            pre = [
                math.fsum([*map(operator.mul, values, column), bias])
                for column, bias in zip(columns, b, strict=True)
            ]
            values = pre if depth == len(layers) else [act(a) for a in pre]
        logits.append(values)
    return logits


def multilayer_loss(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    X: np.ndarray,
    labels: np.ndarray,
    activation: str,
    weight_decay: float = 0.0,
) -> float:
    """Mean softmax cross-entropy of a multilayer net plus ``0.5 * λ * sum(W**2)``."""
    total = 0.0
    logits = multilayer_logits(weights, biases, X, activation)
    for row, label in zip(logits, np.asarray(labels).tolist(), strict=True):
        top = max(row)
        total += top + math.log(math.fsum(math.exp(v - top) for v in row)) - row[int(label)]
    penalty = math.fsum(
        float(w) * float(w) for W in weights for w in np.asarray(W, dtype=np.float64).ravel()
    )
    return total / len(logits) + 0.5 * weight_decay * penalty


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


def multilayer_numerical_gradient(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    X: np.ndarray,
    labels: np.ndarray,
    activation: str,
    weight_decay: float = 0.0,
    h: float = 1e-4,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The book's loop over :func:`multilayer_loss`: ``(dW, db)`` of every layer, float64."""
    weights64 = [np.array(W, dtype=np.float64) for W in weights]
    biases64 = [np.array(b, dtype=np.float64) for b in biases]

    def loss(_: np.ndarray) -> float:
        return multilayer_loss(weights64, biases64, X, labels, activation, weight_decay)

    return [
        (numerical_gradient(loss, W, h), numerical_gradient(loss, b, h))
        for W, b in zip(weights64, biases64, strict=True)
    ]
