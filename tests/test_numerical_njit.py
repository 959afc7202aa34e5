"""The black-box numerical gradient's contract for a compiled (``@njit``) ``f``, on every backend.

The Numba backend runs a compiled ``f`` in parallel threads, each on its own
copy of ``x``; everything the reference loop refuses must still be refused
there, with the reference's error: an exception ``f`` raises (plain and
batched), a non-finite value, an ``f`` that writes to its argument, a
difference beyond the dtype. The NumPy backend calls the same compiled ``f``
from its loop, so each test also pins the reference's behaviour, and the
messages are compared across the two. The caller's ``x`` is checked intact
after every call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad.errors import PrecisionWarning

numba = pytest.importorskip("numba")


@pytest.fixture
def host_backend(backend: fastgrad.Backend) -> fastgrad.Backend:
    """Each backend of host arrays: a compiled ``f`` takes NumPy arrays only."""
    if backend.array_family != "numpy":
        pytest.skip(f"an @njit f takes NumPy arrays, not {backend.name} ones")
    return backend


def message_of(call: Callable[[], Any], kind: type[Exception]) -> str:
    with pytest.raises(kind) as caught:
        call()
    return str(caught.value)


def same_error_everywhere(
    call: Callable[[fastgrad.Backend], Any],
    backend: fastgrad.Backend,
    kind: type[Exception],
    pattern: str,
) -> str:
    """``call(backend)`` raises ``kind`` matching ``pattern``, with the reference's message."""
    message = message_of(lambda: call(backend), kind)
    assert re.search(pattern, message), message
    reference = message_of(lambda: call(fastgrad.get_backend("numpy")), kind)
    assert message == reference
    return message


# ------------------------------------------------------------ compiled fs
@numba.njit
def raises_past_half(a):
    flat = a.reshape(a.size)
    for k in range(flat.size):
        if flat[k] > 0.5:
            raise ValueError("f cannot take values above 0.5")
    return (flat**2).sum()


@numba.njit
def raises_below_element_value(a):
    # raises only when element 5 moves down: the x - h evaluation
    flat = a.reshape(a.size)
    if flat[5] < 5.0:
        raise ZeroDivisionError("moved down at element 5")
    return (flat**2).sum()


@numba.njit
def stack_raises_past_half(stack):
    out = np.empty(stack.shape[0])
    for r in range(stack.shape[0]):
        row = stack[r].reshape(stack[r].size)
        for k in range(row.size):
            if row[k] > 0.5:
                raise ValueError("batched f cannot take values above 0.5")
        out[r] = (row**2).sum()
    return out


@numba.njit
def doubling(a):
    a *= 2.0
    return a.sum()


@numba.njit
def writes_far_away_once(a):
    # while element 3 is moved, element size-1 is changed (and left changed)
    flat = a.reshape(a.size)
    if flat[3] != 3.0:
        flat[flat.size - 1] = -7.0
    return (flat**2).sum()


@numba.njit
def borrowing(a):
    flat = a.reshape(a.size)
    saved = flat.copy()
    flat[:] = 0.0
    flat[:] = saved
    return (flat**2).sum()


@numba.njit
def base_call_writes(a):
    # forward differences: the unperturbed call, the only one with a[0] == 1
    if a[0] == 1.0:
        a[1] = 5.0
    return a.sum()


@numba.njit
def nan_when_second_moves(a):
    if a[1] != -1.0:
        return np.nan
    return (a**2).sum()


@numba.njit
def inf_when_second_moves(a):
    if a[1] != -1.0:
        return np.inf
    return (a**2).sum()


@numba.njit
def steep(a):
    return 1e40 * np.float64(a[0])


@numba.njit
def squares(a):
    return (a**2).sum()


@numba.njit
def stack_squares_then_scribble(stack):
    out = np.empty(stack.shape[0])
    for r in range(stack.shape[0]):
        out[r] = (stack[r] ** 2).sum()
    stack -= 1.0  # its own argument: the -h stack is rebuilt from x
    return out


@numba.njit
def stack_first_column(stack):
    return stack[:, 0]  # a view of its argument, which the -h stack overwrites


@numba.njit
def stack_nan_in_third_row(stack):
    out = np.empty(stack.shape[0])
    for r in range(stack.shape[0]):
        out[r] = (stack[r] ** 2).sum()
    if out.shape[0] == 3:
        out[2] = np.nan
    return out


@numba.njit
def stack_one_short(stack):
    return np.zeros(stack.shape[0] - 1)


def gradient(backend, f, x, **options):
    return fastgrad.numerical_gradient(f, x, backend=backend, **options)


# --------------------------------------------------------- exceptions of f
@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("where", [0, 37], ids=["first-element", "a-later-chunk"])
def test_an_exception_of_f_is_raised_not_turned_into_numbers(host_backend, method, where):
    x = np.linspace(-0.4, 0.4, 40)
    x[where] = 0.49996  # moved by +h past 0.5, for this element only
    before = x.copy()
    with pytest.raises(ValueError, match=r"^f cannot take values above 0\.5$"):
        gradient(host_backend, raises_past_half, x, method=method, h=1e-4)
    np.testing.assert_array_equal(x, before)


def test_an_exception_in_the_minus_evaluation_is_raised(host_backend):
    x = np.arange(20.0)
    with pytest.raises(ZeroDivisionError, match=r"^moved down at element 5$"):
        gradient(host_backend, raises_below_element_value, x)
    np.testing.assert_array_equal(x, np.arange(20.0))


