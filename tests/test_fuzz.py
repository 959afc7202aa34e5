"""Random shapes, dtypes and values into the public functions: a right answer or a documented error.

Hypothesis draws arrays of float16/32/64, integers, booleans and complex
numbers, of any rank up to 3 with sides from 0 (empty) to 5, and now and
then a huge one (up to 2**17 elements); their values include NaN,
infinities, subnormals and magnitudes near the dtype's limits. Each test
predicts, from the rules in :mod:`fastgrad._validation` alone, which error
(type and message) the call must raise, if any, and otherwise compares the
result with a NumPy reference computed here in extended precision. Those are
the only two outcomes allowed; anything else (a wrong number, a NaN result,
a RuntimeWarning, an internal exception) fails.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastgrad
from fastgrad.errors import PrecisionWarning
from tests.conftest import to_host

FLOATS = [np.float16, np.float32, np.float64]
# Floating point twice as often as the dtypes that are refused outright.
DTYPES = [*FLOATS, *FLOATS, np.int64, np.bool_, np.complex128]

# The reference precision: wider than float64 where the platform has it
# (x86's 80-bit long double), so that it does not overflow where float64 does.
WIDE = np.longdouble
WIDE_IS_WIDER = float(np.log10(np.finfo(WIDE).max)) > 400

# FASTGRAD_FUZZ_EXAMPLES=2000 for a longer hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("FASTGRAD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Expected(Exception):
    """The error a call must raise: its type and a regular expression for its message."""

    def __init__(self, kind: type[Exception], pattern: str) -> None:
        super().__init__(pattern)
        self.kind = kind
        self.pattern = pattern
        # Shown by --hypothesis-show-statistics: how often each rule decided.
        event(f"refused: {kind.__name__} {pattern[:40]}")


# ---------------------------------------------------------------- strategies
def element_strategy(dtype: Any, special: bool) -> st.SearchStrategy:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        width = dtype.itemsize * 8
        limit = float(np.finfo(dtype).max)
        if special:
            return st.floats(width=width, allow_nan=True, allow_infinity=True)
        # Mostly moderate values, sometimes huge ones, sometimes subnormals.
        return st.one_of(
            st.floats(-30, 30, width=width),
            st.floats(-limit, limit, width=width),
            st.floats(-1e-300, 1e-300, width=width) if width == 64 else st.just(0.0),
        )
    if dtype.kind == "c":
        return st.complex_numbers(max_magnitude=10, allow_nan=False, allow_infinity=False)
    if dtype.kind == "b":
        return st.booleans()
    return st.integers(-5, 5)


@st.composite
def arrays(
    draw: st.DrawFn, min_dims: int = 0, max_dims: int = 3, dtypes: list[Any] = DTYPES
) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    special = draw(st.booleans())
    if draw(st.integers(0, 15)) == 0:
        # A huge array: a fill value and a few drawn elements at drawn places.
        size = draw(st.integers(10_000, 2**17))
        fill = draw(element_strategy(dtype, False))
        array = np.full(size, fill, dtype=dtype)
        for _ in range(draw(st.integers(0, 3))):
            array[draw(st.integers(0, size - 1))] = draw(element_strategy(dtype, special))
        return array.reshape(-1, 8) if min_dims == 2 and size % 8 == 0 else array
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape, elements=element_strategy(dtype, special)))


# ------------------------------------------------------------------ the rules
def first_nonfinite(array: np.ndarray) -> tuple[int, ...] | None:
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return None
    return tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])


def refuse_nonfinite(array: np.ndarray, name: str) -> None:
    index = first_nonfinite(array)
    if index is not None:
        at = f" at index {list(index)}" if index else ""
        value = re.escape(str(float(array[index])))
        raise Expected(ValueError, rf"^{re.escape(name)} holds {value}{re.escape(at)}; ")


def refuse_complex(array: np.ndarray, name: str) -> None:
    if array.dtype.kind == "c":
        raise Expected(TypeError, rf"^{name} is complex \({array.dtype}\)")


def refuse_non_float(array: np.ndarray, name: str) -> None:
    refuse_complex(array, name)
    if array.dtype.kind != "f":
        raise Expected(TypeError, rf"^{name} must be a floating-point array, got dtype")


def outcome(call: Callable[[], Any], rules: Callable[[], Any]) -> tuple[Any, Expected | None]:
    """Run ``call``; check it against ``rules`` (which raise the Expected error, or return)."""
    try:
        reference = rules()
        expected = None
    except Expected as error:
        reference, expected = None, error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # documented, checked elsewhere
        if expected is not None:
            with pytest.raises(expected.kind, match=expected.pattern):
                call()
            return None, expected
        return call(), None
    return reference, expected  # pragma: no cover


def tolerance(dtype: Any) -> float:
    return {2: 4e-3, 4: 3e-5, 8: 1e-13}[np.dtype(dtype).itemsize]


# ----------------------------------------------------------------- references
def wide(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(WIDE)


def sigmoid_reference(x: np.ndarray) -> np.ndarray:
    z = wide(x)
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def softmax_reference(x: np.ndarray) -> np.ndarray:
    z = wide(x)
    shifted = z - z.max(axis=-1, keepdims=True)
    with np.errstate(under="ignore"):
        e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "sigmoid": (fastgrad.sigmoid, sigmoid_reference),
    "sigmoid_grad": (
        fastgrad.sigmoid_grad,
        lambda x: sigmoid_reference(x) * (1 - sigmoid_reference(x)),
    ),
    "relu": (fastgrad.relu, lambda x: np.maximum(wide(x), 0)),
    "identity": (fastgrad.identity, wide),
    "softmax": (fastgrad.softmax, softmax_reference),
}


# ---------------------------------------------------------------- activations
@FUZZ
@given(x=arrays(), name=st.sampled_from(sorted(ACTIVATIONS)))
def test_activations(backend, x, name):
    function, reference = ACTIVATIONS[name]
    before = x.copy()

    def rules() -> np.ndarray:
        refuse_complex(x, "x")
        refuse_nonfinite(x, "x")
        if name == "softmax" and x.ndim == 0:
            raise Expected(ValueError, "softmax needs at least one axis")
        if name == "softmax" and x.shape[-1] == 0:
            raise Expected(ValueError, "a softmax needs at least one class")
        return reference(x)

    got, expected = outcome(lambda: function(backend.asarray(x), backend=backend), rules)
    np.testing.assert_array_equal(x, before)
    if expected is not None:
        return
    got = to_host(backend, got)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    assert got.dtype == dtype and got.shape == x.shape
    want = rules()
    scale = 1.0 if name not in ("relu", "identity") else np.abs(want).max(initial=0) + 1
    if name in ("relu", "identity"):
        np.testing.assert_array_equal(got, want.astype(dtype))
    else:
        np.testing.assert_allclose(
            got.astype(WIDE), want, rtol=0, atol=tolerance(dtype) * scale * (x.shape[-1:] or [1])[0]
        )


# --------------------------------------------------------------------- losses
@st.composite
def loss_cases(draw: st.DrawFn) -> tuple[str, np.ndarray, Any]:
    loss = draw(
        st.sampled_from(["mean_squared_error", "cross_entropy_error", "softmax_cross_entropy"])
    )
    y = draw(arrays(min_dims=1, max_dims=3 if draw(st.integers(0, 9)) == 0 else 2))
    if loss == "cross_entropy_error" and y.dtype.kind == "f" and draw(st.booleans()):
        y = np.abs(y)  # mostly probabilities: the function refuses negative ones
    classes = y.shape[-1] if y.ndim else 1
    batch = y.shape[0] if y.ndim == 2 else 1
    kind = draw(st.sampled_from(["labels", "onehot", "same-shape", "other"]))
    if kind == "labels":
        shape = (batch,) if y.ndim == 2 else ()
        t = np.asarray(draw(hnp.arrays(np.int64, shape, elements=st.integers(-1, classes))))
    elif kind == "onehot" and classes:
        picks = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, classes - 1)))
        t = np.zeros((batch, classes))
        t[np.arange(batch), picks] = 1.0
        t = t.reshape(y.shape) if t.size == y.size else t
    elif kind == "same-shape":
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        elements = element_strategy(dtype, draw(st.booleans()))
        t = draw(hnp.arrays(dtype, y.shape, elements=elements))
    else:
        t = np.zeros(draw(st.integers(0, 3)), dtype=np.int64)
    return loss, y, t


def cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` in the loss's dtype, as fastgrad casts targets (inf beyond its range)."""
    with np.errstate(over="ignore"):
        return array.astype(dtype)


