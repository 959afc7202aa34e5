"""Gradient checks of any model: numerical differences against its own backprop.

For the person who has just written backprop by hand. Anything with the
book's protocol — ``params`` (a dict of arrays), ``loss(x, t)``,
``gradient(x, t)`` — is checked black-box by perturbing its ``params`` in
place (and restoring them bytewise, also when ``loss`` raises); fastgrad's
own models are checked with their structure-aware numerical kernel. Every
numerical value carries an error estimate, so the report tells "the
analytic gradient is wrong here" from "the numerical value is unreliable
here", and elements at a kink (a ReLU or ``max`` switching within the step)
are reported as non-differentiable rather than as failures. With ``client=``
the black-box element checks run in chunks on a Dask cluster
(:mod:`fastgrad.distributed`), and the report is the local one.

The rules, stated once:

* **Step.** Element ``θ`` of a parameter of dtype ``d`` moves by
  ``h = eps(d) ** (1/3) * max(1, |θ|)`` (``h=`` overrides it with one number);
  the difference quotient divides by the step actually taken after rounding.
* **Numerical value and error.** ``D(s) = (L(θ + s) - L(θ - s)) / 2s``; the
  value reported is ``D(h/2)`` and its error estimate
  ``|D(h) - D(h/2)| / 3`` (Richardson: the truncation error of ``D(h/2)``)
  plus the rounding floor ``eps·|L| / h``.
* **Pass.** An element passes when ``|analytic - numerical| <= atol + rtol *
  max(|analytic|, |numerical|) + error``. ``rtol`` defaults to 1e-6 for a
  float64 analytic gradient and 1e-3 for float32 (1e-1 for float16);
  ``atol`` to ``rtol`` times the parameter's largest gradient magnitude.
* **Kinks.** For a smooth loss the forward and backward one-sided
  differences at steps ``h`` and ``h/2`` bend alike (``g ± s·L''/2``), and
  their gap halves with the step. A kink (a ReLU or ``max`` switching)
  within the step breaks one of the two by at least a fifth of the jump in
  slope; an element where that mismatch exceeds its tolerance is reported as
  non-differentiable, and counted, not failed.
* **Modes.** ``"full"`` checks every element; ``"sampled"`` ``k`` seeded
  random elements per parameter plus its largest-magnitude gradient entries;
  ``"fast"`` compares, per parameter, directional derivatives along seeded
  random unit directions with ``u · grad`` (four losses a direction, whatever
  the size) and localises a failing parameter by checking its elements. The
  default is ``"full"`` for fastgrad's models and for models of at most
  100,000 parameters, else ``"fast"``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastgrad.errors import GradientCheckError

__all__ = [
    "GradientCheckReport",
    "ParameterCheck",
    "check_gradients",
    "gradient_check",
]

MODES = ("full", "sampled", "fast")
#: Largest model (in parameters) that a black-box check runs in ``"full"`` mode by default.
FULL_MODE_MAX_PARAMS = 100_000
#: Largest parameter that ``"fast"`` mode localises element by element; larger ones are sampled.
LOCALISE_FULL_MAX = 20_000
LOCALISE_SAMPLES = 500
#: Largest-magnitude gradient entries that ``"sampled"`` mode always includes.
TOP_ENTRIES = 3
#: Elements a structure-aware check re-examines one by one (to classify kinks).
REEXAMINE_MAX = 1_000


def _default_rtol(dtype: np.dtype) -> float:
    if dtype == np.float64:
        return 1e-6
    if dtype == np.float32:
        return 1e-3
    return 1e-1


# ---------------------------------------------------------------- the report
@dataclass(frozen=True)
class ParameterCheck:
    """How one parameter's numerical and analytic gradients compare.

    ``worst_index`` is the element with the largest difference beyond its
    tolerance (or the largest difference, when all pass); for a parameter
    checked only by directional derivatives it is ``()`` and ``analytic`` /
    ``numerical`` are the directional derivatives ``u · grad`` and
    ``(L(θ + εu) - L(θ - εu)) / 2ε``.
    """

    name: str
    shape: tuple[int, ...]
    checked: int
    kinks: int
    max_abs_diff: float
    max_rel_diff: float
    worst_index: tuple[int, ...]
    analytic: float
    numerical: float
    error_estimate: float
    passed: bool
    how: str = "elements"  # "elements", "directions" or "directions, then elements"


@dataclass(frozen=True)
class GradientCheckReport:
    """The outcome of :func:`gradient_check` or :func:`check_gradients`; ``str()`` is a table."""

    parameters: tuple[ParameterCheck, ...]
    mode: str
    step: str
    dtype: str
    difference_dtype: str
    rtol: float
    loss_evaluations: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.parameters)

    @property
    def max_abs_diff(self) -> float:
        return max((check.max_abs_diff for check in self.parameters), default=0.0)

    @property
    def kinks(self) -> int:
        return sum(check.kinks for check in self.parameters)

    @property
    def failed(self) -> list[str]:
        """Names of the parameters that failed."""
        return [check.name for check in self.parameters if not check.passed]

    def __bool__(self) -> bool:
        return self.passed

    def _rows(self) -> list[list[str]]:
        rows = []
        for check in self.parameters:
            where = (
                f"{check.name}{list(check.worst_index)}"
                if check.worst_index
                else f"{check.name} (direction)"
            )
            rows.append(
                [
                    check.name,
                    "x".join(str(n) for n in check.shape) or "scalar",
                    f"{check.checked:,}",
                    f"{check.kinks:,}",
                    f"{check.max_abs_diff:.3e}",
                    f"{check.max_rel_diff:.3e}",
                    f"{where}: analytic {check.analytic:.8g}, numerical {check.numerical:.8g}"
                    f" ± {check.error_estimate:.1e}",
                    "pass" if check.passed else "FAIL",
                ]
            )
        return rows

    _HEADER = ("param", "shape", "checked", "kinks", "max abs diff", "max rel diff", "worst", "")

    def _title(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + ", ".join(self.failed)
        return (
            f"gradient check, mode {self.mode!r} ({self.dtype} model, differences in "
            f"{self.difference_dtype}, step {self.step}, rtol {self.rtol:g}; "
            f"{self.loss_evaluations:,} loss evaluations, {self.seconds:.2f} s): {verdict}"
        )

    def __str__(self) -> str:
        rows = [list(self._HEADER), *self._rows()]
        widths = [max(len(row[k]) for row in rows) for k in range(len(self._HEADER) - 2)]
        lines = [self._title()]
        for row in rows:
            cells = [row[k].ljust(widths[k]) for k in range(len(widths))]
            lines.append("  ".join([*cells, row[-2], row[-1]]).rstrip())
        if self.kinks:
            lines.append(
                f"{self.kinks:,} element(s) at a kink (non-differentiable within the step): "
                "not counted as failures"
            )
        lines.extend(self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self._HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self._rows()
        )
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in self.notes)
        return (
            f"<p><b>{html.escape(self._title())}</b></p><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{notes}"
        )


# ------------------------------------------------------------ public entry points
def gradient_check(
    model: Any,
    x: Any,
    t: Any,
    *,
    mode: str | None = None,
    h: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    k: int = 20,
    directions: int = 2,
    seed: int = 0,
    raise_on_failure: bool = False,
    client: Any = None,
) -> GradientCheckReport:
    """Check ``model.gradient(x, t)`` against numerical differences of ``model.loss(x, t)``.

    Parameters
    ----------
    model
        Anything with the book's protocol: ``params`` (a dict of NumPy or CuPy
        float arrays), ``loss(x, t) -> scalar`` and ``gradient(x, t) -> dict``
        with the same keys and shapes. fastgrad's own models use their
        structure-aware numerical kernel (in float64); any other object is
        checked black-box, its ``params`` perturbed in place and restored
        bytewise afterwards, also when ``loss`` raises.
    x, t
        The batch, passed to ``loss`` and ``gradient`` as they are. Floating-
        point arrays (and lists of numbers) holding NaN or an infinity are
        refused first, with the error of the rest of fastgrad (the argument
        and the first bad index); so are non-finite parameters.
    mode
        ``"full"``, ``"sampled"`` or ``"fast"`` (see the module docstring); by
        default ``"full"`` for fastgrad's models and for models of at most
        100,000 parameters, else ``"fast"``.
    h
        One step for every element instead of ``eps ** (1/3) * max(1, |θ|)``.
    rtol, atol
        Tolerances of the pass rule (defaults by the analytic gradient's dtype).
    k
        Elements per parameter in ``"sampled"`` mode.
    directions
        Random directions per parameter in ``"fast"`` mode.
    seed
        Seeds the sampled elements and the directions.
    raise_on_failure
        Raise :class:`~fastgrad.GradientCheckError` (carrying the report)
        instead of returning a failed report.
    client
        A ``distributed.Client``: the black-box element checks (four losses
        each) run on its Dask workers, in chunks, and the report is the local
        one. The model (or ``f`` and ``params``) must pickle with cloudpickle;
        the caller's parameters are never perturbed then. fastgrad's own
        models in ``"full"`` mode keep their structure-aware kernel, which is
        faster on one machine than any cluster. See :mod:`fastgrad.distributed`.

    Returns
    -------
    GradientCheckReport
        Per parameter: max absolute/relative difference, the worst element
        with its analytic and numerical values and error estimate, elements
        checked, elements at kinks, pass/fail.

    Examples
    --------
    A model written by hand, in the book's style, with a bug in one bias:

    >>> import numpy as np, fastgrad
    >>> class Linear:
    ...     def __init__(self):
    ...         rng = np.random.default_rng(0)
    ...         self.params = {"W": rng.standard_normal((3, 2)), "b": np.zeros(2)}
    ...     def loss(self, x, t):
    ...         return 0.5 * np.sum((x @ self.params["W"] + self.params["b"] - t) ** 2)
    ...     def gradient(self, x, t):
    ...         error = x @ self.params["W"] + self.params["b"] - t
    ...         return {"W": x.T @ error, "b": 2 * error.sum(axis=0)}  # the bug: 2 *
    >>> x, t = np.ones((4, 3)), np.zeros((4, 2))
    >>> report = fastgrad.gradient_check(Linear(), x, t)
    >>> report.passed, report.failed
    (False, ['b'])
    """
    options = _Options.make(mode, h, rtol, atol, k, directions, seed)
    _check_client(client)
    target = _model_target(model, x, t)
    return _run(target, options, raise_on_failure, client)


def check_gradients(
    f: Callable[[], Any],
    params: Any,
    grads: Any,
    *,
    mode: str | None = None,
    h: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    k: int = 20,
    directions: int = 2,
    seed: int = 0,
    raise_on_failure: bool = False,
    client: Any = None,
) -> GradientCheckReport:
    """Check ``grads`` against numerical differences of ``f()`` with respect to ``params``.

    The functional form of :func:`gradient_check`, for code that is not a
    model: ``f()`` evaluates the loss from the current contents of
    ``params`` (a dict of arrays, or one array), which the check perturbs in
    place and restores bytewise afterwards. ``grads`` has the same structure.
    Options as :func:`gradient_check` (the default mode is ``"full"`` up to
    100,000 parameters), ``client=`` included: ``f`` and ``params`` are then
    pickled together, so an ``f`` that reads ``params`` through its closure
    sees the perturbed copies on the workers.

    Examples
    --------
    >>> import numpy as np, fastgrad
    >>> w = np.array([1.0, -2.0, 3.0])
    >>> fastgrad.check_gradients(lambda: np.sum(w ** 3), w, 3 * w ** 2).passed
    True
    """
    options = _Options.make(mode, h, rtol, atol, k, directions, seed)
    _check_client(client)
    single = not isinstance(params, Mapping)
    if not single:
        arrays = dict(params)
        if not isinstance(grads, Mapping):
            raise TypeError("params is a dict, so grads must be a dict with the same keys")
        analytic = dict(grads)
    else:
        arrays, analytic = {"x": params}, {"x": grads}
    target = _Target(
        arrays=_checked_params(arrays, "params", single),
        evaluate=f,
        what="f()",
        analytic=_checked_grads(arrays, analytic, "grads", single),
    )
    return _run(target, options, raise_on_failure, client)


# ------------------------------------------------------------------ internals
@dataclass(frozen=True)
class _Options:
    mode: str | None
    h: float | None
    rtol: float | None
    atol: float | None
    k: int
    directions: int
    seed: int

    @classmethod
    def make(
        cls,
        mode: str | None,
        h: float | None,
        rtol: float | None,
        atol: float | None,
        k: int,
        directions: int,
        seed: int,
    ) -> _Options:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (or None for the default), got {mode!r}")
        if h is not None and (isinstance(h, bool) or not _positive_finite(h)):
            raise ValueError(f"h must be a positive finite step, got {h!r}")
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.floating))
                or not 0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (("k", k), ("directions", directions)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return cls(mode, h, rtol, atol, int(k), int(directions), int(seed))


@dataclass
class _Target:
    """What a check perturbs and evaluates.

    ``arrays`` are perturbed in place; ``analytic`` holds float64 host copies
    of the gradient; ``bulk`` (fastgrad's models only) computes every central
    difference at step ``s`` at once.
    """

    arrays: dict[str, Any]
    evaluate: Callable[[], Any]
    what: str
    analytic: dict[str, np.ndarray]
    bulk: Callable[[float], dict[str, np.ndarray]] | None = None
    model_dtype: np.dtype | None = None
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0

    def loss(self, where: str) -> float:
        self.evaluations += 1
        return _as_loss(self.evaluate(), self.what, where)


def _as_loss(value: Any, what: str, where: str) -> float:
    """``value`` as a float loss, or an error naming ``what`` returned it and ``where``."""
    shape = getattr(value, "shape", None)
    try:
        if shape is not None and int(np.prod(shape)) != 1:
            raise TypeError
        result = float(value.reshape(-1)[0]) if shape else float(value)
    except (TypeError, ValueError, AttributeError):
        raise TypeError(
            f"{what} must return a scalar loss, got {type(value).__name__}"
            + (f" of shape {tuple(shape)}" if shape is not None else "")
            + f" ({where})"
        ) from None
    if isinstance(value, complex) or np.iscomplexobj(value):
        raise TypeError(f"{what} returned a complex loss {value} ({where})")
    if not math.isfinite(result):
        raise ValueError(
            f"{what} returned {result} {where}; a gradient check needs finite losses "
            "(check the model at these parameters, or pass a smaller h=)"
        )
    return result


def _check_client(client: Any) -> None:
    if client is not None:
        # Imported here: fastgrad.distributed, and Dask behind it, only when asked for.
        from fastgrad.distributed import check_client

        check_client(client)


def _positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and 0 < float(value) < math.inf


def _host(array: Any) -> np.ndarray:
    """A float64 host copy of a NumPy or CuPy array (or anything array-like)."""
    if hasattr(array, "get") and not isinstance(array, np.ndarray):
        array = array.get()
    return np.array(array, dtype=np.float64, copy=True)


def _label(where: str, name: str, single: bool) -> str:
    """How errors call an array: ``params['W']``, or ``params`` when it is a single array."""
    return where if single else f"{where}[{name!r}]"


_PARAMS_REMEDY = (
    "a gradient check needs finite parameters (a diverged training run, a bad checkpoint, or "
    "an assignment to them)"
)
_GRADS_REMEDY = "an analytic gradient must be finite (check the backprop that computed it)"


def _refuse_nonfinite(value: Any, name: str, remedy: str | None = None) -> None:
    """Refuse NaN and infinities in a floating-point array (or list of numbers) ``value``.

    The error of :func:`fastgrad._validation.check_finite`: the name, the value
    and the first bad index. Anything else (integer labels, objects a
    hand-written model understands) is left to the model.
    """
    from fastgrad._validation import check_finite
    from fastgrad.backends import backend_of, get_backend

    array = value
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):  # ragged or not numbers: the model's business
            return
    if np.dtype(getattr(array, "dtype", np.dtype(object))).kind != "f":
        return
    backend = get_backend(backend_of(array) or "numpy")
    if remedy is None:
        check_finite(backend, array, name)
    else:
        check_finite(backend, array, name, remedy)


def _checked_params(arrays: dict[str, Any], where: str, single: bool = False) -> dict[str, Any]:
    if not arrays:
        raise ValueError(f"{where} is empty: there is nothing to check")
    for name, array in arrays.items():
        label = _label(where, name, single)
        dtype = getattr(array, "dtype", None)
        if dtype is None or not hasattr(array, "shape") or not hasattr(array, "__setitem__"):
            raise TypeError(
                f"{label} must be a NumPy or CuPy array (the check perturbs it in "
                f"place), got {type(array).__name__}"
            )
        if not np.issubdtype(np.dtype(dtype), np.floating):
            raise TypeError(f"{label} has dtype {dtype}; parameters must be floating-point arrays")
        flags = getattr(array, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            raise ValueError(
                f"{label} is read-only; the check perturbs parameters in place "
                "(pass a writeable array)"
            )
        if array.size == 0:
            raise ValueError(f"{label} is empty (shape {tuple(array.shape)})")
        _refuse_nonfinite(array, label, _PARAMS_REMEDY)
    return arrays


def _checked_grads(
    arrays: dict[str, Any], grads: Any, where: str, single: bool = False
) -> dict[str, np.ndarray]:
    if not isinstance(grads, Mapping):
        raise TypeError(f"{where} must be a dict like params, got {type(grads).__name__}")
    labels = {name: _label(where, name, single) for name in arrays}
    missing = [name for name in arrays if name not in grads]
    extra = [name for name in grads if name not in arrays]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{where} must have the keys of params {list(arrays)}: {', '.join(parts)}")
    analytic = {}
    for name, array in arrays.items():
        grad = grads[name]
        shape = tuple(getattr(grad, "shape", np.shape(grad)))
        if shape != tuple(array.shape):
            parameter = _label("params", name, single)
            raise ValueError(
                f"{labels[name]} has shape {shape} but {parameter} has shape "
                f"{tuple(array.shape)}; a gradient has its parameter's shape"
            )
        host = _host(grad)
        _refuse_nonfinite(host, labels[name], _GRADS_REMEDY)
        analytic[name] = host
    return analytic


def _model_target(model: Any, x: Any, t: Any) -> _Target:
    from fastgrad.models import MultiLayerNet

    for attribute in ("params", "loss", "gradient"):
        if not hasattr(model, attribute):
            raise TypeError(
                f"model has no {attribute!r}: gradient_check needs the book's protocol, "
                "params (a dict of arrays), loss(x, t) and gradient(x, t); for a plain "
                "function use fastgrad.check_gradients(f, params, grads)"
            )
    if not isinstance(model.params, Mapping):
        raise TypeError(f"model.params must be a dict of arrays, got {type(model.params).__name__}")
    if isinstance(model, MultiLayerNet):
        return _own_model_target(model, x, t)  # its own methods check x, t and params
    _refuse_nonfinite(x, "x")
    _refuse_nonfinite(t, "t")
    arrays = _checked_params(dict(model.params), "model.params")
    analytic = _checked_grads(arrays, model.gradient(x, t), "model.gradient(x, t)")
    target = _Target(arrays, lambda: model.loss(x, t), "model.loss(x, t)", analytic)
    dtypes = {np.dtype(array.dtype) for array in arrays.values()}
    if any(dtype != np.float64 for dtype in dtypes):
        names = ", ".join(sorted(d.name for d in dtypes))
        target.notes.append(
            f"note: differences computed in the model's own precision ({names}): a black-box "
            "model's loss cannot be evaluated in float64 from outside, so its error "
            "estimates are larger"
        )
    return target


def _own_model_target(model: Any, x: Any, t: Any) -> _Target:
    """fastgrad's models: float64 copies to perturb, and the structure-aware kernel."""
    from fastgrad.backends._base import Network

    analytic_raw = model.gradient(x, t)
    X, labels = model.prepare(x, t)
    xp = model.backend.xp
    network = model.network()
    copies = Network(
        weights=tuple(xp.array(W, dtype=np.float64) for W in network.weights),
        biases=tuple(xp.array(b, dtype=np.float64) for b in network.biases),
        activation=network.activation,
        weight_decay=network.weight_decay,
    )
    names = list(model.params)
    by_name = dict(zip(names, copies.arrays, strict=True))
    X64 = xp.asarray(X, dtype=np.float64)

    def bulk(step: float) -> dict[str, np.ndarray]:
        with model.backend.single_threaded_blas():
            pairs = model.backend.network_numerical_gradient(copies, X64, labels, step)
        flat = [array for pair in pairs for array in pair]
        return {name: _host(array) for name, array in zip(names, flat, strict=True)}

    return _Target(
        arrays=by_name,
        evaluate=lambda: model.prepared_loss(X64, labels, copies),
        what="model.loss(x, t)",
        analytic=_checked_grads(by_name, analytic_raw, "model.gradient(x, t)"),
        bulk=bulk,
        model_dtype=model.dtype,
    )


def _run(
    target: _Target, options: _Options, raise_on_failure: bool, client: Any = None
) -> GradientCheckReport:
    started = time.perf_counter()
    total = sum(int(array.size) for array in target.arrays.values())
    mode = options.mode
    if mode is None:
        mode = "full" if target.bulk is not None or total <= FULL_MODE_MAX_PARAMS else "fast"
    arrays_dtype = np.result_type(*(np.dtype(a.dtype) for a in target.arrays.values()))
    analytic_dtype = np.dtype(
        target.model_dtype if target.model_dtype is not None else arrays_dtype
    )
    rtol = options.rtol if options.rtol is not None else _default_rtol(analytic_dtype)
    snapshots = {name: array.copy() for name, array in target.arrays.items()}
    checker = _Checker(target, options, rtol, client)
    try:
        timed = time.perf_counter()
        base = target.loss("at the given parameters")
        checker.seconds_per_loss = time.perf_counter() - timed
        checker.base = base
        if mode == "full" and target.bulk is not None:
            if client is not None:
                target.notes.append(
                    "note: client= not used: the structure-aware kernel of fastgrad's models "
                    "is faster on one machine than element checks on any cluster"
                )
            checks = checker.bulk_full()
        elif mode == "fast":
            checks = [checker.directional(name) for name in target.arrays]
        else:
            checks = checker.elements_of(
                {
                    name: _indices(target.arrays[name], mode, options, target, name)
                    for name in target.arrays
                }
            )
    finally:
        # Bytewise, whatever happened above (loss raising mid-check included).
        for name, array in target.arrays.items():
            array[...] = snapshots[name]
    if options.h is not None:
        step = f"h={options.h:g}"
    elif mode == "full" and target.bulk is not None:
        step = "eps**(1/3)*max(1,max|θ|), one step for the kernel"
    else:
        step = "eps**(1/3)*max(1,|θ|)"
    report = GradientCheckReport(
        parameters=tuple(checks),
        mode=mode,
        step=step,
        dtype=analytic_dtype.name,
        difference_dtype=np.dtype(arrays_dtype).name,
        rtol=float(rtol),
        loss_evaluations=target.evaluations,
        seconds=time.perf_counter() - started,
        notes=tuple(target.notes),
    )
    if raise_on_failure and not report.passed:
        raise GradientCheckError(report)
    return report


def _indices(array: Any, mode: str, options: _Options, target: _Target, name: str) -> np.ndarray:
    """Flat indices of the elements to check: all, or a seeded sample plus the largest."""
    size = int(array.size)
    if mode == "full":
        return np.arange(size)
    return _sample(size, target.analytic[name], options.k, options.seed, name)


def _sample(size: int, analytic: np.ndarray, k: int, seed: int, name: str) -> np.ndarray:
    if size <= k + TOP_ENTRIES:
        return np.arange(size)
    # One stream per parameter, so adding a parameter does not move the others' samples.
    salt = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([seed, salt])
    chosen = rng.choice(size, size=k, replace=False)
    largest = np.argsort(np.abs(analytic).reshape(-1))[-TOP_ENTRIES:]
    return np.unique(np.concatenate([chosen, largest]))


@dataclass
class _Element:
    numerical: float
    error: float
    kink: bool


_Losses = tuple[float, dict[float, float], dict[float, float]]
"""``(h, values, taken)``: the losses at steps ``±h, ±h/2`` and the steps actually taken."""


def _perturbed_losses(
    array: Any,
    name: str,
    flat_index: int,
    step_option: float | None,
    loss: Callable[[str], float],
) -> _Losses:
    """Move one element by ``±h`` and ``±h/2`` in place, ``loss`` at each; always restored."""
    index = tuple(int(i) for i in np.unravel_index(flat_index, array.shape))
    original = array[index].copy()
    theta = float(original)
    dtype = np.dtype(array.dtype)
    eps = float(np.finfo(dtype).eps)
    h = step_option if step_option is not None else eps ** (1 / 3) * max(1.0, abs(theta))
    values = {}
    taken = {}
    largest = float(np.finfo(dtype).max)
    try:
        for step in (h, -h, h / 2, -h / 2):
            if not abs(theta + step) <= largest:
                raise _beyond_range(f"{name}{list(index)} = {theta:g}", abs(step), dtype)
            array[index] = dtype.type(theta + step)
            moved = float(array[index]) - theta
            if moved == 0.0:
                smallest = 2 * eps * max(abs(theta), float(np.finfo(dtype).tiny))
                raise ValueError(
                    f"the step {abs(step):g} rounds to nothing at {name}{list(index)} "
                    f"= {theta:g} in {dtype.name}; use h >= {smallest:.3g}"
                )
            where = f"at {name}{list(index)} moved by {moved:+.3g}"
            values[step], taken[step] = loss(where), moved
    finally:
        array[index] = original
    return h, values, taken


def _beyond_range(what: str, step: float, dtype: np.dtype) -> ValueError:
    """The error of a step that would move ``what`` beyond the range of ``dtype``."""
    return ValueError(
        f"the step {step:g} moves {what} beyond the range of {dtype.name} "
        f"(±{float(np.finfo(dtype).max):.3g}); pass a smaller h= or rescale the parameters"
    )


@dataclass(frozen=True)
class _ElementChunk:
    """One Dask task of a gradient check: ``(parameter name, flat index)`` pairs."""

    items: tuple[tuple[str, int], ...]
    step_option: float | None
    what: str


def _element_losses(payload: bytes, chunk: _ElementChunk) -> list[_Losses]:
    """A Dask task: :func:`_perturbed_losses` of each element, on this worker's own copy."""
    import pickle

    from fastgrad.distributed import add_note, worker_name

    evaluate, arrays = pickle.loads(payload)

    def loss(where: str) -> float:
        try:
            value = evaluate()
        except Exception as error:
            add_note(error, f"raised by {chunk.what} {where}, on {worker_name()}")
            raise
        return _as_loss(value, chunk.what, where)

    return [
        _perturbed_losses(arrays[name], name, flat, chunk.step_option, loss)
        for name, flat in chunk.items
    ]


class _Checker:
    """The differences themselves, element by element or along directions."""

    def __init__(self, target: _Target, options: _Options, rtol: float, client: Any = None) -> None:
        self.target = target
        self.options = options
        self.rtol = rtol
        self.base = 0.0
        self._scales: dict[str, float] = {}
        self.client = client
        self.seconds_per_loss = 0.0
        # With a client: the perturbed losses of (name, flat index), computed on the
        # workers before the elements are classified here; and the pickled
        # (evaluate, arrays) they are computed from, made once per check.
        self._remote: dict[tuple[str, int], _Losses] = {}
        self._payload: bytes | None = None

    def atol(self, name: str, numerical: np.ndarray | None = None) -> float:
        if self.options.atol is not None:
            return float(self.options.atol)
        if name not in self._scales:
            self._scales[name] = float(np.abs(self.target.analytic[name]).max())
        scale = self._scales[name]
        if numerical is not None and numerical.size:
            scale = max(scale, float(np.abs(numerical).max()))
        return self.rtol * scale

    # -- one element, black-box
    def element(self, name: str, flat_index: int) -> _Element:
        array = self.target.arrays[name]
        losses = self._remote.pop((name, flat_index), None)
        if losses is None:
            losses = _perturbed_losses(array, name, flat_index, self.options.h, self.target.loss)
        h, values, taken = losses
        eps = float(np.finfo(np.dtype(array.dtype)).eps)
        base = self.base

        def central(s: float) -> float:
            return (values[s] - values[-s]) / (taken[s] - taken[-s])

        def forward(s: float) -> float:
            return (values[s] - base) / taken[s]

        def backward(s: float) -> float:
            return (values[-s] - base) / taken[-s]

        coarse, fine = central(h), central(h / 2)
        loss_scale = max(abs(base), *(abs(v) for v in values.values()))
        rounding = eps * loss_scale / (taken[h / 2] - taken[-h / 2])
        error = abs(coarse - fine) / 3 + rounding
        # For a smooth loss the one-sided slopes are g ± s·L''/2 + O(s²): both
        # sides bend alike and the forward-backward gap halves with the step. A
        # kink at distance d within the step breaks one of the two: the sides
        # bend differently by Δg·d/h, or the gap stays (d ≈ 0); the larger of
        # the two mismatches is at least Δg/5 wherever the kink lies.
        asymmetry = abs((forward(h) - forward(h / 2)) - (backward(h / 2) - backward(h)))
        gap_fine = forward(h / 2) - backward(h / 2)
        gap_coarse = forward(h) - backward(h)
        mismatch = max(asymmetry, abs(gap_fine - gap_coarse / 2))
        kink = mismatch > self.atol(name) + self.rtol * abs(fine) + 16 * rounding
        return _Element(fine, error, kink)

    def elements_of(self, selections: dict[str, np.ndarray]) -> list[ParameterCheck]:
        """:meth:`elements` of each parameter; with a client, one fan-out for them all."""
        if self.client is not None:
            self._evaluate_on_cluster(selections)
        return [self.elements(name, indices) for name, indices in selections.items()]

    def elements(
        self, name: str, flat_indices: np.ndarray, how: str = "elements"
    ) -> ParameterCheck:
        if self.client is not None and any(
            (name, int(i)) not in self._remote for i in flat_indices
        ):
            self._evaluate_on_cluster({name: flat_indices})
        analytic = self.target.analytic[name].reshape(-1)[flat_indices]
        found = [self.element(name, int(i)) for i in flat_indices]
        numerical = np.array([e.numerical for e in found])
        errors = np.array([e.error for e in found])
        kinks = np.array([e.kink for e in found], dtype=bool)
        return self._summarise(name, flat_indices, analytic, numerical, errors, kinks, how)

    def _summarise(
        self,
        name: str,
        flat_indices: np.ndarray,
        analytic: np.ndarray,
        numerical: np.ndarray,
        errors: np.ndarray,
        kinks: np.ndarray,
        how: str,
    ) -> ParameterCheck:
        shape = tuple(self.target.arrays[name].shape)
        diff = np.abs(analytic - numerical)
        magnitude = np.maximum(np.abs(analytic), np.abs(numerical))
        allowed = self.atol(name, numerical) + self.rtol * magnitude + errors
        failing = (diff > allowed) & ~kinks
        # The worst element: the one furthest beyond its tolerance, else the largest difference.
        excess = np.where(kinks, -np.inf, diff - allowed)
        worst = (
            int(np.argmax(excess)) if failing.any() else int(np.argmax(np.where(kinks, -1, diff)))
        )
        relative = diff / np.maximum(magnitude, 1e-300)
        smooth = ~kinks
        return ParameterCheck(
            name=name,
            shape=shape,
            checked=int(flat_indices.size),
            kinks=int(kinks.sum()),
            max_abs_diff=float(diff[smooth].max()) if smooth.any() else 0.0,
            max_rel_diff=float(relative[smooth].max()) if smooth.any() else 0.0,
            worst_index=tuple(int(i) for i in np.unravel_index(int(flat_indices[worst]), shape)),
            analytic=float(analytic[worst]),
            numerical=float(numerical[worst]),
            error_estimate=float(errors[worst]),
            passed=not bool(failing.any()),
            how=how,
        )

    def _evaluate_on_cluster(self, selections: dict[str, np.ndarray]) -> None:
        """The four perturbed losses of every selected element, in chunks on the workers."""
        from fastgrad import distributed

        items = [(name, int(i)) for name, indices in selections.items() for i in indices]
        if self._payload is None:
            # One object, so that an evaluate() reading the arrays through its closure
            # (a model's own params) sees the very arrays the workers perturb.
            self._payload = distributed.pack(
                (self.target.evaluate, self.target.arrays), self.target.what
            )
        bounds = distributed.plan_chunks(
            len(items), 4 * self.seconds_per_loss, distributed.worker_slots(self.client)
        )
        chunks = [
            _ElementChunk(tuple(items[start:stop]), self.options.h, self.target.what)
            for start, stop in bounds
        ]
        results = distributed.run_chunks(
            self.client, self._payload, _element_losses, chunks, "fastgrad-gradient-check"
        )
        for chunk, losses in zip(chunks, results, strict=True):
            self._remote.update(zip(chunk.items, losses, strict=True))
        self.target.evaluations += 4 * len(items)

    # -- every element at once, fastgrad's models
    def bulk_full(self) -> list[ParameterCheck]:
        assert self.target.bulk is not None
        eps = float(np.finfo(np.float64).eps)
        scale = max(float(np.abs(_host(array)).max()) for array in self.target.arrays.values())
        h = self.options.h if self.options.h is not None else eps ** (1 / 3) * max(1.0, scale)
        coarse, fine = self.target.bulk(h), self.target.bulk(h / 2)
        # The kernel forms each loss difference from the change itself (log1p of
        # a small sum), so its rounding is that of the change, not of the loss.
        rounding = 4 * eps * max(1.0, abs(self.base)) / h
        checks = []
        budget = REEXAMINE_MAX
        for name in self.target.arrays:
            analytic = self.target.analytic[name].reshape(-1)
            numerical = fine[name].reshape(-1).copy()
            errors = np.abs(coarse[name] - fine[name]).reshape(-1) / 3 + rounding
            kinks = np.zeros(numerical.shape, dtype=bool)
            magnitude = np.maximum(np.abs(analytic), np.abs(numerical))
            allowed = self.atol(name, numerical) + self.rtol * magnitude + errors
            suspicious = np.flatnonzero(np.abs(analytic - numerical) > allowed)
            # Look again, one by one, at the elements the bulk values fail: a
            # kink within the step shows only in one-sided differences.
            order = suspicious[np.argsort(-np.abs(analytic - numerical)[suspicious])]
            for flat in order[:budget]:
                element = self.element(name, int(flat))
                numerical[flat], errors[flat], kinks[flat] = (
                    element.numerical,
                    element.error,
                    element.kink,
                )
            budget -= min(budget, order.size)
            everything = np.arange(analytic.size)
            checks.append(
                self._summarise(name, everything, analytic, numerical, errors, kinks, "elements")
            )
        return checks

    # -- directional derivatives
    def directional(self, name: str) -> ParameterCheck:
        array = self.target.arrays[name]
        original = array.copy()
        host = _host(array)
        dtype = np.dtype(array.dtype)
        eps = float(np.finfo(dtype).eps)
        grad = self.target.analytic[name]
        norm = float(np.linalg.norm(host))
        step = self.options.h if self.options.h is not None else eps ** (1 / 3) * max(1.0, norm)
        salt = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
        rng = np.random.default_rng([self.options.seed, salt, 1])
        worst: tuple[float, float, float, float] | None = None  # (excess, a, n, err)
        failed = False
        for _ in range(self.options.directions):
            u = rng.standard_normal(host.shape)
            u /= np.linalg.norm(u)
            values, predicted = {}, {}
            try:
                for s in (step, -step, step / 2, -step / 2):
                    with np.errstate(over="ignore"):  # refused just below
                        moved = (host + s * u).astype(dtype)
                    if not np.isfinite(moved).all():
                        raise _beyond_range(f"{name} (along a random direction)", abs(s), dtype)
                    array[...] = _like(array, moved)
                    predicted[s] = float(np.sum(grad * (moved.astype(np.float64) - host)))
                    values[s] = self.target.loss(f"at {name} moved along a random direction")
            finally:
                array[...] = original

            def central(s: float, table: dict[float, float]) -> float:
                return (table[s] - table[-s]) / (2 * s)

            numerical_fine = central(step / 2, values)
            analytic_fine = central(step / 2, predicted)
            numerical_coarse = central(step, values)
            analytic_coarse = central(step, predicted)
            loss_scale = max(abs(self.base), *(abs(v) for v in values.values()))
            error = (
                abs((numerical_coarse - analytic_coarse) - (numerical_fine - analytic_fine)) / 3
                + eps * loss_scale / step
            )
            diff = abs(numerical_fine - analytic_fine)
            magnitude = max(abs(numerical_fine), abs(analytic_fine))
            atol = (
                self.options.atol
                if self.options.atol is not None
                else self.rtol * float(np.linalg.norm(grad))
            )
            excess = diff - (atol + self.rtol * magnitude + error)
            failed = failed or excess > 0
            if worst is None or excess > worst[0]:
                worst = (excess, analytic_fine, numerical_fine, error)
        assert worst is not None
        _, analytic_dd, numerical_dd, error = worst
        if failed:
            # Localise: the report should still name the worst element.
            size = int(array.size)
            indices = (
                np.arange(size)
                if size <= LOCALISE_FULL_MAX
                else _sample(size, grad, LOCALISE_SAMPLES, self.options.seed, name)
            )
            located = self.elements(name, indices, how="directions, then elements")
            if located.passed:
                self.target.notes.append(
                    f"note: {name} failed a directional check but every element checked passed "
                    "(a direction that crosses a kink makes its differences unreliable)"
                )
            return located
        diff = abs(analytic_dd - numerical_dd)
        return ParameterCheck(
            name=name,
            shape=tuple(array.shape),
            checked=self.options.directions,
            kinks=0,
            max_abs_diff=diff,
            max_rel_diff=diff / max(abs(analytic_dd), abs(numerical_dd), 1e-300),
            worst_index=(),
            analytic=analytic_dd,
            numerical=numerical_dd,
            error_estimate=error,
            passed=True,
            how="directions",
        )


def _like(array: Any, host: np.ndarray) -> Any:
    """``host`` as an array of ``array``'s kind (a device copy for CuPy parameters)."""
    if isinstance(array, np.ndarray):
        return host
    import sys

    cupy = sys.modules.get("cupy")
    return cupy.asarray(host) if cupy is not None else host