@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_an_exception_of_a_batched_f_is_raised(host_backend, method, chunk_size):
    x = np.linspace(-0.4, 0.4, 30).reshape(5, 6)
    x[4, 2] = 0.49996
    before = x.copy()
    with pytest.raises(ValueError, match=r"^batched f cannot take values above 0\.5$"):
        gradient(
            host_backend,
            stack_raises_past_half,
            x,
            method=method,
            batched=True,
            chunk_size=chunk_size,
        )
    np.testing.assert_array_equal(x, before)


def test_an_exception_of_f_at_x_itself_is_raised_in_forward_mode(host_backend):
    x = np.array([0.1, 0.7, 0.2])
    for batched, f in ((False, raises_past_half), (True, stack_raises_past_half)):
        with pytest.raises(ValueError, match=r"cannot take values above 0\.5"):
            gradient(host_backend, f, x, method="forward", batched=batched)
    np.testing.assert_array_equal(x, [0.1, 0.7, 0.2])


# ------------------------------------------------------ an f that writes x
def test_an_f_that_scales_its_argument_is_an_error(host_backend):
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    same_error_everywhere(
        lambda backend: gradient(backend, doubling, x),
        host_backend,
        RuntimeError,
        r"^f\(x \+ h\) changed x: x\[0, 0\] holds 2\.0002 after the call, but "
        r"numerical_gradient had set it to 1\.0001; ",
    )
    np.testing.assert_array_equal(x, [[1.0, 2.0], [3.0, 4.0]])


def test_an_f_that_changes_another_element_once_is_an_error(host_backend):
    x = np.arange(1000.0)
    # ceil(1000 / 256) = 4: the whole of x is compared after every 4 elements
    same_error_everywhere(
        lambda backend: gradient(backend, writes_far_away_once, x),
        host_backend,
        RuntimeError,
        r"^f at x\[3\] changed x: x\[999\] held -7\.0 but 999\.0 before numerical_gradient "
        "started; f must not write",
    )
    np.testing.assert_array_equal(x, np.arange(1000.0))


def test_an_f_that_changes_its_argument_transiently_is_fine(host_backend):
    x = np.array([1.0, 2.0, 3.0])
    grad = gradient(host_backend, borrowing, x)
    np.testing.assert_allclose(grad, [2.0, 4.0, 6.0], rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])


def test_an_f_that_writes_at_x_in_forward_mode_is_an_error(host_backend):
    x = np.array([1.0, 2.0])
    same_error_everywhere(
        lambda backend: gradient(backend, base_call_writes, x, method="forward"),
        host_backend,
        RuntimeError,
        r"^f\(x\) changed x: x\[1\] held 5\.0 but 2\.0 before numerical_gradient started",
    )
    np.testing.assert_array_equal(x, [1.0, 2.0])


# ------------------------------------------------------- values of f
@pytest.mark.parametrize(
    "f, shown",
    [(nan_when_second_moves, "NaN"), (inf_when_second_moves, "inf")],
    ids=["nan", "inf"],
)
def test_nonfinite_values_of_f_are_refused_naming_the_element(host_backend, f, shown):
    x = np.array([0.5, -1.0, 2.0])
    same_error_everywhere(
        lambda backend: gradient(backend, f, x),
        host_backend,
        ValueError,
        rf"^f\(x \+ h\) at index \[1\] returned {shown}",
    )
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])


def test_a_difference_beyond_float32_is_refused(host_backend):
    x = np.array([1.0, 2.0], dtype=np.float32)
    with pytest.warns(PrecisionWarning):
        message = message_of(lambda: gradient(host_backend, steep, x), ValueError)
    assert message.startswith(
        "the numerical gradient is 1e+40 at index [0], beyond the range of float32"
    ), message
    np.testing.assert_array_equal(x, [1.0, 2.0])


def test_a_non_contiguous_x_is_read_not_written(host_backend):
    storage = np.arange(12.0).reshape(3, 4)
    x = storage[:, ::2]  # a strided view
    grad = gradient(host_backend, squares, x)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-8)
    np.testing.assert_array_equal(storage, np.arange(12.0).reshape(3, 4))


# ------------------------------------------------------------- batched f
@pytest.mark.parametrize("method", ["central", "forward"])
def test_a_batched_f_may_write_to_or_return_a_view_of_its_argument(host_backend, method):
    x = np.array([1.0, 2.0, 3.0])
    grad = gradient(host_backend, stack_squares_then_scribble, x, method=method, batched=True)
    np.testing.assert_allclose(grad, [2.0, 4.0, 6.0], rtol=1e-3)
    first_column = gradient(host_backend, stack_first_column, x, method=method, batched=True)
    np.testing.assert_allclose(first_column, [1.0, 0.0, 0.0], atol=1e-9)
    # the forward base row too is a copy: the caller's x is never handed to f
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])


def test_nonfinite_values_of_a_batched_f_are_refused(host_backend):
    x = np.array([0.5, -1.0, 2.0])
    same_error_everywhere(
        lambda backend: gradient(backend, stack_nan_in_third_row, x, batched=True, chunk_size=3),
        host_backend,
        ValueError,
        r"^batched f returned nan for the element at flat index 2; ",
    )
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])


def test_a_batched_f_returning_the_wrong_length_is_refused(host_backend):
    x = np.array([0.5, -1.0, 2.0])
    same_error_everywhere(
        lambda backend: gradient(backend, stack_one_short, x, batched=True, chunk_size=3),
        host_backend,
        ValueError,
        re.escape("batched f must map an array of shape (3, 3) to shape (3,), got (2,)"),
    )
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])