def loss_rules(loss: str, y: np.ndarray, t: np.ndarray) -> Any:
    """The outcome of ``loss(y, t)``: an Expected error, or the reference value (wide)."""
    refuse_non_float(y, "logits" if loss == "softmax_cross_entropy" else "y")
    name = "logits" if loss == "softmax_cross_entropy" else "y"
    computed = np.dtype(np.float32) if y.dtype.itemsize < 4 else y.dtype
    if loss == "mean_squared_error":
        refuse_complex(t, "t")
        if t.shape != y.shape:
            raise Expected(ValueError, "y and t must have the same shape")
        if y.size == 0:
            raise Expected(ValueError, r"^y is empty")
        refuse_nonfinite(y, "y")
        refuse_nonfinite(t, "t")
        if t.dtype != computed:
            refuse_nonfinite(cast(t, computed), f"t (as {computed.name})")
        terms = (wide(y.astype(computed)) - wide(cast(t, computed))) ** 2
        return 0.5 * terms.sum(), terms, computed, None
    if y.ndim not in (1, 2):
        raise Expected(ValueError, rf"^{name} must be 1-D \(one sample\) or 2-D")
    Y = y.reshape(1, -1) if y.ndim == 1 else y
    if Y.shape[1] == 0:
        raise Expected(ValueError, rf"^{name} has shape .*: no classes")
    if Y.shape[0] == 0:
        raise Expected(ValueError, rf"^{name} is empty")
    refuse_nonfinite(y, name)
    refuse_complex(t, "t")
    if t.shape == y.shape:
        if t.dtype.kind == "b":
            raise Expected(TypeError, "t must be numeric one-hot targets")
        refuse_nonfinite(t, "t")
        if t.dtype != computed:
            refuse_nonfinite(cast(t, computed), f"t (as {computed.name})")
        T = wide(cast(t.reshape(Y.shape), computed))
    elif t.shape == (() if y.ndim == 1 else (Y.shape[0],)) or (y.ndim == 1 and t.shape == (1,)):
        if t.dtype.kind not in "iu":
            raise Expected(TypeError, "t must hold integer class labels")
        labels = t.reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= Y.shape[1]):
            raise Expected(ValueError, r"^t holds label -?\d+, out of range")
        T = np.zeros(Y.shape, dtype=WIDE)
        T[np.arange(Y.shape[0]), labels] = 1
    else:
        raise Expected(ValueError, r"^t has shape .* which fits neither")
    Z = wide(Y.astype(computed))
    if loss == "cross_entropy_error":
        if (Y < 0).any():
            raise Expected(ValueError, "y holds negative values")
        log = np.log(Z + WIDE(np.float64(1e-7).astype(computed)))
    else:
        shifted = Z - Z.max(axis=1, keepdims=True)
        log = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        spread = float(np.abs(shifted).max())
    with np.errstate(over="ignore", invalid="ignore"):
        terms = np.where(T == 0, 0, T * log)
        value = -terms.sum() / Y.shape[0]
    return value, terms, computed, spread if loss == "softmax_cross_entropy" else None


