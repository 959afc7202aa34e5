"""Gradient check: numerical differences against backprop, parameter by parameter.

The book's chapter 5 check, made into a report: for each parameter the largest
absolute and relative difference, the worst element, and a pass/fail against
a tolerance that depends on the precision of the analytic gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastgrad.backends._base import PARAM_NAMES
from fastgrad.models import TwoLayerNet

__all__ = ["GradientCheckReport", "ParameterCheck", "gradient_check"]

# Absolute tolerance by the dtype of the analytic gradient. In float64 the
# numerical side errs by ~h²·|f'''| ≈ 1e-10 (truncation) plus ~eps·|f|/h ≈ 1e-12
# (rounding), so 1e-9 leaves room without hiding a wrong backprop. A float32
# backprop is itself only good to ~eps32 times the size of the sums behind it.
DEFAULT_TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}


@dataclass(frozen=True)
class ParameterCheck:
    """How one parameter's numerical and analytic gradients compare."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    worst_index: tuple[int, ...]
    analytic: float
    numerical: float
    passed: bool


@dataclass(frozen=True)
class GradientCheckReport:
    """The outcome of :func:`gradient_check`; ``str(report)`` is a table."""

    parameters: tuple[ParameterCheck, ...]
    tolerance: float
    step: float
    dtype: str

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.parameters)

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.parameters)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [
            f"gradient check ({self.dtype}, h={self.step:g}, tolerance {self.tolerance:g} abs): "
            + ("PASS" if self.passed else "FAIL"),
            f"{'param':<6} {'max abs diff':>13} {'max rel diff':>13}  worst element",
        ]
        for check in self.parameters:
            lines.append(
                f"{check.name:<6} {check.max_abs_diff:>13.3e} {check.max_rel_diff:>13.3e}  "
                f"{check.name}{list(check.worst_index)}: analytic {check.analytic:.10g}, "
                f"numerical {check.numerical:.10g}" + ("" if check.passed else "  <- FAIL")
            )
        return "\n".join(lines)


def gradient_check(
    net: TwoLayerNet,
    x: Any,
    t: Any,
    *,
    tolerance: float | None = None,
    h: float = 1e-4,
    method: str = "fast",
) -> GradientCheckReport:
    """Compare ``net.numerical_gradient`` with ``net.gradient`` on ``(x, t)``.

    The numerical side is computed in float64 whatever the net's dtype.
    ``tolerance`` (absolute, per element) defaults to 1e-9 for float64 nets and
    1e-5 for float32.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> net = fastgrad.TwoLayerNet(6, 4, 3, seed=1)
    >>> x = np.random.default_rng(0).random((8, 6))
    >>> report = fastgrad.gradient_check(net, x, np.arange(8) % 3)
    >>> report.passed
    True
    """
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE[net.dtype]
    X, labels = net.prepare(x, t)
    backend = net.backend
    numerical = net.numerical_gradient_float64(X, labels, method, h)
    analytic = backend.two_layer_gradient(net.params, X, labels)[1]
    checks = []
    for name in PARAM_NAMES:
        expected = backend.to_numpy(analytic[name]).astype(np.float64)
        found = backend.to_numpy(numerical[name]).astype(np.float64)
        abs_diff = np.abs(found - expected)
        worst = np.unravel_index(int(np.argmax(abs_diff)), abs_diff.shape)
        # Relative to the larger magnitude, floored so that zero gradients
        # do not turn rounding noise into huge relative errors.
        scale = np.maximum(np.maximum(np.abs(found), np.abs(expected)), 1e-8)
        max_abs = float(abs_diff.max())
        checks.append(
            ParameterCheck(
                name=name,
                max_abs_diff=max_abs,
                max_rel_diff=float((abs_diff / scale).max()),
                worst_index=tuple(int(i) for i in worst),
                analytic=float(expected[worst]),
                numerical=float(found[worst]),
                passed=max_abs <= tolerance,
            )
        )
    return GradientCheckReport(tuple(checks), float(tolerance), float(h), net.dtype.name)
