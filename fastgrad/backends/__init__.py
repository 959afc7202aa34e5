"""The backend registry: which backend runs a call, and loading it lazily.

Selection order for a call: an explicit ``backend=`` argument, then
``use_backend(...)`` (context-local), then ``set_backend(...)`` (process-wide),
then the type of the arrays passed (CuPy arrays pick ``"cupy"``), then the
``FASTGRAD_BACKEND`` environment variable, then ``"numpy"``. A backend's
module, and the package behind it, is imported only when that backend is
first asked for, so ``import fastgrad`` never imports numba or cupy.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Union

from fastgrad.backends._base import Backend
from fastgrad.errors import BackendUnavailableError

__all__ = [
    "Backend",
    "BackendLike",
    "available_backends",
    "backend_of",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "unavailable_reason",
    "use_backend",
]

BackendLike = Union[str, Backend, None]
"""A backend name, a backend object, or ``None`` for the current default."""

ENV_VARIABLE = "FASTGRAD_BACKEND"


@dataclass(frozen=True)
class _Spec:
    module: str
    class_name: str
    package: str  # the importable package the backend cannot run without
    extra: str | None  # the pip extra that installs that package


_SPECS: dict[str, _Spec] = {
    "numpy": _Spec("fastgrad.backends.numpy_", "NumpyBackend", "numpy", None),
    "numba": _Spec("fastgrad.backends.numba", "NumbaBackend", "numba", "numba"),
    "cupy": _Spec("fastgrad.backends.cupy", "CupyBackend", "cupy", "cuda12x"),
}

_instances: dict[str, Backend] = {}
_instances_lock = threading.Lock()


@dataclass(eq=False)
class _Choice:
    """One ``use_backend`` block: its backend, the choice it shadows, and whether it is open."""

    name: str
    previous: _Choice | None
    open: bool = True


_context_choice: ContextVar[_Choice | None] = ContextVar("fastgrad_backend", default=None)
_process_choice: str | None = None


def _install_hint(spec: _Spec) -> str:
    if spec.extra is None:
        return f"pip install {spec.package}"
    if spec.extra == "cuda12x":
        return "pip install 'fastgrad[cuda12x]' (or 'fastgrad[cuda13x]' for CUDA 13)"
    return f"pip install 'fastgrad[{spec.extra}]'"


def _numba_thread_count_problem() -> str | None:
    """Why ``NUMBA_NUM_THREADS`` would stop numba from importing, or None.

    Numba reads the variable once, at import: 0 or a negative count raises a
    bare ValueError there, and an unparsable one is replaced by a multi-line
    warning. Once numba is imported the variable no longer matters.
    """
    value = os.environ.get("NUMBA_NUM_THREADS")
    if value is None or "numba" in sys.modules:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count > 0:
        return None
    return f"NUMBA_NUM_THREADS={value!r} is not a thread count: unset it or set 1..{os.cpu_count()}"


def _load(name: str) -> Backend:
    """Create (once) and return the backend called ``name``."""
    backend = _instances.get(name)
    if backend is not None:
        return backend
    spec = _SPECS.get(name)
    if spec is None:
        known = ", ".join(repr(known_name) for known_name in _SPECS)
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {known}")
    if importlib.util.find_spec(spec.package) is None:
        raise BackendUnavailableError(
            f"backend {name!r} needs the {spec.package} package, which is not installed: "
            f"{_install_hint(spec)}"
        )
    if name == "numba":
        problem = _numba_thread_count_problem()
        if problem is not None:
            raise BackendUnavailableError(f"backend 'numba' cannot start: {problem}")
    with _instances_lock:
        if name not in _instances:
            try:
                module = importlib.import_module(spec.module)
            except (ImportError, ValueError) as error:  # numba's bad-config errors are ValueErrors
                raise BackendUnavailableError(
                    f"backend {name!r} failed to import ({error}); reinstall with "
                    f"{_install_hint(spec)}"
                ) from error
            # The backend class raises BackendUnavailableError itself when the
            # package imports but cannot run (no CUDA device, broken install).
            _instances[name] = getattr(module, spec.class_name)()
    return _instances[name]


def get_backend(name: BackendLike = None) -> Backend:
    """The backend called ``name``, or the current default when ``name`` is None.

    Raises
    ------
    BackendUnavailableError
        The name is unknown, or its package or device is missing; the message
        says which and names the extra to install.

    Examples
    --------
    >>> import fastgrad
    >>> fastgrad.get_backend("numpy").name
    'numpy'
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        return _load(_default_name())
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    return _load(name)


