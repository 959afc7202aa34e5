"""The ``fastgrad`` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrad import cli, data
from fastgrad.train import TrainingHistory

ROOT = Path(__file__).resolve().parents[1]


def fastgrad_command(*arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    environment = {**os.environ, **(env or {})}
    environment.pop("FASTGRAD_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "fastgrad", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or ROOT,
        timeout=300,
    )


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_on_the_embedded_subset(tmp_path):
    # No --out: the run goes to ./runs/<timestamp>, here under tmp_path.
    result = fastgrad_command(
        "train", "--dataset", "mini", "--iters", "200", "--seed", "0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "epoch  iteration  train acc  test acc" in result.stdout
    assert "final: train acc" in result.stdout
    (out,) = (tmp_path / "runs").iterdir()
    history = TrainingHistory.load(out / "history.json")
    assert len(history.losses) == 200 and history.config["dataset"] == "mnist-mini"
    assert [record.iteration for record in history.epochs] == [0, 100, 200]
    assert history.final.test_acc > 0.2  # chance is 0.1; it has only begun to learn
    assert (out / "params.npz").stat().st_size > 0
    if "matplotlib is not installed" not in result.stderr:
        assert (out / "training.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["train", "--iters", "abc"], "--iters: expected a positive integer, got 'abc'"),
        (["train", "--lr", "-1"], "--lr: expected a positive finite number"),
        (["train", "--grad", "guess"], "--grad: invalid choice: 'guess'"),
        (["train", "--dataset", "cifar"], "--dataset: invalid choice"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_are_one_line(arguments, fragment):
    result = fastgrad_command(*arguments)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_unknown_backend(tmp_path):
    result = fastgrad_command(
        "train", "--backend", "tpu", "--dataset", "mini", "--out", str(tmp_path)
    )
    assert_one_line_error(result, "unknown backend 'tpu'")


def test_missing_data_dir(tmp_path):
    result = fastgrad_command(
        "train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")
    )
    assert_one_line_error(result, "nowhere", "not a directory")
    result = fastgrad_command(
        "train", "--out", str(tmp_path / "run"), env={"FASTGRAD_DATA_DIR": str(tmp_path)}
    )
    assert_one_line_error(result, "FASTGRAD_DATA_DIR", "lacks")


def test_info():
    result = fastgrad_command("info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fastgrad ")
    for name in ("numpy", "numba", "cupy"):
        assert f"  {name} " in result.stdout
    assert "MNIST:" in result.stdout


def test_bench_is_delegated():
    result = fastgrad_command("bench", "--help")
    if result.returncode == 2:  # fastgrad.benchmarks not written yet
        assert_one_line_error(result, "bench is not available yet")
    else:
        assert result.returncode == 0 and "usage: fastgrad bench" in result.stdout


def test_no_subcommand_prints_help():
    result = fastgrad_command()
    assert result.returncode == 2 and "train" in result.stderr


# In-process: the download must be patched, which a subprocess cannot see.
def test_offline_mnist_falls_back_to_the_embedded_subset(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv("FASTGRAD_BACKEND", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, out, label):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", offline)
    status = cli.main(["train", "--iters", "3", "--hidden", "4", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0
    notes = [line for line in captured.err.splitlines() if "full MNIST is unavailable" in line]
    assert len(notes) == 1 and "embedded subset" in notes[0]
    assert TrainingHistory.load(tmp_path / "run" / "history.json").config["dataset"] == "mnist-mini"
