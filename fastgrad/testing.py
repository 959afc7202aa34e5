"""Assertions for pytest users checking their own backprop.

Examples
--------
>>> import numpy as np
>>> from fastgrad.testing import assert_gradients_close
>>> class Square:
...     params = {"w": np.array([1.0, 2.0])}
...     def loss(self, x, t):
...         return float(np.sum((self.params["w"] * x - t) ** 2))
...     def gradient(self, x, t):
...         return {"w": 2 * (self.params["w"] * x - t) * x}
>>> report = assert_gradients_close(Square(), np.array([3.0, 4.0]), np.array([0.0, 1.0]))
>>> report.passed
True
"""

from __future__ import annotations

from typing import Any

from fastgrad.gradcheck import GradientCheckReport, check_gradients, gradient_check

__all__ = ["assert_function_gradients_close", "assert_gradients_close"]


def assert_gradients_close(model: Any, x: Any, t: Any, **options: Any) -> GradientCheckReport:
    """Run :func:`fastgrad.gradient_check` and raise ``GradientCheckError`` if it fails.

    The error is an ``AssertionError`` whose message is the report's table,
    so a failing test shows which parameter and element are wrong. Returns
    the report when the check passes. ``options`` as for ``gradient_check``.
    """
    return gradient_check(model, x, t, raise_on_failure=True, **options)


def assert_function_gradients_close(
    f: Any, params: Any, grads: Any, **options: Any
) -> GradientCheckReport:
    """:func:`fastgrad.check_gradients` as an assertion (see :func:`assert_gradients_close`)."""
    return check_gradients(f, params, grads, raise_on_failure=True, **options)
