"""The ``fastgrad`` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrad import MultiLayerNet, TwoLayerNet, cli, data
from fastgrad.checkpoint import load_params
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
    # The default is the chapter's net, and the header says so.
    assert result.stdout.startswith(
        "training TwoLayerNet 784-50-10 (sigmoid hidden layers, weight init std 0.01, "
        "weight decay 0; 39,760 float64 parameters on numpy) on mnist-mini"
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
        "--iters", "300", "--seed", "0", "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "training MultiLayerNet 784-100-100-100-10 (relu hidden layers, weight init He "
        "(sqrt(2/fan_in)), weight decay 0; 99,710 float64 parameters on numpy)"
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
         *flags]
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

    def offline(url, out, label):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", offline)
    status = cli.main(["train", "--iters", "3", "--hidden", "4", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0
    notes = [line for line in captured.err.splitlines() if "full MNIST is unavailable" in line]
    assert len(notes) == 1 and "embedded subset" in notes[0]
    assert TrainingHistory.load(tmp_path / "run" / "history.json").config["dataset"] == "mnist-mini"
