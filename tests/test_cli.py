"""The ``fastgrad`` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrad import MultiLayerNet, TwoLayerNet, cli, data
from fastgrad.backends import available_backends, unavailable_reason
from fastgrad.checkpoint import load_params
from fastgrad.train import EpochRecord, TrainingHistory

ROOT = Path(__file__).resolve().parents[1]


def fastgrad_command(*arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    environment = {name: value for name, value in os.environ.items() if name != "FASTGRAD_BACKEND"}
    environment.update(env or {})
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
    # The default is the chapter's net on the fastest backend here, and the header says so.
    here = available_backends()
    fastest = next(name for name in ("cupy", "numba", "numpy") if name in here)
    assert result.stdout.startswith(
        "training TwoLayerNet 784-50-10 (sigmoid hidden layers, weight init std 0.01, "
        f"weight decay 0; 39,760 float64 parameters) on {fastest} (auto: fastest available "
        "here) with mnist-mini"
    )
    assert "epoch  iteration  train acc  test acc" in result.stdout
    assert "final: train acc" in result.stdout
    (out,) = (tmp_path / "runs").iterdir()
    history = TrainingHistory.load(out / "history.json")
    assert len(history.losses) == 200 and history.config["dataset"] == "mnist-mini"
    assert [record.iteration for record in history.epochs] == [0, 100, 200]
    assert history.final.test_acc > 0.2  # chance is 0.1; it has only begun to learn
    assert history.config["model"] == "TwoLayerNet" and history.config["weight_init"] == 0.01
    assert type(load_params(out / "params.npz")) is TwoLayerNet
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
        (["train", "--hidden", "abc"], "--hidden: expected comma-separated positive widths"),
        (["train", "--hidden", "100,,50"], "--hidden: expected comma-separated positive widths"),
        (["train", "--hidden", "100,0"], "got '100,0'"),
        (["train", "--hidden", ""], "--hidden: expected comma-separated positive widths"),
        (["train", "--activation", "softplus"], "--activation: invalid choice: 'softplus'"),
        (["train", "--weight-decay", "-0.1"], "--weight-decay: expected a finite number >= 0"),
        (["train", "--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0"),
        (["train", "--weight-init", "0"], "--weight-init: expected a positive standard deviation"),
        (["train", "--weight-init", "gaussian"], "or one of relu, he, sigmoid, xavier"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_are_one_line(arguments, fragment):
    result = fastgrad_command(*arguments)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_a_deep_relu_net_learns(tmp_path):
    result = fastgrad_command(
        "train", "--dataset", "mini", "--hidden", "100,100,100", "--activation", "relu",
        "--iters", "300", "--seed", "0", "--out", str(tmp_path), "--backend", "numpy",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "training MultiLayerNet 784-100-100-100-10 (relu hidden layers, weight init He "
        "(sqrt(2/fan_in)), weight decay 0; 99,710 float64 parameters) on numpy with"
    )
    history = TrainingHistory.load(tmp_path / "history.json")
    assert history.config["layer_sizes"] == [784, 100, 100, 100, 10]
    assert (history.config["model"], history.config["weight_init"]) == ("MultiLayerNet", "relu")
    # 0.94 after the default 10,000 iterations; three epochs of the subset reach ~0.9.
    assert history.final.test_acc > 0.85
    net = load_params(tmp_path / "params.npz")
    assert type(net) is MultiLayerNet and net.architecture == {
        "layer_sizes": [784, 100, 100, 100, 10], "activation": "relu", "weight_decay_lambda": 0.0,
    }


@pytest.mark.parametrize(
    ("flags", "model", "activation", "weight_init", "decay"),
    [
        ([], "TwoLayerNet", "sigmoid", 0.01, 0.0),
        (["--hidden", "20"], "TwoLayerNet", "sigmoid", 0.01, 0.0),
        (["--hidden", "20", "--activation", "relu"], "MultiLayerNet", "relu", "relu", 0.0),
        (["--hidden", "20", "--activation", "sigmoid"], "TwoLayerNet", "sigmoid", 0.01, 0.0),
        (["--activation", "tanh"], "MultiLayerNet", "tanh", "xavier", 0.0),
        (["--weight-decay", "0.01"], "MultiLayerNet", "sigmoid", 0.01, 0.01),
        (["--hidden", "8,6", "--activation", "sigmoid"], "MultiLayerNet", "sigmoid", "xavier", 0.0),
        (["--hidden", "8,6", "--weight-init", "He"], "MultiLayerNet", "sigmoid", "he", 0.0),
        (["--weight-init", "0.05"], "TwoLayerNet", "sigmoid", 0.05, 0.0),
        (["--weight-init", "xavier"], "MultiLayerNet", "sigmoid", "xavier", 0.0),
    ],
)
def test_flags_choose_the_net(tmp_path, capsys, flags, model, activation, weight_init, decay):
    status = cli.main(
        ["train", "--dataset", "mini", "--iters", "2", "--seed", "0", "--out", str(tmp_path),
         "--backend", "numpy", *flags]
    )
    assert status == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"training {model} 784-")
    config = TrainingHistory.load(tmp_path / "history.json").config
    assert (config["model"], config["activation"]) == (model, activation)
    assert (config["weight_init"], config["weight_decay_lambda"]) == (weight_init, decay)
    net = load_params(tmp_path / "params.npz")
    assert type(net).__name__ == model and net.activation == activation


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

    def offline(url, out, label, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", offline)
    status = cli.main(["train", "--iters", "3", "--hidden", "4", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0
    notes = [line for line in captured.err.splitlines() if "full MNIST is unavailable" in line]
    assert len(notes) == 1 and "embedded subset" in notes[0]
    assert TrainingHistory.load(tmp_path / "run" / "history.json").config["dataset"] == "mnist-mini"


# ------------------------------------------------------------ --backend auto
needs_numba = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="needs numba installed"
)


@needs_numba
def test_auto_is_the_default_and_picks_numba_when_it_runs(tmp_path):
    # FASTGRAD_REQUIRE_BACKENDS=numba in CI: numba must be usable there, so auto must take it.
    if "numba" not in available_backends():
        pytest.skip(f"numba cannot run here: {unavailable_reason('numba')}")
    result = fastgrad_command(
        "train", "--dataset", "mini", "--iters", "3", "--seed", "0", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    if "cupy" in available_backends():
        assert " on cupy (auto: fastest available here) with mnist-mini" in header
    else:
        assert " on numba (auto: fastest available here) with mnist-mini" in header
        assert TrainingHistory.load(tmp_path / "history.json").config["backend"] == "numba"
    assert result.stderr == ""


@needs_numba
def test_auto_passes_over_a_numba_that_cannot_start_and_says_why(tmp_path):
    result = fastgrad_command(
        "train", "--dataset", "mini", "--iters", "3", "--seed", "0", "--out", str(tmp_path),
        env={"NUMBA_NUM_THREADS": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert " on numpy (auto: fastest available here) with mnist-mini" in result.stdout
    assert result.stderr.splitlines() == [
        "fastgrad: note: --backend auto passes over numba: backend 'numba' cannot start: "
        f"NUMBA_NUM_THREADS='0' is not a thread count: unset it or set 1..{os.cpu_count()}"
    ]
    assert TrainingHistory.load(tmp_path / "history.json").config["backend"] == "numpy"


def test_auto_takes_the_first_backend_the_registry_says_can_run(monkeypatch):
    import fastgrad.backends as registry

    fake_cupy = object()
    verdicts = {"cupy": None, "numba": "numba is fine but slower", "numpy": None}
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: verdicts[name])
    real_get = registry.get_backend
    monkeypatch.setattr(
        registry, "get_backend", lambda name=None: fake_cupy if name == "cupy" else real_get(name)
    )
    monkeypatch.delenv("FASTGRAD_BACKEND", raising=False)
    assert cli._choose_backend(None) == (fake_cupy, " (auto: fastest available here)")
    verdicts["cupy"] = "no CUDA device"
    verdicts["numba"] = "made unavailable by the test"
    backend, how = cli._choose_backend("auto")
    assert (backend.name, how) == ("numpy", " (auto: fastest available here)")


def test_an_explicit_backend_or_the_variable_beats_auto(tmp_path, monkeypatch, capsys):
    status = cli.main(
        ["train", "--dataset", "mini", "--iters", "2", "--backend", "numpy", "--out",
         str(tmp_path / "flag")]
    )
    assert status == 0
    assert "parameters) on numpy with mnist-mini" in capsys.readouterr().out
    monkeypatch.setenv("FASTGRAD_BACKEND", "numpy")
    status = cli.main(["train", "--dataset", "mini", "--iters", "2", "--out", str(tmp_path / "e")])
    assert status == 0
    assert "parameters) on numpy (from $FASTGRAD_BACKEND) with" in capsys.readouterr().out


def test_a_bad_backend_variable_is_one_line(tmp_path):
    result = fastgrad_command(
        "train", "--dataset", "mini", "--out", str(tmp_path), env={"FASTGRAD_BACKEND": "tpu"}
    )
    assert_one_line_error(result, "FASTGRAD_BACKEND='tpu' names an unknown backend")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ NUMBA_NUM_THREADS
@needs_numba
@pytest.mark.parametrize("value", ["0", "-2", "abc", ""])
def test_a_bad_numba_thread_count_is_reported_by_info(value):
    result = fastgrad_command("info", env={"NUMBA_NUM_THREADS": value})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stderr == ""
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  numba ")]
    assert line == (
        f"  numba  unavailable: backend 'numba' cannot start: NUMBA_NUM_THREADS={value!r} is "
        f"not a thread count: unset it or set 1..{os.cpu_count()}"
    )
    assert "  numpy  available" in result.stdout


@needs_numba
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_numba_thread_count_stops_a_numba_run_in_one_line(tmp_path, value):
    out = tmp_path / "run"
    result = fastgrad_command(
        "train", "--backend", "numba", "--dataset", "mini", "--iters", "2", "--out", str(out),
        env={"NUMBA_NUM_THREADS": value},
    )
    assert_one_line_error(
        result, f"NUMBA_NUM_THREADS={value!r} is not a thread count: unset it or set 1.."
    )
    assert result.returncode == 1 and not out.exists()


@needs_numba
def test_a_good_numba_thread_count_is_accepted():
    result = fastgrad_command("info", env={"NUMBA_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "  numba  available" in result.stdout


# ------------------------------------------------------------ the epoch table
ROW = re.compile(r"^ *\d+\.\d\d +\d+ +\d\.\d{4} +\d\.\d{4} +\d+\.\ds$")


def synthetic_run(evaluations: int) -> TrainingHistory:
    return TrainingHistory(
        epochs=[EpochRecord(float(e), 10 * e, 0.5, 0.5) for e in range(evaluations)]
    )


def table_rows(evaluations: int, feed_one_by_one: bool = True) -> list[str]:
    lines: list[str] = []
    iters = 10 * (evaluations - 1)
    table = cli._EpochTable(lines.append, evaluations, iters)
    run = synthetic_run(evaluations)
    partial = TrainingHistory()
    for record in run.epochs if feed_one_by_one else []:
        partial.epochs.append(record)
        table.update(partial)
    table.finish(run)
    return [line for line in lines if ROW.match(line)]


def test_the_table_of_101_epochs_has_at_most_25_rows_first_and_last_included():
    rows = table_rows(102)  # the evaluation before training, then one per epoch
    assert len(rows) <= 25
    epochs = [float(row.split()[0]) for row in rows]
    assert epochs[0] == 0.0 and epochs[-1] == 101.0
    assert epochs == sorted(set(epochs))
    # Evenly spaced between the first and the last.
    steps = {b - a for a, b in itertools.pairwise(epochs[:-1])}
    assert len(steps) == 1


@pytest.mark.parametrize("evaluations", [1, 2, 3, 24, 25, 26, 27, 48, 49, 50, 101, 1000, 10001])
def test_the_table_never_passes_25_rows(evaluations):
    rows = table_rows(evaluations)
    assert len(rows) <= 25
    assert float(rows[0].split()[0]) == 0.0
    assert float(rows[-1].split()[0]) == evaluations - 1
    if evaluations <= 25:
        assert len(rows) == evaluations  # a short run shows every evaluation


def test_the_table_shows_the_last_evaluation_before_a_divergence():
    lines: list[str] = []
    table = cli._EpochTable(lines.append, 102, 1010)
    history = synthetic_run(8)  # stopped by a divergence after the 8th evaluation
    table.update(history)
    assert [float(line.split()[0]) for line in lines if ROW.match(line)] == [0.0, 5.0]
    table.finish(history)
    assert [float(line.split()[0]) for line in lines if ROW.match(line)] == [0.0, 5.0, 7.0]
    table.finish(history)  # shown once
    assert len([line for line in lines if ROW.match(line)]) == 3


def test_a_run_of_101_epochs_prints_a_short_table_and_keeps_every_epoch(tmp_path):
    # batch 10,000 of the 10,000 subset images: one iteration per epoch.
    result = fastgrad_command(
        "train", "--dataset", "mini", "--iters", "101", "--batch-size", "10000", "--hidden", "4",
        "--dtype", "float32", "--backend", "numpy", "--seed", "0", "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if ROW.match(line)]
    assert 20 <= len(rows) <= 25
    assert rows[0].split()[:2] == ["0.00", "0"] and rows[-1].split()[:2] == ["101.00", "101"]
    assert "(a row every 5 evaluations, and the last; history.json holds all 102)" in result.stdout
    history = TrainingHistory.load(tmp_path / "history.json")
    assert [record.iteration for record in history.epochs] == list(range(102))
