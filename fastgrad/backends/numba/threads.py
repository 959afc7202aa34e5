"""Run one ``nogil`` Numba kernel on several Python threads that meet at barriers.

The kernel is called as ``kernel(thread, threads, sync, *args)`` on every
thread at once (the calling thread is thread 0) and synchronises through
``sync`` with :func:`fastgrad.backends.numba.sync.barrier`. If a thread
fails before or inside its call, ``sync[ABORT]`` releases the others from
their barriers, so a failure surfaces as the exception instead of a hang.
"""

from __future__ import annotations

import threading
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
