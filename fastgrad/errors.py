"""The exceptions and warnings fastgrad raises on purpose.

Every error a user can cause has its own class here so that callers can catch
exactly what they mean to, and tests can check that the right one is raised.
"""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is unknown or cannot run on this machine.

    The message names the reason (unknown name, package not installed, no
    device) and, where one exists, the ``pip install`` extra that fixes it.
    """


class GradientCheckError(AssertionError):
    """A gradient check failed; :attr:`report` is the full :class:`~fastgrad.GradientCheckReport`.

    An ``AssertionError``, so that pytest shows it as a failed assertion with
    the report's table as its message.
    """

    def __init__(self, report: object) -> None:
        super().__init__(str(report))
        self.report = report


class PrecisionWarning(UserWarning):
    """A computation runs in a precision too coarse for a reliable answer.

    Raised for numerical gradients of float32 arrays: with the book's step
    ``h = 1e-4`` the rounding error of float32 dominates the difference.
    """


class SlowPathWarning(UserWarning):
    """A backend cannot accelerate this call and runs the reference code instead.

    The warning names why (for example, a plain Python function given to the
    Numba backend's black-box numerical gradient) so nothing falls back silently.
    """