@FUZZ
@given(case=loss_cases())
def test_losses(backend, case):
    loss, y, t = case
    function = getattr(fastgrad, loss)
    before = (y.copy(), np.array(t, copy=True))

    def call() -> Any:
        return function(backend.asarray(y), backend.asarray(t), backend=backend)

    try:
        value, terms, computed, spread = loss_rules(loss, y, t)
    except Expected as expected:
        with pytest.raises(expected.kind, match=expected.pattern):
            call()
        value = None
    finally:
        np.testing.assert_array_equal(y, before[0])
        np.testing.assert_array_equal(t, before[1])
    if value is None:
        return
    limit = float(np.finfo(computed).max)
    # Where the result or an intermediate is out of the dtype's range, the
    # documented outcome is an "overflows" ValueError; elsewhere a value.
    largest_term = float(np.abs(terms).max(initial=0))
    may_overflow = (
        not WIDE_IS_WIDER
        or abs(float(value)) > limit / 4
        or largest_term > limit / 4
        or (spread is not None and spread > limit / 4)
        or max(np.abs(y.astype(np.float64)).max(initial=0), 0) > limit / 4
    )
    try:
        got = call()
    except ValueError as error:
        assert may_overflow, f"{error} for y={y!r}, t={t!r}"
        assert re.match(rf"^{loss} overflows {computed.name}", str(error)), str(error)
        return
    np.testing.assert_array_equal(y, before[0])
    np.testing.assert_array_equal(t, before[1])
    assert isinstance(got, float) and np.isfinite(got)
    if not may_overflow:
        # A few ulp of the largest term per term, and for logits of the largest
        # logit: the shift by the row maximum is backward stable, not exact.
        magnitude = float(np.abs(y).max()) if loss == "softmax_cross_entropy" else 0.0
        bound = 8 * tolerance(computed) * (largest_term + magnitude + 1) * max(terms.size, 1)
        assert abs(WIDE(got) - value) <= bound, (got, value)


