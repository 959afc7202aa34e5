"""fastgrad: the training chapter of *Deep Learning from Scratch*, fast, on NumPy, Numba and CuPy.

This module is the public API only. It imports neither numba nor cupy; a
backend's package is imported the first time that backend is asked for.

Examples
--------
>>> import numpy as np, fastgrad
>>> net = fastgrad.TwoLayerNet(784, 50, 10, seed=0)
>>> x, t = np.random.default_rng(0).random((100, 784)), np.arange(100) % 10
>>> report = fastgrad.gradient_check(net, x, t)
>>> report.passed
True
"""

from fastgrad.backends import (
    Backend,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fastgrad.data import load_mnist
from fastgrad.errors import (
    BackendUnavailableError,
    GradientCheckError,
    PrecisionWarning,
    SlowPathWarning,
)
from fastgrad.functions import (
    cross_entropy_error,
    identity,
    mean_squared_error,
    relu,
    sigmoid,
    sigmoid_grad,
    softmax,
    softmax_cross_entropy,
)
from fastgrad.gradcheck import GradientCheckReport, check_gradients, gradient_check
from fastgrad.gradient import gradient_descent, numerical_diff, numerical_gradient, tangent_line
from fastgrad.models import MultiLayerNet, SimpleNet, TwoLayerNet

# `train` itself stays in fastgrad.train: a function of the same name here would
# shadow that module (`import fastgrad.train as m` would return the function).
from fastgrad.train import TrainingHistory

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "GradientCheckError",
    "GradientCheckReport",
    "MultiLayerNet",
    "PrecisionWarning",
    "SimpleNet",
    "SlowPathWarning",
    "TrainingHistory",
    "TwoLayerNet",
    "__version__",
    "available_backends",
    "check_gradients",
    "cross_entropy_error",
    "get_backend",
    "gradient_check",
    "gradient_descent",
    "identity",
    "load_mnist",
    "mean_squared_error",
    "numerical_diff",
    "numerical_gradient",
    "relu",
    "set_backend",
    "sigmoid",
    "sigmoid_grad",
    "softmax",
    "softmax_cross_entropy",
    "tangent_line",
    "use_backend",
]
