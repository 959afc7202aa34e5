"""Numerical gradients and gradient checks on a real Dask cluster (``client=``).

Two worker processes of a ``distributed.LocalCluster`` on 127.0.0.1, shared by
the module: results must be the local ones bit for bit whatever the chunking,
faults (a killed worker, an ``f`` that raises, an ``f`` that cannot be
pickled) must end as the issue says, and nothing of Dask may load without a
client. Skipped without Dask; ``FASTGRAD_REQUIRE_EXTRAS=dask`` (CI) fails
instead. The functions sent to the workers live at module level, so workers
import them by reference from this module.
"""

from __future__ import annotations

import doctest
import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fastgrad
from fastgrad import distributed as fg_distributed
from fastgrad.backends import unavailable_reason
from tests.conftest import backend_or_skip, import_extra_or_skip
from tests.test_gradcheck import SMALL, HandNet, batch

pytestmark = pytest.mark.dask

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------ functions the workers run
def smooth(x):
    weights = np.linspace(-1.0, 2.0, x.size).reshape(x.shape)
    return float(np.sum(np.sin(x) * weights) + np.prod(np.cos(x.reshape(-1)[:3])))


def smooth_stack(stack):
    rows = stack.reshape(stack.shape[0], -1)
    weights = np.linspace(-1.0, 2.0, rows.shape[1])
    return np.sum(np.sin(rows) * weights, axis=1) + np.prod(np.cos(rows[:, :3]), axis=1)


def slow_smooth(seconds, x):
    time.sleep(seconds)
    return smooth(x)


def recording_stack(folder, stack):
    # One file per worker process: the stack sizes that reached f there.
    with open(Path(folder) / f"calls-{os.getpid()}", "a") as log:
        log.write(f"{stack.shape[0]}\n")
    return smooth_stack(stack)


def singular_at(threshold, x):
    if x[1, 2] > threshold:
        raise np.linalg.LinAlgError("singular matrix")
    return smooth(x)


def diverging_stack(limit, stack):
    if (stack.reshape(stack.shape[0], -1)[:, 3] > limit).any():
        raise FloatingPointError("solver diverged")
    return smooth_stack(stack)


class SimulatorCrashed(RuntimeError):
    pass


def crashing_loss(net, original, x, t):
    if net.params["W2"][1, 2] != original:
        raise SimulatorCrashed("the simulator crashed")
    return HandNet.loss(net, x, t)


def tasks_taken_from_dead_workers(since, dask_scheduler=None):
    """Keys of ours the scheduler moved off a worker that it lost (to run them again)."""
    return sorted(
        str(entry.key)
        for entry in dask_scheduler.transition_log
        if entry.timestamp >= since
        and "fastgrad-numerical-gradient" in str(entry.key)
        and entry.start == "processing"
        and entry.finish != "memory"
    )


def exits(x):
    os._exit(3)  # a crash that takes the worker process with it


def set_allowed_failures(value, dask_scheduler=None):
    previous, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, value
    return previous


def point(shape=(5, 7), seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def same_bits(got, expected):
    return got.dtype == expected.dtype and got.shape == expected.shape and (
        got.tobytes() == expected.tobytes()
    )


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    distributed = import_extra_or_skip("dask", "distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def module_client(cluster):
    distributed = import_extra_or_skip("dask", "distributed")
    # Not the default client: fastgrad must use the client it is given, and only it.
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture
def client(module_client):
    # A test that killed a worker leaves its restart to the nanny; wait for it here.
    module_client.wait_for_workers(2, timeout=60)
    return module_client


# ------------------------------------------------------- without Dask, or a client
def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_fastgrad_and_local_gradients_load_no_dask():
    loaded = run_python(
        "import sys, numpy as np, fastgrad\n"
        "fastgrad.numerical_gradient(lambda x: float(x.sum()), np.ones(3))\n"
        "heavy = {'dask', 'distributed', 'cloudpickle', 'tornado'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "             or m == 'fastgrad.distributed'))"
    )
    assert loaded == "[]"