def set_backend(name: BackendLike) -> None:
    """Make ``name`` the process-wide default (``None`` clears it).

    The backend is loaded at once, so an unavailable one fails here and not at
    the first computation.

    Examples
    --------
    >>> import fastgrad
    >>> fastgrad.set_backend("numpy")
    >>> fastgrad.get_backend().name
    'numpy'
    >>> fastgrad.set_backend(None)
    """
    global _process_choice
    _process_choice = None if name is None else get_backend(name).name


@contextlib.contextmanager
def use_backend(name: BackendLike) -> Iterator[Backend]:
    """Run a block with ``name`` as the default backend of this thread/context.

    The previous choice is restored on exit, also when the block raises. The
    choice ends when the block exits, wherever that happens: a generator
    holding the block that is closed from another thread or context, or
    after its caller opened blocks of its own, leaves no choice behind.

    A block inside a generator is, as for every context variable (and
    ``decimal.localcontext``), in force in the code that iterates the
    generator while the generator is suspended inside the block: Python
    gives generators no context of their own. Enter the block around the
    code that needs it rather than around a ``yield``.

    Examples
    --------
    >>> import fastgrad
    >>> with fastgrad.use_backend("numpy") as backend:
    ...     backend.name
    'numpy'
    """
    backend = get_backend(name)
    choice = _Choice(backend.name, _context_choice.get())
    token = _context_choice.set(choice)
    try:
        yield backend
    finally:
        # Closed first, so that a context still pointing at this block (one it
        # cannot reset from here) skips it from now on.
        choice.open = False
        if _context_choice.get() is choice:
            try:
                _context_choice.reset(token)
            except ValueError:  # exited in a copy of the context it was entered in
                _context_choice.set(choice.previous)


def _block_choice() -> str | None:
    """The backend of the innermost open ``use_backend`` block of this context, if any."""
    choice = _context_choice.get()
    while choice is not None and not choice.open:
        choice = choice.previous
    return None if choice is None else choice.name


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, NumPy first.

    Asking loads each candidate (importing numba or cupy if installed).

    Examples
    --------
    >>> import fastgrad
    >>> "numpy" in fastgrad.available_backends()
    True
    """
    return [name for name in _SPECS if unavailable_reason(name) is None]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    try:
        _load(name)
    except BackendUnavailableError as error:
        return str(error)
    return None


def known_backends() -> list[str]:
    """Every backend name fastgrad knows, available here or not."""
    return list(_SPECS)


def backend_of(*arrays: Any) -> str | None:
    """``"cupy"`` when the arrays are CuPy arrays, None when nothing says so.

    NumPy arrays do not choose a backend (both ``numpy`` and ``numba`` take
    them). Looks in ``sys.modules`` rather than importing cupy.

    Raises
    ------
    TypeError
        NumPy and CuPy arrays are mixed in one call.
    """
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    on_device = [isinstance(array, cupy.ndarray) for array in arrays if hasattr(array, "shape")]
    if any(on_device) and not all(on_device):
        raise TypeError(
            "got both NumPy and CuPy arrays in one call; move them to one place first "
            "(backend.asarray(...) to the GPU, backend.to_numpy(...) to the host)"
        )
    return "cupy" if any(on_device) else None


def resolve_backend(explicit: BackendLike, *arrays: Any) -> Backend:
    """The backend that runs a call on ``arrays`` (see the module docstring).

    Raises
    ------
    TypeError
        The arrays live where the chosen backend cannot use them (NumPy arrays
        for ``cupy``, CuPy arrays for ``numpy``/``numba``): fastgrad never moves
        data between host and device behind your back.
    """
    family = backend_of(*arrays)
    chosen: BackendLike = explicit
    if chosen is None:
        chosen = _block_choice() or _process_choice or family
    backend = get_backend(chosen)
    foreign = [a for a in arrays if hasattr(a, "shape") and not backend.is_native(a)]
    if (
        (family is not None
        and family != backend.array_family)
        or (backend.array_family != "numpy" and foreign)
    ):
        where = "CuPy (GPU)" if family == "cupy" else "NumPy (host)"
        raise TypeError(
            f"backend {backend.name!r} cannot use {where} arrays; move them explicitly "
            f"with fastgrad.get_backend({backend.name!r}).asarray(...) or pick the backend "
            "that owns them"
        )
    return backend


def _default_name() -> str:
    choice = _block_choice() or _process_choice
    if choice is not None:
        return choice
    from_env = os.environ.get(ENV_VARIABLE, "").strip()
    if not from_env:
        return "numpy"
    if from_env not in _SPECS:
        known = ", ".join(repr(known_name) for known_name in _SPECS)
        raise BackendUnavailableError(
            f"{ENV_VARIABLE}={from_env!r} names an unknown backend; choose one of {known}"
        )
    return from_env
