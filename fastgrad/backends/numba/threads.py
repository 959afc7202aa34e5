"""Run one ``nogil`` Numba kernel on several Python threads that meet at barriers.

The kernel is called as ``kernel(thread, threads, sync, *args)`` on every
thread at once (the calling thread is thread 0) and synchronises through
``sync`` with :func:`fastgrad.backends.numba.sync.barrier`. If a thread
fails before or inside its call, ``sync[ABORT]`` releases the others from
their barriers, so a failure surfaces as the exception instead of a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from fastgrad.backends.numba.sync import ABORT, SYNC_SLOTS


def usable_threads(requested: int) -> int:
    """Threads a barrier kernel may use: ``requested``, or 1 when JIT is disabled.

    Under ``NUMBA_DISABLE_JIT=1`` the kernels are plain Python, whose
    threads would take turns on the GIL and whose barrier atomics do not
    exist.
    """
    # (numba.config sets its attributes at import time: invisible to type checkers)
    disabled = bool(getattr(numba.config, "DISABLE_JIT", 0))
    return 1 if disabled else max(1, requested)


def run_on_threads(kernel: Callable[..., Any], threads: int, *args: Any) -> None:
    """``kernel(t, threads, sync, *args)`` for ``t`` in ``range(threads)``, concurrently.

    Example:
        >>> calls = []
        >>> run_on_threads(lambda t, n, sync: calls.append((t, n)), 1)
        >>> calls
        [(0, 1)]
    """
    sync = np.zeros(SYNC_SLOTS, np.int64)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            kernel(thread, threads, sync, *args)
        except BaseException as error:  # re-raised below, on the calling thread
            sync[ABORT] = 1
            errors.append(error)

    helpers = [
        threading.Thread(target=work, args=(thread,), name=f"fastgrad-numba-{thread}", daemon=True)
        for thread in range(1, threads)
    ]
    for helper in helpers:
        helper.start()
    work(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


class ThreadCountChooser:
    """Chooses, from measured times, how many threads a run of training steps uses.

    Why measure: on an idle machine the chapter's barrier kernel runs about
    1.6x faster on two threads than on one, but next to another CPU-bound
    process a two-thread step waits at its barriers for a thread the
    operating system has set aside, and one thread is faster. Which case
    holds, and when it changes, only the clock can tell.

    The steps run in slices of about :attr:`SLICE_SECONDS`, each on one of
    the candidate counts (``most``, ``most // 2``, ..., 1). Most slices run
    on the current count, which keeps a running mean of its seconds per
    step. Now and then one short slice (:attr:`PROBE_STEPS`) tries the next
    count down or up, alternately; a probe that beats the mean by
    :attr:`MARGIN` becomes the current count. The first slice of a chooser
    is not timed: it pays what a run pays once (starting Numba's threads,
    first touches of its buffers), which made a first two-thread slice of
    the deep nets' loop look 2.5x slower than the one-thread probe after
    it, and a fresh run spend 40 % of its steps on one thread. The first
    probe comes after the first timed slice. After a probe the next one
    waits :attr:`PROBE_COST` times what a probe of the slower side costs,
    and twice as long as the last wait when the probe lost (up to
    :attr:`LONGEST_WAIT_SECONDS`), so probing a count that stalls costs a
    few per cent of the run at most. A slice much slower than the mean (the
    load has changed) brings the next probe forward.

    The choice changes only the speed, never the arithmetic: the callers
    fix how the work is cut independently of the threads that run it.

    Example:
        >>> chooser = ThreadCountChooser(2)
        >>> ran = []
        >>> chooser.run(100, lambda first, last, threads: ran.append((first, last, threads)))
        >>> sum(last - first for first, last, _ in ran)
        100
    """

    SLICE_SECONDS = 0.5
    PROBE_STEPS = 32
    MARGIN = 0.9
    PROBE_COST = 50.0
    SHORTEST_WAIT_SECONDS = 0.1
    LONGEST_WAIT_SECONDS = 5.0
    # a slice this much slower per step than the current count's mean is a change of load
    SURPRISE = 1.5

    def __init__(self, most: int) -> None:
        candidates = [max(1, most)]
        while candidates[-1] > 1:
            candidates.append(candidates[-1] // 2)
        self.candidates: list[int] = candidates[::-1]  # 1, ..., most
        self._current = len(self.candidates) - 1
        self._seconds_per_step: dict[int, float] = {}
        self._wait = 0.0
        self._next_probe = 0.0  # a perf_counter() time; 0: after the first timed slice
        self._probe_down = True
        self._warmed_up = False

    @property
    def threads(self) -> int:
        """The thread count most slices run on now."""
        return self.candidates[self._current]

    def run(self, steps: int, run_slice: Callable[[int, int, int], None]) -> None:
        """``run_slice(first, last, threads)`` over ``range(steps)`` in consecutive slices."""
        first = 0
        while first < steps:
            started = time.perf_counter()
            probe = self._probe_target(started)
            index = self._current if probe is None else probe
            threads = self.candidates[index]
            size = self.PROBE_STEPS if probe is not None else self._slice_steps(threads)
            last = min(steps, first + size)
            run_slice(first, last, threads)
            finished = time.perf_counter()
            self._record(index, (finished - started) / (last - first), probe is not None, finished)
            first = last

    def _slice_steps(self, threads: int) -> int:
        per_step = self._seconds_per_step.get(threads)
        if per_step is None:
            return self.PROBE_STEPS
        return int(min(4096, max(self.PROBE_STEPS, self.SLICE_SECONDS / max(per_step, 1e-9))))

    def _probe_target(self, now: float) -> int | None:
        if len(self.candidates) == 1 or self.threads not in self._seconds_per_step:
            return None
        if now < self._next_probe:
            return None
        down, up = self._current - 1, self._current + 1
        neighbours = [down, up] if self._probe_down else [up, down]
        self._probe_down = not self._probe_down
        return next(i for i in neighbours if 0 <= i < len(self.candidates))

    def _record(self, index: int, per_step: float, probing: bool, now: float) -> None:
        threads = self.candidates[index]
        if not self._warmed_up:
            self._warmed_up = True  # the first slice: one-off costs, not a measure
            return
        mean = self._seconds_per_step.get(threads)
        if not probing:
            if mean is not None and per_step > self.SURPRISE * mean:
                self._next_probe = now
            self._seconds_per_step[threads] = (
                per_step if mean is None else 0.7 * mean + 0.3 * per_step
            )
            return
        self._seconds_per_step[threads] = per_step
        current = self._seconds_per_step[self.threads]
        if per_step < self.MARGIN * current:
            self._current = index
            self._wait = self.SHORTEST_WAIT_SECONDS
        else:
            self._wait = min(2 * self._wait, self.LONGEST_WAIT_SECONDS)
        slower = max(per_step, current) * self.PROBE_STEPS
        self._wait = max(self._wait, self.SHORTEST_WAIT_SECONDS, self.PROBE_COST * slower)
        self._next_probe = now + self._wait
