"""Run folders: one per run, written whole, and locked while a run writes them.

The concurrency cases start real ``python -m fastgrad train`` processes.
"""

from __future__ import annotations

import calendar
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastgrad import _runs, cli
from fastgrad._runs import LOCK_NAME, RunFolderBusyError, locked_run_folder, new_run_folder
from fastgrad.checkpoint import load_params
from fastgrad.train import TrainingHistory

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ["history.json", "params.npz", "training.png"]

posix_only = pytest.mark.skipif(_runs.fcntl is None, reason="the flock lock is POSIX's")


def start_train(*arguments: str, cwd: Path) -> subprocess.Popen:
    environment = {name: value for name, value in os.environ.items() if name != "FASTGRAD_BACKEND"}
    environment.pop("FASTGRAD_DATA_DIR", None)
    # PYTHONPATH: the subprocess runs from tmp_path and must import this checkout.
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    )
    return subprocess.Popen(
        [sys.executable, "-m", "fastgrad", "train", "--dataset", "mini", "--hidden", "4",
         "--backend", "numpy", "--seed", "0", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=cwd,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def assert_complete_run(folder: Path, iters: int) -> None:
    names = sorted(path.name for path in folder.iterdir())
    expected = sorted(OUTPUTS) if "training.png" in names else sorted(OUTPUTS[:2])
    assert names == expected, names  # no lock, no temporary file left
    history = TrainingHistory.load(folder / "history.json")
    assert len(history.losses) == iters
    assert load_params(folder / "params.npz").layer_sizes == [784, 4, 10]


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ------------------------------------------------------------------ the folder
def test_runs_in_the_same_second_get_their_own_folders(tmp_path):
    when = calendar.timegm((2026, 12, 2, 10, 15, 0))
    folders = [new_run_folder(tmp_path / "runs", when) for _ in range(3)]
    assert [folder.name for folder in folders] == [
        "20261202-101500", "20261202-101500-2", "20261202-101500-3"
    ]
    assert all(folder.is_dir() for folder in folders)


def test_a_name_taken_by_a_file_is_skipped_too(tmp_path):
    when = calendar.timegm((2026, 12, 2, 10, 15, 0))
    (tmp_path / "20261202-101500").write_text("not a run")
    assert new_run_folder(tmp_path, when).name == "20261202-101500-2"
    assert (tmp_path / "20261202-101500").read_text() == "not a run"


def test_two_default_runs_started_together_write_two_complete_folders(tmp_path):
    # Every name of the next ten minutes is taken, so both runs must find
    # another: they race for the same "-2" and only one may get it.
    runs = tmp_path / "runs"
    now = int(time.time())
    taken = {new_run_folder(runs, now + offset).name for offset in range(600)}
    first = start_train("--iters", "40", cwd=tmp_path)
    second = start_train("--iters", "40", cwd=tmp_path)
    results = [finish(first), finish(second)]
    for status, _, err in results:
        assert status == 0, err
        assert "Traceback" not in err
    written = sorted(path for path in runs.iterdir() if path.name not in taken)
    assert len(written) == 2
    for folder in written:
        assert folder.name.rsplit("-", 1)[0] in taken  # <timestamp>-N
        assert_complete_run(folder, 40)
    # Each run says where it wrote, and they differ.
    said = {line for _, out, _ in results for line in out.splitlines() if line.startswith("wrote")}
    assert len(said) == 2
    assert all(not any(path.iterdir()) for path in runs.iterdir() if path.name in taken)


@posix_only
def test_a_folder_held_by_a_live_run_is_refused_and_a_killed_runs_lock_taken_over(tmp_path):
    out = tmp_path / "shared-out"
    holder = start_train("--iters", "100000000", "--out", str(out), cwd=tmp_path)
    try:
        wait_for(out / LOCK_NAME, holder)
        status, stdout, err = finish(start_train("--iters", "5", "--out", str(out), cwd=tmp_path))
        assert holder.poll() is None  # the first run was live all along
        assert status == 1 and stdout == "" and "Traceback" not in err
        assert err.splitlines() == [
            f"fastgrad: error: --out {out} is being written by another fastgrad run (pid "
            f"{holder.pid}); give another --out, or wait for that run to end"
        ]
        assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    # Killed: its lock file stays, naming a dead pid, but the kernel let go of it.
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    status, _, err = finish(start_train("--iters", "5", "--out", str(out), cwd=tmp_path))
    assert status == 0, err
    assert_complete_run(out, 5)


@posix_only
def test_an_interrupted_run_lets_go_of_its_folder(tmp_path):
    out = tmp_path / "run"
    holder = start_train("--iters", "100000000", "--out", str(out), cwd=tmp_path)
    wait_for(out / LOCK_NAME, holder)
    holder.send_signal(signal.SIGINT)
    status, _, err = finish(holder)
    assert status == 130 and err.strip().splitlines()[-1] == "fastgrad: error: interrupted"
    # It created the folder and wrote nothing, so nothing is left.
    assert not out.exists()


def test_a_second_lock_in_one_process_is_refused(tmp_path):
    with locked_run_folder(tmp_path) as folder:
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderBusyError, match=rf"^--out {tmp_path} is being written by "
                           rf"another fastgrad run \(pid {os.getpid()}\)"):
            with locked_run_folder(tmp_path):
                pass
        assert (folder / LOCK_NAME).exists()  # the refusal left the holder's lock alone
    assert list(tmp_path.iterdir()) == []


@posix_only
def test_a_stale_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("999999999\n")  # no process holds it
    with locked_run_folder(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_new_folder_left_empty_is_removed_and_a_given_one_kept(tmp_path):
    with locked_run_folder(None, parent=tmp_path / "runs") as folder:
        assert folder.parent == tmp_path / "runs"
    assert not folder.exists()
    with locked_run_folder(tmp_path / "kept") as folder:
        (folder / "history.json").write_text("{}")
    assert sorted(path.name for path in folder.iterdir()) == ["history.json"]


def test_without_fcntl_the_lock_file_itself_is_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(_runs, "fcntl", None)
    with locked_run_folder(tmp_path):
        with pytest.raises(RunFolderBusyError, match=rf"delete {tmp_path / LOCK_NAME}$"):
            with locked_run_folder(tmp_path):
                pass
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    status = cli.main(["train", "--dataset", "mini", "--iters", "2", "--out", str(target)])
    assert status == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"fastgrad: error: File exists: {target}"]
    assert target.read_text() == "keep me"


# ------------------------------------------------------------ atomic outputs
def test_a_write_that_fails_midway_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_fsync = os.fsync
    calls = []

    def full_disk(handle):
        calls.append(handle)
        if len(calls) == 2:  # history.json went through; params.npz hits a full disk
            raise OSError(28, "No space left on device")
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", full_disk)
    status = cli.main(
        ["train", "--dataset", "mini", "--iters", "2", "--backend", "numpy", "--out", str(out)]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"fastgrad: error: No space left on device: {out / 'params.npz'}"
    assert sorted(path.name for path in out.iterdir()) == ["history.json"]
    TrainingHistory.load(out / "history.json")  # whole


def test_a_figure_that_fails_midway_leaves_the_earlier_outputs_and_no_partial_file(
    tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def broken_savefig(self, target, **options):
        target.write(b"\x89PNG half of a figure")
        raise RuntimeError("the renderer broke")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the renderer broke"):  # a bug: keeps its traceback
        cli.main(["train", "--dataset", "mini", "--iters", "2", "--backend", "numpy",
                  "--out", str(out)])
    assert sorted(path.name for path in out.iterdir()) == ["history.json", "params.npz"]
    assert np.isfinite(load_params(out / "params.npz").params["W1"]).all()