# --------------------------------------------------------- numerical gradients
def _weighted_sine(a):
    """``sum(sin(a) * linspace(-1, 1, a.size))``, as the Python ``f`` below; compiled."""
    flat = a.reshape(a.size)
    weights = np.linspace(-1.0, 1.0, flat.size)
    return (np.sin(flat.astype(np.float64)) * weights).sum()


def _weighted_sine_rows(stack):
    rows = stack.reshape(stack.shape[0], -1)
    weights = np.linspace(-1.0, 1.0, rows.shape[1])
    out = np.empty(rows.shape[0])
    for r in range(rows.shape[0]):
        out[r] = (np.sin(rows[r].astype(np.float64)) * weights).sum()
    return out


try:
    import numba
except ImportError:  # the compiled f is drawn only where Numba is installed
    COMPILED = None
else:
    # The Numba backend runs these in its parallel threads, each on its own copy of x.
    COMPILED = (numba.njit(_weighted_sine), numba.njit(_weighted_sine_rows))


@FUZZ
@given(
    x=arrays(max_dims=2),
    h=st.sampled_from([1e-4, 1e-2, 0.5, 1e-9, 1e-30, 1e5]),
    method=st.sampled_from(["central", "forward"]),
    batched=st.booleans(),
    compiled=st.booleans() if COMPILED else st.just(False),
)
def test_numerical_gradient(backend, x, h, method, batched, compiled):
    # A compiled f takes host arrays of the types Numba knows (no float16).
    assume(not compiled or (backend.array_family == "numpy" and x.dtype != np.float16))
    if x.size > 2000:
        x = x.reshape(-1)[:2000]  # one call of f per element: keep it quick
    weights = np.linspace(-1.0, 1.0, x.size).reshape(x.shape)
    before = x.copy()

    def python_f(a: np.ndarray) -> Any:
        values = np.sin(a.astype(np.float64)) * weights
        if batched:
            return values.reshape(len(a), -1).sum(axis=1)
        return float(values.sum())

    f = python_f if not compiled else COMPILED[1] if batched else COMPILED[0]

    def rules() -> np.ndarray:
        refuse_complex(x, "x")
        if x.dtype.kind != "f":
            raise Expected(TypeError, "numerical_gradient needs a floating-point x")
        refuse_nonfinite(x, "x")
        with np.errstate(over="ignore"):
            step = x.dtype.type(h)
        if not np.isfinite(step) or step == 0:
            raise Expected(ValueError, rf"h={h} is not representable in {x.dtype.name}")
        with np.errstate(over="ignore"):
            plus, minus = x + step, x - step
        if not (np.isfinite(plus) & np.isfinite(minus)).all():
            raise Expected(ValueError, rf"h={h} moves x.* beyond the range of {x.dtype.name}")
        if x.size and ((plus == x) | (minus == x)).any():
            raise Expected(ValueError, re.escape(f"h={h} is too small for {x.dtype.name} x"))
        # The documented differences: x moved by ±h in its own dtype.
        grad = np.zeros(x.shape, dtype=np.float64)
        flat = x.reshape(-1)
        base = np.sin(x.astype(np.float64)) * weights
        for k in range(x.size):
            plus, minus = flat.copy(), flat.copy()
            plus[k] += step
            minus[k] -= step
            f_plus = float((np.sin(plus.astype(np.float64)) * weights.reshape(-1)).sum())
            if method == "central":
                f_minus = float((np.sin(minus.astype(np.float64)) * weights.reshape(-1)).sum())
                grad.reshape(-1)[k] = (f_plus - f_minus) / (2 * h)
            else:
                grad.reshape(-1)[k] = (f_plus - float(base.sum())) / h
        return grad

    call = lambda: fastgrad.numerical_gradient(  # noqa: E731
        f, backend.asarray(x), h, method=method, batched=batched, backend=backend
    )
    got, expected = outcome(call, rules)
    np.testing.assert_array_equal(x, before)
    if expected is not None:
        return
    got = to_host(backend, got)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = rules()
    # Summation order differs between the batched and the plain f: a few ulp
    # of f's magnitude, divided by the step.
    slack = 16 * x.size * np.finfo(np.float64).eps * (np.abs(weights).sum() + 1) / h
    np.testing.assert_allclose(
        got.astype(np.float64),
        want.astype(x.dtype).astype(np.float64),
        rtol=tolerance(x.dtype),
        atol=slack + float(np.finfo(x.dtype).tiny),
    )