def test_a_missing_dask_names_the_extra():
    said = run_python(
        "import sys\n"
        "sys.modules['distributed'] = None  # import distributed now raises ImportError\n"
        "import numpy as np, fastgrad\n"
        "w = np.ones(3)\n"
        "calls = [lambda: fastgrad.numerical_gradient(lambda x: float(x.sum()), w,"
        " client=object()),\n"
        "         lambda: fastgrad.check_gradients(lambda: float(w.sum()), w, w, client=1)]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except fastgrad.BackendUnavailableError as error:\n"
        "        print(error)\n"
    )
    lines = said.splitlines()
    assert len(lines) == 2
    assert all("pip install 'fastgrad[dask]'" in line and "client=" in line for line in lines)


def test_chunk_plans_cover_every_element_once_in_tasks_of_a_second_or_more():
    plan = fg_distributed.plan_chunks
    for count, cost, slots in [(400, 0.04, 8), (400, 0.04, 1), (37, 3.0, 2), (5, 0.0, 4)]:
        runs = plan(count, cost, slots)
        assert runs[0][0] == 0 and runs[-1][1] == count
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert len(runs) <= 4 * slots
        lengths = [stop - start for start, stop in runs]
        assert max(lengths) - min(lengths) <= 1
        if len(runs) > 1:
            assert min(lengths) * cost >= 0.99 * fg_distributed.TARGET_TASK_SECONDS
    assert len(plan(400, 0.04, 8)) == 16 and len(plan(400, 0.04, 2)) == 8
    assert len(plan(37, 3.0, 2)) == 8  # 111 s of work: 4 tasks per worker thread
    assert len(plan(400, 15.5 / 400, 8)) == 8  # 15 s-tasks would leave 7 threads idle
    assert len(plan(400, 25.0 / 400, 8)) == 24  # whole rounds of tasks of a second or more
    assert plan(0, 1.0, 2) == []
    assert plan(3, 1.0, 0) == [(0, 1), (1, 2), (2, 3)]  # no workers yet: counted as one slot
    # A batched f's chunk_size stays whole: tasks start at multiples of it.
    assert plan(23, 1.0, 2, unit=5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert plan(23, 1.0, 1, unit=5, tasks_per_slot=2) == [(0, 10), (10, 23)]


def test_bad_arguments_get_one_clear_error(client):
    x = point()
    with pytest.raises(TypeError, match=r"client must be a distributed\.Client"):
        fastgrad.numerical_gradient(smooth, x, client="tcp://127.0.0.1:8786")
    with pytest.raises(TypeError, match=r"client must be a distributed\.Client"):
        fastgrad.gradient_check(HandNet(SMALL), *batch(SMALL), client=object())
    with pytest.raises(ValueError, match="elements_per_task must be a positive integer"):
        fastgrad.numerical_gradient(smooth, x, client=client, elements_per_task=0)
    with pytest.raises(ValueError, match=r"elements_per_task .* needs client="):
        fastgrad.numerical_gradient(smooth, x, elements_per_task=4)
    distributed = import_extra_or_skip("dask", "distributed")
    closed = distributed.Client(client.cluster, set_as_default=False)
    closed.close()
    with pytest.raises(ValueError, match="client is closed"):
        fastgrad.numerical_gradient(smooth, x, client=closed)


# --------------------------------------------------------- the same bits, anywhere
@pytest.mark.parametrize("method", ["central", "forward"])
def test_the_gradient_is_the_local_one_bit_for_bit_whatever_the_chunking(client, method):
    x = point()
    before = x.tobytes()
    expected = fastgrad.numerical_gradient(smooth, x.copy(), method=method)
    for elements_per_task in (1, 4, 34, 35, None):
        got = fastgrad.numerical_gradient(
            smooth, x, method=method, client=client, elements_per_task=elements_per_task
        )
        assert same_bits(got, expected), elements_per_task
    assert x.tobytes() == before


def test_float32_and_zero_dimensional_x(client):
    x32 = point((9,), dtype=np.float32)
    with pytest.warns(fastgrad.PrecisionWarning):
        expected = fastgrad.numerical_gradient(smooth, x32.copy())
    with pytest.warns(fastgrad.PrecisionWarning):
        got = fastgrad.numerical_gradient(smooth, x32, client=client, elements_per_task=2)
    assert same_bits(got, expected)
    scalar = np.array(0.3)
    expected = fastgrad.numerical_gradient(lambda a: float(np.sin(a) * a), scalar.copy())
    got = fastgrad.numerical_gradient(lambda a: float(np.sin(a) * a), scalar, client=client)
    assert same_bits(got, expected)
    empty = np.zeros((0, 3))
    assert fastgrad.numerical_gradient(smooth, empty, client=client).shape == (0, 3)


def test_an_f_that_reads_x_through_its_closure_sees_the_workers_perturbations(client):
    params = {"W": point((4, 3))}

    def loss(_):  # the book's `lambda W: net.loss(x, t)`: the argument is ignored
        return float(np.sum(np.tanh(params["W"]) ** 2))

    expected = fastgrad.numerical_gradient(loss, params["W"])
    got = fastgrad.numerical_gradient(loss, params["W"], client=client, elements_per_task=3)
    assert same_bits(got, expected)
    assert np.abs(got).min() > 0


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_batched_f_is_the_local_one_bit_for_bit(client, chunk_size):
    # smooth_stack computes each row on its own, so any stack gives a row the same bits.
    x = point((3, 6))
    for elements_per_task in (1, 5, 18, None):
        for method in ("central", "forward"):
            local = fastgrad.numerical_gradient(
                smooth_stack, x, batched=True, chunk_size=chunk_size, method=method
            )
            got = fastgrad.numerical_gradient(
                smooth_stack,
                x,
                batched=True,
                chunk_size=chunk_size,
                method=method,
                client=client,
                elements_per_task=elements_per_task,
            )
            assert same_bits(got, local), (elements_per_task, method)


def test_batched_f_gets_one_stack_per_task_and_sign(client, tmp_path):
    x = point((12,))
    f = functools.partial(recording_stack, str(tmp_path))
    got = fastgrad.numerical_gradient(f, x, batched=True, client=client, elements_per_task=5)
    assert same_bits(got, fastgrad.numerical_gradient(smooth_stack, x, batched=True))
    sizes = sorted(int(n) for log in tmp_path.glob("calls-*") for n in log.read_text().split())
    assert sizes == [2, 2, 5, 5, 5, 5]
    one_task = fastgrad.numerical_gradient(smooth_stack, x, batched=True, client=client)
    assert same_bits(one_task, got)


def test_workers_run_the_callers_backend(client):
    numba_backend = backend_or_skip("numba")
    import numba

    @numba.njit
    def compiled(x):
        total = 0.0
        for i in range(x.size):
            total += np.sin(x.flat[i]) * (i + 1)
        return total

    x = point((10,))
    local = fastgrad.numerical_gradient(compiled, x, backend=numba_backend)
    got = fastgrad.numerical_gradient(
        compiled, x, backend="numba", client=client, elements_per_task=3
    )
    assert same_bits(got, local)
    stack_local = fastgrad.numerical_gradient(smooth_stack, x, batched=True, backend="numba")
    stack_got = fastgrad.numerical_gradient(
        smooth_stack, x, batched=True, backend="numba", client=client
    )
    np.testing.assert_allclose(stack_got, stack_local, rtol=1e-12)


def test_a_worker_without_the_backend_says_so(client):
    if unavailable_reason("cupy") is None:
        pytest.skip("cupy runs here, so a worker that lacks it cannot be shown")
    payload = fg_distributed.pack((smooth, point()), "f")
    chunk = fg_distributed._Chunk(0, 3, 1e-4, "central", False, 1, None, "cupy")
    with pytest.raises(fastgrad.BackendUnavailableError, match="cupy") as caught:
        client.submit(fg_distributed._gradient_chunk, payload, chunk).result()
    assert any("install backend 'cupy' on every worker" in note for note in caught.value.__notes__)


@pytest.mark.gpu
def test_cupy_arrays_are_differentiated_on_the_workers_gpus(client):
    cupy_backend = backend_or_skip("cupy")
    x = cupy_backend.asarray(point((6,)))
    local = fastgrad.numerical_gradient(smooth_stack, x, batched=True)
    got = fastgrad.numerical_gradient(smooth_stack, x, batched=True, client=client)
    assert type(got) is type(x)
    np.testing.assert_allclose(cupy_backend.to_numpy(got), cupy_backend.to_numpy(local))


# ----------------------------------------------------------------------- faults
def test_f_raising_on_a_worker_raises_here_with_its_type_message_and_element(client):
    x = point()
    f = functools.partial(singular_at, float(x[1, 2]))
    with pytest.raises(np.linalg.LinAlgError) as caught:
        fastgrad.numerical_gradient(f, x, client=client, elements_per_task=4)
    assert str(caught.value) == "singular matrix"
    notes = caught.value.__notes__
    assert any("x[1, 2] moved by +h" in note and "flat element 9" in note for note in notes)
    assert any("Dask worker tcp://127.0.0.1:" in note for note in notes)
    x = point((8,))
    stack = functools.partial(diverging_stack, float(x[3]))
    with pytest.raises(FloatingPointError) as caught:
        fastgrad.numerical_gradient(stack, x, batched=True, client=client, elements_per_task=2)
    assert str(caught.value) == "solver diverged"
    assert any("stack of flat elements 2..3 of 8" in n for n in caught.value.__notes__)


def test_an_f_that_cannot_be_pickled_fails_before_any_work_is_sent(client, monkeypatch):
    lock = threading.Lock()

    def locked(x):
        with lock:
            return smooth(x)

    def no_traffic(*args, **kwargs):
        raise AssertionError("work was sent to the cluster")

    monkeypatch.setattr(client, "scatter", no_traffic)
    monkeypatch.setattr(client, "submit", no_traffic)
    with pytest.raises(TypeError, match=r"f cannot be sent to the Dask workers.*_thread\.lock"):
        fastgrad.numerical_gradient(locked, point(), client=client)
    net = HandNet(SMALL)
    net.lock = lock
    with pytest.raises(TypeError, match=r"model.loss\(x, t\) cannot be sent"):
        fastgrad.gradient_check(net, *batch(SMALL), client=client)


def test_a_worker_killed_mid_run_loses_nothing(client):
    x = point((24,))
    expected = fastgrad.numerical_gradient(smooth, x.copy())
    pids = client.run(os.getpid)
    f = functools.partial(slow_smooth, 0.04)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            fastgrad.numerical_gradient, f, x, client=client, elements_per_task=2
        )
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            busy = {
                worker: keys
                for worker, keys in client.processing().items()
                if any("fastgrad-numerical-gradient" in str(key) for key in keys)
            }
            victim = next(iter(busy), None)
            time.sleep(0.01)
        assert victim is not None, "no task of ours ever ran"
        time.sleep(0.05)  # inside f now: the task dies half done
        killed_at = time.time()
        os.kill(pids[victim], signal.SIGKILL)
        got = running.result(timeout=120)
    assert same_bits(got, expected)
    assert client.run_on_scheduler(tasks_taken_from_dead_workers, since=killed_at)
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()


