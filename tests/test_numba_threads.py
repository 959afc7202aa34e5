"""How the chapter's training loop chooses its threads, and that the choice changes no result.

The chooser is tested against a fake clock (each slice "takes" a cost per
step that the test sets per thread count), so the tests are exact and
never timed; the real speeds under load are in ``bench/bench_load.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.conftest import backend_or_skip
from tests.test_numba import assert_same_params, copy_of, make_net, needs_jit, sparse_inputs

numba = pytest.importorskip("numba")
threads_module = pytest.importorskip("fastgrad.backends.numba.threads")
ThreadCountChooser = threads_module.ThreadCountChooser

pytestmark = pytest.mark.jit


@pytest.fixture(scope="module")
def numba_backend():
    return backend_or_skip("numba")


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


class FakeClock:
    """``time.perf_counter`` for the chooser; ``run_slice`` advances it by the slice's cost."""

    def __init__(self, cost_per_step: dict[int, float]) -> None:
        self.now = 0.0
        self.cost_per_step = cost_per_step
        self.slices: list[tuple[int, int]] = []  # (threads, steps)

    def perf_counter(self) -> float:
        return self.now

    def run_slice(self, first: int, last: int, threads: int) -> None:
        self.now += (last - first) * self.cost_per_step[threads]
        self.slices.append((threads, last - first))

    def steps_on(self, threads: int, since: int = 0) -> int:
        return sum(steps for count, steps in self.slices[since:] if count == threads)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock({})
    monkeypatch.setattr(threads_module.time, "perf_counter", fake.perf_counter)
    return fake


def test_candidates_halve_down_to_one() -> None:
    assert ThreadCountChooser(1).candidates == [1]
    assert ThreadCountChooser(2).candidates == [1, 2]
    assert ThreadCountChooser(6).candidates == [1, 3, 6]
    assert ThreadCountChooser(16).candidates == [1, 2, 4, 8, 16]


def test_every_step_runs_once_in_order(clock: FakeClock) -> None:
    clock.cost_per_step.update({1: 3e-4, 2: 2e-4})
    ran: list[tuple[int, int]] = []

    def run_slice(first: int, last: int, threads: int) -> None:
        clock.run_slice(first, last, threads)
        ran.append((first, last))

    ThreadCountChooser(2).run(5000, run_slice)
    assert ran[0][0] == 0 and ran[-1][1] == 5000
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(ran))


def test_one_candidate_never_probes(clock: FakeClock) -> None:
    clock.cost_per_step[1] = 1e-4
    ThreadCountChooser(1).run(10_000, clock.run_slice)
    assert {threads for threads, _ in clock.slices} == {1}


def test_on_an_idle_machine_it_keeps_the_most_threads_and_probes_little(clock: FakeClock) -> None:
    # the chapter's float64 step, idle: ~170 us on two threads, ~300 on one
    clock.cost_per_step.update({1: 3.0e-4, 2: 1.7e-4})
    chooser = ThreadCountChooser(2)
    chooser.run(10_000, clock.run_slice)
    assert chooser.threads == 2
    one_thread_time = clock.steps_on(1) * 3.0e-4
    assert one_thread_time < 0.05 * clock.now


def test_under_load_it_moves_to_one_thread_and_probes_little(clock: FakeClock) -> None:
    # next to a CPU-bound process two threads stall at their barriers
    clock.cost_per_step.update({1: 3.3e-4, 2: 4.0e-3})
    chooser = ThreadCountChooser(2)
    chooser.run(10_000, clock.run_slice)
    assert chooser.threads == 1
    # the whole run costs at most a few per cent more than one thread alone
    assert clock.now < 1.08 * 10_000 * 3.3e-4


def test_it_follows_the_load_as_it_comes_and_goes(clock: FakeClock) -> None:
    chooser = ThreadCountChooser(2)
    clock.cost_per_step.update({1: 3.0e-4, 2: 1.7e-4})
    chooser.run(3000, clock.run_slice)
    assert chooser.threads == 2
    clock.cost_per_step[2] = 4.0e-3  # another process starts
    chooser.run(3000, clock.run_slice)
    assert chooser.threads == 1
    clock.cost_per_step[2] = 1.7e-4  # ... and ends
    since = len(clock.slices)
    chooser.run(60_000, clock.run_slice)
    assert chooser.threads == 2
    # back on two threads within the longest wait between probes and a slice
    steps_before_return = 0
    for threads, steps in clock.slices[since:]:
        if threads == 2 and steps > chooser.PROBE_STEPS:
            break
        steps_before_return += steps
    assert steps_before_return * 3.0e-4 < chooser.LONGEST_WAIT_SECONDS + 2 * chooser.SLICE_SECONDS


def test_a_slow_first_slice_does_not_send_it_to_fewer_threads(clock: FakeClock) -> None:
    # the first call of a run starts the threads and touches fresh buffers:
    # its slice costs 2.5 ms a step on two threads, the steps after 0.6 ms
    clock.cost_per_step.update({1: 1.0e-3, 2: 2.5e-3})
    chooser = ThreadCountChooser(2)
    chooser.run(chooser.PROBE_STEPS, clock.run_slice)
    clock.cost_per_step[2] = 0.6e-3
    chooser.run(10_000, clock.run_slice)
    assert chooser.threads == 2
    # only the probes ran on one thread (timed from the first slice, 40 % of the steps did)
    assert clock.steps_on(1) * 1.0e-3 < 0.05 * clock.now


def test_a_probe_must_win_by_the_margin(clock: FakeClock) -> None:
    # one thread only 5 % faster: within the margin, not worth a switch
    clock.cost_per_step.update({1: 0.95e-4, 2: 1.0e-4})
    chooser = ThreadCountChooser(2)
    chooser.run(20_000, clock.run_slice)
    assert chooser.threads == 2


@needs_jit
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "sizes, activation, decay",
    [((40, 20, 4), "sigmoid", 0.0), ((40, 9, 7, 4), "relu", 0.01)],
    ids=["chapter-net", "deep-net"],
)
def test_the_chosen_thread_counts_change_no_bit_of_the_training(
    numba_backend, threads, dtype, sizes, activation, decay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chapter's loop cuts its blocks, the deep one its chunks, for the
    # most threads; whichever counts the chooser runs the slices on (here
    # forced to change at every slice), each step does the same arithmetic,
    # so the result equals the fixed-count run's.
    from fastgrad.backends import numba as numba_backend_module

    class Alternating(ThreadCountChooser):
        def run(self, steps, run_slice):
            for first in range(0, steps, 3):
                run_slice(first, min(steps, first + 3), 1 + (first // 3) % 2)

    numba.set_num_threads(2)
    monkeypatch.setattr(numba_backend_module, "ThreadCountChooser", Alternating)
    monkeypatch.setattr(numba_backend_module, "_THREAD_CHOOSERS", {})
    net = make_net(sizes, activation, dtype, decay=decay, scale=0.3)
    X = sparse_inputs(30, 40, dtype)
    labels = np.random.default_rng(3).integers(0, 4, 30)
    indices = np.random.default_rng(4).integers(0, 30, (11, 9))

    def train(choose: bool):
        trained = copy_of(net)
        monkeypatch.setattr(numba_backend, "choose_threads", choose)
        losses = trained.sgd_steps(X, labels, indices, 0.5)
        return trained, losses

    fixed, fixed_losses = train(False)
    chosen, chosen_losses = train(True)
    assert numba_backend_module._THREAD_CHOOSERS, "the chooser did not run"
    np.testing.assert_array_equal(chosen_losses, fixed_losses)
    assert_same_params(chosen, fixed)
