"""Numerical gradients and gradient checks of expensive black boxes, on a Dask cluster.

The rule: a task computes exactly what the local loop computes for its own run
of elements (the same perturbed copies, the same calls of ``f``, the same
quotients), so a gradient made on a cluster is the local one bit for bit,
whatever the number of workers and the chunking. Dask is imported only when a
``client=`` is given; ``import fastgrad`` never imports it.

Pass a ``distributed.Client`` to :func:`fastgrad.numerical_gradient`,
:func:`fastgrad.gradient_check` or :func:`fastgrad.check_gradients`:

>>> import numpy as np, fastgrad
>>> from distributed import Client, LocalCluster
>>> cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
...                        dashboard_address=":0")
>>> client = Client(cluster)
>>> def simulator(x):  # stands for seconds of work per call
...     return float(np.sum(np.sin(x) * np.arange(x.size)))
>>> x = np.linspace(0.0, 1.0, 6)
>>> on_cluster = fastgrad.numerical_gradient(simulator, x, client=client)
>>> bool((on_cluster == fastgrad.numerical_gradient(simulator, x)).all())
True
>>> client.close(); cluster.close()

How the work is cut and sent:

* ``f`` and ``x`` are pickled together, once, with cloudpickle, and scattered
  to every worker once (``broadcast=True``). Pickling them as one object keeps
  an ``f`` that reads ``x`` through a closure (the book's
  ``lambda W: net.loss(x, t)``) pointed at the very array the task perturbs.
  An ``f`` that cannot be pickled fails here, before any work is sent.
* Every task unpickles its own copy, so tasks sharing a multi-threaded worker
  never see each other's perturbations, and the caller's ``x`` is never
  written.
* :func:`plan_chunks` sizes the tasks from the worker threads and the cost of
  one evaluation of ``f``, timed once on the caller: up to
  :data:`TASKS_PER_WORKER` tasks per worker thread (load balance, and little
  to redo when a worker dies), in whole rounds, none shorter than
  :data:`TARGET_TASK_SECONDS` (Dask's few milliseconds per task then cost
  under 1 %). ``elements_per_task=`` sets the size instead.

Faults: a worker that dies mid-run loses nothing, since the scheduler reruns
its tasks elsewhere (up to ``distributed.scheduler.allowed-failures`` times,
3 by default). An ``f`` that raises is not retried: the caller gets the
original exception, type and message, with a note naming the element and the
worker; the remaining tasks are cancelled.

Backends: workers run with the caller's backend name (``"numpy"``,
``"numba"``, ``"cupy"``), loaded there, and need fastgrad installed. For CuPy,
start one worker per GPU with dask-cuda, ``dask cuda worker <scheduler>`` or
``LocalCUDACluster()`` from ``dask_cuda``: each worker sees only its own device,
so the arrays unpickled there live on that GPU.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fastgrad.backends._base import (
    SNAPSHOT_COMPARES,
    Backend,
    _check_unchanged,
    _element_changed,
    _scalar,
    _stack_values,
)
from fastgrad.errors import BackendUnavailableError

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "TARGET_TASK_SECONDS",
    "TASKS_PER_WORKER",
    "plan_chunks",
    "require_dask",
]

#: Shortest task :func:`plan_chunks` aims for, in seconds of measured work.
TARGET_TASK_SECONDS = 1.0
#: Most tasks :func:`plan_chunks` makes per worker thread.
TASKS_PER_WORKER = 4

_INSTALL_HINT = "pip install 'fastgrad[dask]'"


# ------------------------------------------------------------------ the client
def require_dask() -> ModuleType:
    """The ``distributed`` package, or an error that names the extra to install.

    Raises
    ------
    BackendUnavailableError
        Dask's ``distributed`` package is not installed (or fails to import).

    Examples
    --------
    >>> import fastgrad.distributed
    >>> fastgrad.distributed.require_dask().__name__
    'distributed'
    """
    try:
        import distributed
    except ImportError as error:
        raise BackendUnavailableError(
            "client= runs on a Dask cluster and needs the distributed package, which "
            f"cannot be imported ({error}): {_INSTALL_HINT}"
        ) from error
    return distributed


def check_client(client: Any) -> Client:
    """``client`` itself, once it is known to be a running synchronous ``distributed.Client``."""
    distributed = require_dask()
    if not isinstance(client, distributed.Client):
        raise TypeError(
            f"client must be a distributed.Client (or None to compute locally), "
            f"got {type(client).__name__}"
        )
    if client.asynchronous:
        raise ValueError(
            "client is asynchronous; fastgrad waits for its results, so pass a synchronous "
            "distributed.Client"
        )
    if client.status != "running":
        raise ValueError(f"client is {client.status}, not running; connect it to a cluster first")
    return client


def worker_slots(client: Client) -> int:
    """Tasks the cluster runs at once: its worker threads (at least one)."""
    return max(1, sum(client.nthreads().values()))


def pack(objects: Any, what: str) -> bytes:
    """``objects`` pickled with cloudpickle, or a ``TypeError`` saying what cannot be sent."""
    import cloudpickle  # a dependency of distributed

    try:
        return cloudpickle.dumps(objects)
    except Exception as error:
        raise TypeError(
            f"{what} cannot be sent to the Dask workers: cloudpickle cannot pickle it "
            f"({type(error).__name__}: {error}). Keep objects that cannot leave the process "
            "(locks, open files, sockets, live GPU handles) out of what it refers to, "
            "or create them inside the function"
        ) from error


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (PEP 678), so the message and type stay the user's."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10: the attribute still travels with the pickled exception
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def worker_name() -> str:
    """The address of the Dask worker running this code, for error notes."""
    try:
        from distributed import get_worker

        return f"Dask worker {get_worker().address}"
    except (ImportError, ValueError):
        return "this process (not a Dask worker)"


# ------------------------------------------------------------------ planning
def plan_chunks(
    count: int,
    seconds_per_item: float,
    slots: int,
    *,
    unit: int = 1,
    target_seconds: float | None = None,
    tasks_per_slot: int | None = None,
) -> list[tuple[int, int]]:
    """Cut ``range(count)`` into contiguous ``(start, stop)`` runs, one per task.

    As many tasks as ``slots * tasks_per_slot`` (a few per worker thread, for
    load balance), but no more than make each task ``target_seconds`` of work
    at ``seconds_per_item``, and none smaller than one item. Work for more
    than one round is cut into whole rounds (a multiple of ``slots`` tasks),
    so that no thread is left running a last, lone task while the others
    wait. Runs start at multiples of ``unit`` (all but the last hold whole
    units) and differ in length by at most one unit.

    Parameters
    ----------
    count
        Items to share out (perturbed elements).
    seconds_per_item
        Measured cost of one item (every evaluation of ``f`` it takes).
    slots
        Tasks the cluster runs at once (its worker threads).
    unit
        Items that must stay together (a batched ``f``'s ``chunk_size``).
    target_seconds, tasks_per_slot
        Default to :data:`TARGET_TASK_SECONDS` and :data:`TASKS_PER_WORKER`.

    Examples
    --------
    800 evaluations of 20 ms on 8 worker threads: 16 tasks of one second.

    >>> from fastgrad.distributed import plan_chunks
    >>> runs = plan_chunks(400, 2 * 0.020, 8)
    >>> len(runs), runs[0], runs[-1]
    (16, (0, 25), (375, 400))
    >>> plan_chunks(10, 1e-3, 8)  # 20 ms of work in all: one task
    [(0, 10)]
    """
    if count <= 0:
        return []
    target = TARGET_TASK_SECONDS if target_seconds is None else target_seconds
    per_slot = TASKS_PER_WORKER if tasks_per_slot is None else tasks_per_slot
    slots = max(1, slots)  # a cluster still starting its workers: plan for one
    units = -(-count // unit)
    seconds_per_unit = max(0.0, seconds_per_item) * unit
    by_cost = units if target <= 0 else int(units * seconds_per_unit // target)
    if by_cost >= slots:
        by_cost = by_cost // slots * slots
    tasks = max(1, min(units, slots * per_slot, by_cost))
    bounds = []
    for task in range(tasks):
        first = units * task // tasks
        last = units * (task + 1) // tasks
        bounds.append((first * unit, min(last * unit, count)))
    return bounds


# ------------------------------------------------------------------- running
def run_chunks(
    client: Client,
    payload: bytes,
    task: Callable[[bytes, Any], Any],
    chunks: Sequence[Any],
    name: str,
) -> list[Any]:
    """``[task(payload, chunk) for chunk in chunks]``, run on the cluster's workers.

    ``payload`` is scattered to every worker once. The first task to raise
    cancels the rest and re-raises in the caller, with Dask's remote traceback;
    a worker that dies only has its tasks rerun by the scheduler. Results come
    back in the order of ``chunks``.
    """
    distributed = require_dask()
    token = uuid.uuid4().hex[:12]
    shared = client.scatter(payload, broadcast=True, hash=False)
    futures = [
        client.submit(task, shared, chunk, key=f"{name}-{token}-{index}")
        for index, chunk in enumerate(chunks)
    ]
    position = {future.key: index for index, future in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    done: Any = None
    try:
        # This client's loop, not the default client's: the caller may hold several.
        for done in distributed.as_completed(futures, loop=client.loop):
            try:
                results[position[done.key]] = done.result()
            except distributed.KilledWorker as error:
                add_note(
                    error,
                    f"{name}: every worker that ran task {position[done.key]} of {len(chunks)} "
                    "died (out of memory, or a crash inside the function?)",
                )
                raise
        return results
    finally:
        # Whatever ended the wait (an error, Ctrl-C), leave no work behind on the cluster;
        # and since a traceback keeps this frame alive, drop the futures so that the
        # scheduler frees the payload and the results now rather than when it is collected.
        client.cancel([future for future in futures if not future.done()])
        futures.clear()
        done = None
        del shared


# ---------------------------------------------------- numerical gradients
@dataclass(frozen=True)
class _Chunk:
    """One task's share of a numerical gradient: flat elements ``start:stop``."""

    start: int
    stop: int
    h: float
    method: str
    batched: bool
    rows: int  # perturbations per call of a batched f
    base_value: Any  # f(x) for method="forward", else None
    backend: str


def gradient_on_cluster(
    backend: Backend,
    f: Callable[[Any], Any],
    x: Any,
    h: float,
    method: str,
    batched: bool,
    chunk_size: int | None,
    client: Any,
    elements_per_task: int | None = None,
) -> Any:
    """:func:`fastgrad.numerical_gradient` with ``client=``, its arguments already checked.

    Returns an array of ``x``'s shape and dtype on ``backend``.
    """
    check_client(client)
    size = int(x.size)
    if size == 0:
        return backend.xp.zeros(x.shape, dtype=x.dtype)
    # Before evaluating or sending anything: an f that cannot travel fails at once.
    payload = pack((f, x), "f")
    evaluations = 2 if method == "central" else 1
    base_value = None
    seconds = 0.0
    if method == "forward" or elements_per_task is None:
        # The local loop's f(x) for "forward", and in any case the cost of one call.
        started = time.perf_counter()
        # On copies: x is never written with a client, and f may write its argument.
        if batched:
            base_value = _stack_values(f, x.reshape(-1)[None, :].copy(), x.shape, 1)[0]
        else:
            base_value = _scalar(f(x.copy()), "f(x)")
        seconds = time.perf_counter() - started
    if method != "forward":
        base_value = None
    unit = chunk_size if batched and chunk_size is not None else 1
    if elements_per_task is not None:
        per_task = -(-elements_per_task // unit) * unit
        bounds = [(start, min(start + per_task, size)) for start in range(0, size, per_task)]
    else:
        bounds = plan_chunks(size, evaluations * seconds, worker_slots(client), unit=unit)
    rows = chunk_size if chunk_size is not None else Backend._rows_per_chunk(size)
    chunks = [
        _Chunk(start, stop, float(h), method, batched, rows, base_value, backend.name)
        for start, stop in bounds
    ]
    parts = run_chunks(client, payload, _gradient_chunk, chunks, "fastgrad-numerical-gradient")
    grad = np.concatenate(parts).reshape(x.shape)
    return backend.asarray(grad)


def _gradient_chunk(payload: bytes, chunk: _Chunk) -> np.ndarray:
    """A task: the differences of elements ``chunk.start:chunk.stop``, as a host array."""
    f, x = pickle.loads(payload)
    try:
        from fastgrad.backends import get_backend

        backend = get_backend(chunk.backend)
    except BackendUnavailableError as error:
        add_note(
            error,
            f"on {worker_name()}: install backend {chunk.backend!r} on every worker, or compute "
            "with a backend the workers have",
        )
        raise
    if chunk.batched:
        return backend.to_numpy(_batched_differences(backend, f, x, chunk))
    return _differences(f, x, chunk)


def _differences(f: Callable[[Any], Any], x: Any, chunk: _Chunk) -> np.ndarray:
    """:meth:`Backend.numerical_gradient`'s loop, over this chunk's elements only.

    As there, an ``f`` that writes to ``x`` is a ``RuntimeError``: the moved
    element is checked after every call, the whole of ``x`` (the worker's
    copy) against a snapshot at most ``SNAPSHOT_COMPARES`` times a chunk.
    """
    h = chunk.h
    elements = chunk.stop - chunk.start
    grad = np.zeros(elements, dtype=x.dtype)
    snapshot = x.copy()
    every = -(-elements // SNAPSHOT_COMPARES)
    for position, flat in enumerate(range(chunk.start, chunk.stop)):
        index = tuple(int(i) for i in np.unravel_index(flat, x.shape))
        original = x[index].copy()
        try:
            plus = _moved_value(f, x, index, original + h, "+", chunk, flat)
            if chunk.method == "central":
                minus = _moved_value(f, x, index, original - h, "-", chunk, flat)
                grad[position] = (plus - minus) / (2 * h)
            else:
                grad[position] = (plus - chunk.base_value) / h
        finally:
            x[index] = original
        if (position + 1) % every == 0 or position + 1 == elements:
            _check_unchanged(np, x, snapshot, f"f at x{list(index)}")
    return grad


def _moved_value(
    f: Callable[[Any], Any],
    x: Any,
    index: tuple[int, ...],
    moved: Any,
    sign: str,
    chunk: _Chunk,
    flat: int,
) -> float:
    """``f(x)`` with ``x[index] = moved``; a note on ``f``'s own errors says where it ran."""
    x[index] = moved
    try:
        value = _scalar(f(x), f"f(x {sign} h)")
    except Exception as error:
        add_note(
            error,
            f"raised by f with x{list(index)} moved by {sign}h (h={chunk.h:g}; flat element "
            f"{flat} of {x.size}), on {worker_name()}",
        )
        raise
    if x[index] != moved:
        _element_changed(x, index, moved, f"f(x {sign} h)")
    return value


def _batched_differences(backend: Backend, f: Callable[[Any], Any], x: Any, chunk: _Chunk) -> Any:
    """:meth:`Backend.numerical_gradient_batched`'s stacks, over this chunk's elements only."""
    xp = backend.xp
    h = chunk.h
    flat = x.reshape(-1)
    size = flat.shape[0]
    grad = xp.zeros(chunk.stop - chunk.start, dtype=x.dtype)
    snapshot = x.copy()  # f must not write to x through a closure
    for start in range(chunk.start, chunk.stop, chunk.rows):
        stop = min(start + chunk.rows, chunk.stop)
        count = stop - start
        rows = xp.arange(count)
        columns = xp.arange(start, stop)
        sign = "+"
        try:
            stack = xp.broadcast_to(flat, (count, size)).copy()
            stack[rows, columns] = flat[start:stop] + h
            plus = _stack_values(f, stack, x.shape, count)
            if chunk.method == "central":
                sign = "-"
                stack[...] = flat  # rebuilt: f may have written to the +h stack, its argument
                stack[rows, columns] = flat[start:stop] - h
                minus = _stack_values(f, stack, x.shape, count)
                grad[start - chunk.start : stop - chunk.start] = (plus - minus) / (2 * h)
            else:
                grad[start - chunk.start : stop - chunk.start] = (plus - chunk.base_value) / h
        except Exception as error:
            add_note(
                error,
                f"raised by batched f on the stack of flat elements {start}..{stop - 1} of "
                f"{size}, each moved by {sign}h (h={h:g}), on {worker_name()}",
            )
            raise
        _check_unchanged(xp, x, snapshot, f"f at elements {start}..{stop - 1}")
    return grad