# ------------------------------------------------------------ gradient checks
@FUZZ
@given(params=arrays(), as_dict=st.booleans())
def test_check_gradients(backend, params, as_dict):
    if params.size > 200:
        params = params.reshape(-1)[:200]  # four losses per element: keep it quick
    before = params.copy()
    xp = backend.xp
    w = backend.asarray(params.copy())
    name = "params['w']" if as_dict else "params"

    def f() -> float:
        return float(xp.sum(xp.sin(w.astype(np.float64))))

    analytic_host = np.zeros(params.shape)
    if params.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # non-finite params are refused first
            analytic_host = np.nan_to_num(np.cos(params.astype(np.float64)))
    analytic = backend.asarray(analytic_host)

    def rules() -> None:
        if params.dtype.kind != "f":
            raise Expected(TypeError, rf"^{re.escape(name)} has dtype .*floating-point arrays")
        if params.size == 0:
            raise Expected(ValueError, rf"^{re.escape(name)} is empty")
        refuse_nonfinite(params, name)

    def call() -> Any:
        if as_dict:
            return fastgrad.check_gradients(f, {"w": w}, {"w": analytic})
        return fastgrad.check_gradients(f, w, analytic)

    try:
        rules()
    except Expected as expected:
        with pytest.raises(expected.kind, match=expected.pattern):
            call()
        np.testing.assert_array_equal(to_host(backend, w), before)
        return
    moderate = float(np.abs(params).max()) <= 1e3
    try:
        report = call()
    except ValueError as error:
        # Near the dtype's limits a step moves an element to infinity, or
        # rounds to nothing: documented errors naming the element.
        assert not moderate, str(error)
        assert re.search(
            r"returned (nan|inf|-inf) at params|rounds to nothing|beyond the range", str(error)
        ), str(error)
    else:
        assert report.passed or not moderate, str(report)
    np.testing.assert_array_equal(to_host(backend, w), before)  # restored bytewise


class _IgnoresItsBatch:
    """A hand-written model whose loss does not depend on ``x`` or ``t``."""

    def __init__(self) -> None:
        self.params = {"w": np.array([0.5, -1.0])}

    def loss(self, x: Any, t: Any) -> float:
        return float(np.sum(np.sin(self.params["w"])))

    def gradient(self, x: Any, t: Any) -> dict[str, np.ndarray]:
        return {"w": np.cos(self.params["w"])}


@FUZZ
@given(x=arrays(), t=arrays())
def test_gradient_check_of_a_hand_written_model(x, t):
    before = (x.copy(), t.copy())

    def rules() -> None:
        # Floating-point batches are checked like every input; the rest is the model's.
        refuse_nonfinite(x, "x")
        refuse_nonfinite(t, "t")

    got, expected = outcome(lambda: fastgrad.gradient_check(_IgnoresItsBatch(), x, t), rules)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(t, before[1])
    if expected is None:
        assert got.passed