def test_an_f_that_kills_every_worker_it_runs_on_is_given_up_with_a_note(client):
    distributed = import_extra_or_skip("dask", "distributed")
    previous = client.run_on_scheduler(set_allowed_failures, 0)
    try:
        # elements_per_task: no timing call of f here, which would end this process.
        with pytest.raises(distributed.KilledWorker) as caught:
            fastgrad.numerical_gradient(exits, point((2,)), client=client, elements_per_task=2)
    finally:
        client.run_on_scheduler(set_allowed_failures, previous)
    assert any("every worker that ran task 0 of 1 died" in n for n in caught.value.__notes__)


# --------------------------------------------------------------- gradient checks
def reports_agree(got, expected):
    assert got.parameters == expected.parameters
    assert got.loss_evaluations == expected.loss_evaluations
    assert (got.mode, got.step, got.rtol, got.notes) == (
        expected.mode,
        expected.step,
        expected.rtol,
        expected.notes,
    )


@pytest.mark.parametrize("many_tasks", [False, True], ids=["planned", "many-tasks"])
@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_gradient_check_on_a_cluster_is_the_local_report(client, monkeypatch, mode, many_tasks):
    if many_tasks:
        # Every task as short as one element allows: the most chunk boundaries.
        monkeypatch.setattr(fg_distributed, "TARGET_TASK_SECONDS", 0.0)
    net = HandNet(SMALL, decay=0.05)
    x, t = batch(SMALL)
    before = {name: (id(array), array.tobytes()) for name, array in net.params.items()}
    expected = fastgrad.gradient_check(net, x, t, mode=mode)
    got = fastgrad.gradient_check(net, x, t, mode=mode, client=client)
    assert got.passed
    reports_agree(got, expected)
    assert {name: (id(a), a.tobytes()) for name, a in net.params.items()} == before


