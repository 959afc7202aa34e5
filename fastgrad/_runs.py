"""The folders ``fastgrad train`` writes: a fresh one for every run, locked while it is written.

A run without ``--out`` gets ``runs/<UTC timestamp>``, created exclusively: when
another run took that name (two runs started in the same second), ``-2``,
``-3``, ... is appended, so two runs never share a default folder. Whatever the
folder, a run holds ``.fastgrad-run.lock`` in it from start to end: an
exclusive ``flock`` on that file, which the kernel drops when the process ends
however it ends, so the lock of a killed run never blocks the next one (which
takes it over). A run asking for a folder whose lock is held is refused. Where
``fcntl`` is missing (Windows), the lock is the file itself, created
exclusively; one left by a crash must then be deleted by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderBusyError", "locked_run_folder", "new_run_folder"]

LOCK_NAME = ".fastgrad-run.lock"


class RunFolderBusyError(RuntimeError):
    """Another live run holds the folder's lock; the message names its pid."""


def new_run_folder(parent: Path, when: float | None = None) -> Path:
    """Create and return a folder of ``parent`` named by the UTC time, unused until now.

    ``when`` (seconds since the epoch) defaults to now.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            # mkdir is atomic: of two runs asking for one name, exactly one gets it.
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")  # itertools.count never ends


@contextlib.contextmanager
def locked_run_folder(folder: Path | None, parent: Path = Path("runs")) -> Iterator[Path]:
    """The run's folder (``folder``, or a new one under ``parent``), locked for the block.

    The lock file is removed at the end, and so is the folder when this run
    created it and left nothing in it (a run that failed before writing).

    Raises
    ------
    RunFolderBusyError
        Another live run holds ``folder``'s lock.
    OSError
        ``folder`` cannot be created or written (a file of that name, no permission).
    """
    if folder is None:
        folder = new_run_folder(parent)
        created = True
    else:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
    try:
        release = _lock(folder)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        yield folder
    finally:
        release()
        _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):  # not empty, or already gone: keep it
            folder.rmdir()


def _busy(folder: Path, holder: str) -> RunFolderBusyError:
    pid = holder.strip() or "unknown"
    return RunFolderBusyError(
        f"--out {folder} is being written by another fastgrad run (pid {pid}); give another "
        "--out, or wait for that run to end"
    )


def _lock(folder: Path) -> Callable[[], None]:
    path = folder / LOCK_NAME
    if fcntl is None:
        return _lock_by_creation(folder, path)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace")
            os.close(handle)
            raise _busy(folder, holder) from None
        except BaseException:
            os.close(handle)
            raise
        # The previous holder unlinks the file before it lets go: if it did so
        # between our open and our flock, we hold a lock nobody else can see.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(handle), current):
            break
        os.close(handle)
    # A killed run's pid may still be in the file: this run takes the lock over.
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)

    def release() -> None:
        # Unlinked while still held, so no run can lock the old file after us.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(handle)

    return release


def _lock_by_creation(folder: Path, path: Path) -> Callable[[], None]:
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            holder = path.read_text(errors="replace")
        except OSError:
            holder = ""
        error = _busy(folder, holder)
        error.args = (f"{error}; if no run is using the folder, delete {path}",)
        raise error from None
    os.write(handle, f"{os.getpid()}\n".encode())
    os.close(handle)

    def release() -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    return release
