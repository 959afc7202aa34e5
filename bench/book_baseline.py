"""The book's networks and training loop: the baselines "the book's loop".

Chapter 4's TwoLayerNet (workloads A and B) and chapter 6's MultiLayerNet
with its layers (the plain NumPy loop of workload C and the deep gradient).
The code lives in :mod:`fastgrad._book_reference` so that ``fastgrad bench``
(which cannot import this folder) times the very same baselines; this module
re-exports it for the pytest-benchmark suite and for reading alongside the
book.
"""

from fastgrad._book_reference import (
    Affine,
    BookMultiLayerNet,
    BookTrainResult,
    BookTwoLayerNet,
    Relu,
    Sigmoid,
    SoftmaxWithLoss,
    book_train,
    cross_entropy_error,
    numerical_gradient,
    sigmoid,
    sigmoid_grad,
    softmax,
)

__all__ = [
    "Affine",
    "BookMultiLayerNet",
    "BookTrainResult",
    "BookTwoLayerNet",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "book_train",
    "cross_entropy_error",
    "numerical_gradient",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
]