def test_a_wrong_gradient_is_found_and_localised_on_the_cluster(client):
    net = HandNet(SMALL, bug="one wrong element")
    x, t = batch(SMALL)
    expected = fastgrad.gradient_check(net, x, t, mode="fast")
    got = fastgrad.gradient_check(net, x, t, mode="fast", client=client)
    assert got.failed == ["W1"] and got.parameters[0].worst_index == (5, 3)
    reports_agree(got, expected)


def test_check_gradients_of_a_function_reading_its_params_through_a_closure(client):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5, 4))
    params = {"w": rng.standard_normal(4), "c": np.array([0.3])}

    def f():
        return float(np.sum(np.tanh(A @ params["w"] + params["c"]) ** 2))

    z = np.tanh(A @ params["w"] + params["c"])
    dz = 2 * z * (1 - z**2)
    grads = {"w": A.T @ dz, "c": np.array([dz.sum()]) * 2}  # c is wrong
    expected = fastgrad.check_gradients(f, params, grads)
    got = fastgrad.check_gradients(f, params, grads, client=client)
    assert got.failed == ["c"]
    reports_agree(got, expected)


def test_a_loss_raising_on_a_worker_raises_here_naming_the_element(client):
    net = HandNet(SMALL)
    x, t = batch(SMALL)
    before = {name: array.tobytes() for name, array in net.params.items()}
    net.loss = functools.partial(crashing_loss, net, float(net.params["W2"][1, 2]))
    with pytest.raises(SimulatorCrashed) as caught:
        fastgrad.gradient_check(net, x, t, client=client)
    assert str(caught.value) == "the simulator crashed"
    assert any("model.loss(x, t) at W2[1, 2] moved by" in n for n in caught.value.__notes__)
    assert {name: array.tobytes() for name, array in net.params.items()} == before


