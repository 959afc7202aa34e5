"""A spin barrier for Numba kernels that run on several Python threads at once.

Why not ``prange``: a training step is a few hundred microseconds of work
that needs two meeting points (after the forward pass, after the update).
A ``parallel=True`` kernel does that too, but it compiled in 13.7 s cold and
loaded ~1 s slower from Numba's cache (numba#8085), against the backend's
15 s and 2 s budgets. Plain ``nogil`` kernels called from ``threading``
threads load like any serial kernel; they only need a barrier, which this
module builds from two LLVM atomics.

The barrier is a counter that only grows: crossing barrier number ``g``
(counted from 0) means adding 1 and waiting until the counter reaches
``threads * (g + 1)``. No reset, so no race between a fast thread's next
barrier and a slow thread still leaving this one. ``sync[ABORT]`` set to
non-zero (by the Python side, when a thread failed before it got going)
releases every waiter, which then returns early.

Work between two barriers can be handed out by ``take_ticket``: each call
returns the next number of a shared counter, so threads that run faster
(a VM's cores are not always equally fast) simply take more pieces. The
owner of a counter resets it at a point where no thread takes from it.

Waiting: a thread pause-spins for a few microseconds, then calls
``sched_yield`` between checks, giving its core to any thread ready on it.
That matters twice. A helper thread, woken by its starter, is placed on the
starter's core, and a starter that spun there kept it off for a scheduler
tick (~4 ms per kernel call, against ~80 us with the yield). And next to
other processes a spinning thread takes a core that the thread it waits
for may need. (Lock-step threads are still slow next to a CPU-bound
process; the training loops choose fewer threads then:
:class:`~fastgrad.backends.numba.threads.ThreadCountChooser`.)

Why it pays: the chapter's float64 training run (10,000 steps of batch
100) on two threads meeting here took 1.77 s against 2.86 s on one thread,
1.6x (medians of 5 interleaved rounds, idle 2-core VM, 2026-12-02; the
setting of ``bench/bench_load.py``).

Memory ordering: the increment is a sequentially consistent read-modify-write
and the wait is an acquire load, so everything a thread wrote before the
barrier is visible to every thread after it (C++ release/acquire rules, which
LLVM follows).

Under ``NUMBA_DISABLE_JIT=1`` these intrinsics cannot run; the backend then
uses one thread, and ``barrier`` never reaches them.
"""

from __future__ import annotations

import platform

import llvmlite.ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic

# Slots of the int64 ``sync`` array, each on its own cache line so that
# spinning on one does not bounce the others: the barrier's counter, the
# abort flag, and the counter that hands out batch rows (``take_ticket``).
COUNTER = 0
ABORT = 8
ROW_TICKETS = 16
SYNC_SLOTS = 24


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _slot_pointer(context, builder, array_type, array, index_type, index):
    view = context.make_array(array_type)(context, builder, array)
    offset = context.cast(builder, index, index_type, types.intp)
    return builder.gep(view.data, [offset])


@intrinsic
def _fetch_add(typingctx, sync, index, value):
    """``sync[index] += value`` atomically (sequentially consistent); returns the old value."""
    signature = types.int64(sync, index, value)

    def codegen(context, builder, sig, args):
        slot = _slot_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        amount = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", slot, amount, "seq_cst")

    return signature, codegen


@intrinsic
def _load_acquire(typingctx, sync, index):
    """``sync[index]``, read atomically with acquire ordering (never hoisted out of a loop)."""
    signature = types.int64(sync, index)

    def codegen(context, builder, sig, args):
        slot = _slot_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load_atomic(slot, "acquire", 8)

    return signature, codegen


@intrinsic
def _spin_pause(typingctx):
    """x86 ``pause``: tells the core this is a spin-wait loop (a no-op elsewhere)."""

    def codegen(context, builder, sig, args):
        if _X86:
            name = "llvm.x86.sse2.pause"
            module = builder.module
            function = module.globals.get(name) or llvm_ir.Function(
                module, llvm_ir.FunctionType(llvm_ir.VoidType(), []), name
            )
            builder.call(function, [])
        return context.get_dummy_value()

    return types.void(), codegen


# ``sched_yield`` (POSIX) lets the core run another thread that is ready on
# it. Windows has no such libc call; there the barrier only spins.
_HAS_SCHED_YIELD = platform.system() != "Windows"


@intrinsic
def _yield_core(typingctx):
    """``sched_yield()``: give the core to a ready thread, if any (a no-op on Windows)."""

    def codegen(context, builder, sig, args):
        if _HAS_SCHED_YIELD:
            module = builder.module
            function = module.globals.get("sched_yield") or llvm_ir.Function(
                module, llvm_ir.FunctionType(llvm_ir.IntType(32), []), "sched_yield"
            )
            builder.call(function, [])
        return context.get_dummy_value()

    return types.void(), codegen


# Pause-spins before a waiting thread starts yielding its core: ~10-40 us,
# longer than a balanced step's phases wait for each other.
SPINS_BEFORE_YIELD = 1000


@njit(cache=True, nogil=True)
def barrier(sync, threads, generation):
    """Wait until all ``threads`` have reached barrier number ``generation``.

    Returns False when the run was aborted (``sync[ABORT]`` set), True
    otherwise. One thread passes straight through.
    """
    if threads == 1:
        return True
    _fetch_add(sync, COUNTER, 1)
    target = threads * (generation + 1)
    spins = 0
    while _load_acquire(sync, COUNTER) < target:
        if _load_acquire(sync, ABORT) != 0:
            return False
        if spins < SPINS_BEFORE_YIELD:
            spins += 1
            _spin_pause()
        else:
            # The thread this one waits for may be ready on this very core
            # (a woken thread is placed beside its waker), or the core may
            # be wanted by another process: spinning on would keep them
            # waiting for a scheduler time slice.
            _yield_core()
    return True


@njit(cache=True, nogil=True)
def take_ticket(sync, slot, threads):
    """The next number (0, 1, 2, ...) of the counter ``sync[slot]``, shared by ``threads``.

    >>> import numpy as np
    >>> sync = np.zeros(SYNC_SLOTS, np.int64)
    >>> [take_ticket(sync, ROW_TICKETS, 1) for _ in range(3)]
    [0, 1, 2]
    """
    if threads == 1:
        # no other thread: a plain increment (also what runs without JIT)
        ticket = sync[slot]
        sync[slot] = ticket + 1
        return ticket
    return _fetch_add(sync, slot, 1)