# ----------------------------------------------------------------- the models
@st.composite
def model_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 4)) for _ in range(depth + 1)]
    activation = draw(st.sampled_from(["sigmoid", "relu", "tanh", "identity"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if draw(st.integers(0, 3)):
        # Mostly a batch (or one sample) of the right width.
        dtype_x = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = draw(st.sampled_from([(draw(st.integers(0, 5)), sizes[0]), (sizes[0],)]))
        elements = element_strategy(dtype_x, draw(st.booleans()))
        x = draw(hnp.arrays(dtype_x, shape, elements=elements))
    else:
        x = draw(arrays(min_dims=1, max_dims=2))
    batch = x.shape[0] if x.ndim == 2 else 1
    if draw(st.booleans()):
        t = np.asarray(draw(hnp.arrays(np.int64, (batch,), elements=st.integers(-1, sizes[-1]))))
    else:
        t = draw(
            hnp.arrays(np.float64, (batch, sizes[-1]), elements=st.sampled_from([0.0, 1.0, np.nan]))
        )
    method = draw(st.sampled_from(["predict", "loss", "accuracy", "gradient"]))
    return sizes, activation, dtype, x, t, method


@FUZZ
@given(case=model_cases())
def test_models(backend, case):
    from tests import naive

    sizes, activation, dtype, x, t, method = case
    net = fastgrad.MultiLayerNet(
        sizes[0], sizes[1:-1], sizes[-1], activation, seed=0, dtype=dtype, backend=backend
    )
    before = (x.copy(), t.copy())
    host = [backend.to_numpy(net.params[name]).astype(np.float64) for name in net.params]
    weights, biases = host[0::2], host[1::2]
    limit = float(np.finfo(dtype).max)

    def rules() -> tuple[np.ndarray, np.ndarray | None]:
        refuse_non_float(x, "x")
        X = x.reshape(1, -1) if x.ndim == 1 else x
        labels = None
        if X.ndim != 2 or X.shape[1] != sizes[0]:
            raise Expected(ValueError, rf"^x must have shape \(N, {sizes[0]}\)")
        refuse_nonfinite(x, "x")
        with np.errstate(over="ignore"):
            refuse_nonfinite(x.astype(dtype), f"x (as {np.dtype(dtype).name})")
        if method != "predict":
            if X.shape[0] == 0:
                raise Expected(ValueError, r"^x is empty")
            T = t.reshape(1, -1) if x.ndim == 1 and t.size == sizes[-1] else t
            if x.ndim == 1 and T.ndim == 1:
                T = T.reshape(1)
            if T.ndim == 1:
                if T.size and (T.min() < 0 or T.max() >= sizes[-1]):
                    raise Expected(ValueError, r"^t holds label -?\d+, out of range")
                labels = T
            else:
                refuse_nonfinite(T, "t")
                if not (((T == 0) | (T == 1)).all() and (T.sum(axis=1) == 1).all()):
                    raise Expected(ValueError, "^t has rows that are not one-hot")
                labels = T.argmax(axis=1)
            if labels.shape[0] != X.shape[0]:
                raise Expected(ValueError, rf"^x holds {X.shape[0]} samples but t holds")
        return X, labels

    call = {
        "predict": lambda: net.predict(backend.asarray(x)),
        "loss": lambda: net.loss(backend.asarray(x), backend.asarray(t)),
        "accuracy": lambda: net.accuracy(backend.asarray(x), backend.asarray(t)),
        "gradient": lambda: net.gradient(backend.asarray(x), backend.asarray(t)),
    }[method]
    try:
        X, labels = rules()
        X = X.astype(dtype).astype(np.float64)
    except Expected as expected:
        with pytest.raises(expected.kind, match=expected.pattern):
            call()
        np.testing.assert_array_equal(x, before[0])
        np.testing.assert_array_equal(t, before[1])
        return
    huge = float(np.abs(X).max(initial=0)) > limit / 1e6
    try:
        got = call()
    except ValueError as error:
        assert huge, f"{error} for x={x!r}"
        assert re.search(rf"overflow {np.dtype(dtype).name} \(max \|x\| = ", str(error))
        return
    finally:
        np.testing.assert_array_equal(x, before[0])
        np.testing.assert_array_equal(t, before[1])
    if huge:
        return  # a finite answer is right there, but the float64 oracle may overflow
    logits = np.asarray(naive.multilayer_logits(weights, biases, X, activation))
    scale = np.abs(X).max(initial=0) + 1
    if method == "predict":
        np.testing.assert_allclose(
            to_host(backend, got).reshape(logits.shape), logits, rtol=1e-4, atol=1e-4 * scale
        )
    elif method == "loss":
        reference = naive.log_softmax_cross_entropy(logits, labels)
        assert got == pytest.approx(reference, rel=1e-4, abs=1e-4 * scale)
    elif method == "accuracy":
        assert 0.0 <= got <= 1.0
    else:
        assert all(np.isfinite(to_host(backend, grad)).all() for grad in got.values())