def test_own_models_keep_their_kernel_and_say_so(client):
    net = fastgrad.TwoLayerNet(6, 4, 3, seed=0)
    x, t = np.random.default_rng(0).random((5, 6)), np.arange(5) % 3
    expected = fastgrad.gradient_check(net, x, t)
    got = fastgrad.gradient_check(net, x, t, client=client)
    assert got.passed and got.parameters == expected.parameters
    assert any("client= not used" in note for note in got.notes)
    sampled = fastgrad.gradient_check(net, x, t, mode="sampled", k=3, client=client)
    local = fastgrad.gradient_check(net, x, t, mode="sampled", k=3)
    assert sampled.parameters == local.parameters


def test_the_modules_example_runs():
    import_extra_or_skip("dask", "distributed")
    result = doctest.testmod(fg_distributed, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def zeroing(x):
    value = float(np.sum(x**2))
    x[...] = 0.0  # writes the element it is differentiated at, and the rest
    return value


def drifting(x):
    value = float(np.sum(x**2))
    x.reshape(-1)[-1] += 1.0  # never the element moved first: found by the snapshot
    return value


def writing_through_closure(target, stack):
    target[...] += 1.0
    return (stack**2).sum(axis=1)


@pytest.mark.parametrize("f", [zeroing, drifting], ids=["moved-element", "other-element"])
def test_an_f_writing_x_on_a_worker_is_an_error_as_locally(client, f):
    # On a worker f writes the worker's copy, not the caller's x; the
    # gradient of a moving target would still be wrong, so it is an error.
    x = point((6,))
    before = x.copy()
    with pytest.raises(RuntimeError, match=r"changed x: x\[\d\] held|changed x: x\[\d\] holds"):
        fastgrad.numerical_gradient(f, x, client=client, elements_per_task=3)
    np.testing.assert_array_equal(x, before)


def test_a_batched_f_writing_x_through_its_closure_is_an_error(client):
    x = point((6,))
    before = x.copy()
    f = functools.partial(writing_through_closure, x)
    with pytest.raises(RuntimeError, match="changed x"):
        fastgrad.numerical_gradient(f, x, batched=True, client=client, elements_per_task=3)
    np.testing.assert_array_equal(x, before)
