"""The book's chapter-4 TwoLayerNet and training loop: the baseline "the book's loop".

The code lives in :mod:`fastgrad._book_reference` so that ``fastgrad bench``
(which cannot import this folder) times the very same baseline; this module
re-exports it for the pytest-benchmark suite and for reading alongside the
book.
"""

from fastgrad._book_reference import (
    BookTrainResult,
    BookTwoLayerNet,
    book_train,
    cross_entropy_error,
    numerical_gradient,
    sigmoid,
    sigmoid_grad,
    softmax,
)

__all__ = [
    "BookTrainResult",
    "BookTwoLayerNet",
    "book_train",
    "cross_entropy_error",
    "numerical_gradient",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
]
