"""Fast tests of the benchmark machinery: timing, ratios, report, JSON, plot, peers, data.

Nothing here measures speed; the workloads are shrunk until ``run_bench``
finishes in a few seconds.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad import _bench_workloads as workloads
from fastgrad import benchmarks
from fastgrad._bench_workloads import Case, WorkloadFactory, synthetic_mnist
from fastgrad._book_reference import BookTwoLayerNet, book_train

TINY = [
    "--backends", "numpy", "--iterations", "4", "--rounds", "1", "--hidden-sizes", "5",
    "--dtype", "float64", "--quick", "--naive-samples", "20", "--train-samples", "500",
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmarks.add_bench_arguments(parser)
    return parser.parse_args(argv)


def row(implementation: str, method: str, median: float, **extra: Any) -> dict[str, Any]:
    base = {
        "workload": "gradient", "implementation": implementation, "method": method,
        "dtype": "float64", "hidden_size": 50, "batch_size": 100, "num_params": 39760,
        "iterations": 1, "rounds": 1, "times_s": [median], "median_s": median, "min_s": median,
        "max_s": median, "first_call_s": median, "sampled_params": None, "extrapolated": False,
        "error": None, "notes": {}, "relative_to_numpy_backprop": None,
        "numerical_over_backprop": None, "speedup_vs_book": None,
    }
    base.update(extra)
    return base


def counting_case(scale: float = 1.0, wrong_after: int | None = None) -> Case:
    """A case that counts its calls; its k-th value is k (times come from ``fake_clock``)."""
    calls = {"run": 0, "setup": 0}

    def setup() -> int:
        calls["setup"] += 1
        return calls["setup"]

    def run(state: int) -> int:
        calls["run"] += 1
        return calls["run"]

    def check(value: int) -> None:
        if wrong_after is not None and value > wrong_after:
            raise AssertionError(f"value {value} is wrong")

    case = Case("gradient", "numpy", "naive", "float64", 5, 100, setup, run, check, scale=scale)
    case.notes["calls"] = calls
    return case


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.perf_counter`` in benchmarks advances by the next queued duration per call pair."""
    durations: list[float] = []
    state = {"now": 0.0, "started": False}

    def perf_counter() -> float:
        if state["started"]:
            state["now"] += durations.pop(0)
        state["started"] = not state["started"]
        return state["now"]

    monkeypatch.setattr(benchmarks.time, "perf_counter", perf_counter)
    return durations


# ------------------------------------------------------------------------ measure
def test_measure_excludes_the_warmup_call_and_scales(fake_clock: list[float]) -> None:
    fake_clock.extend([5.0, 1.0, 3.0, 2.0])
    case = counting_case(scale=10.0)
    measured = benchmarks.measure(case, rounds=3)
    assert measured.first_call == 50.0
    assert measured.times == [10.0, 30.0, 20.0]
    assert (measured.median, measured.minimum, measured.maximum) == (20.0, 10.0, 30.0)
    assert measured.error is None
    assert case.notes["calls"] == {"run": 4, "setup": 4}


def test_measure_stops_at_the_budget_but_times_at_least_once(fake_clock: list[float]) -> None:
    fake_clock.extend([9.0, 4.0, 4.0, 4.0])
    measured = benchmarks.measure(counting_case(), rounds=10, budget_s=1.0)
    assert measured.times == [4.0]


def test_measure_without_warmup_counts_the_first_call(fake_clock: list[float]) -> None:
    fake_clock.extend([2.0, 1.0])
    measured = benchmarks.measure(counting_case(), rounds=2, warmup=False)
    assert measured.times == [2.0, 1.0]


def test_measure_reports_a_failed_check_on_the_timed_value(fake_clock: list[float]) -> None:
    fake_clock.extend([1.0, 1.0, 1.0])
    measured = benchmarks.measure(counting_case(wrong_after=2), rounds=2)
    assert measured.error is not None and "value 3 is wrong" in measured.error


def logging_case(name: str, log: list[str]) -> Case:
    """A case whose every run appends its ``name`` to ``log``."""

    def run(_: None) -> str:
        log.append(name)
        return name

    return Case("train", name, "backprop", "float64", 50, 100, lambda: None, run,
                lambda value: None)


def test_measure_group_interleaves_rounds() -> None:
    order: list[str] = []
    make = functools.partial(logging_case, log=order)
    measured = benchmarks.measure_group([make("a"), make("b")], rounds=2)
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then round 1, then round 2
    assert [len(m.times) for m in measured] == [2, 2]


def test_measure_group_pauses_before_each_call_of_a_group_only(monkeypatch) -> None:
    # the pause lets the previous case's idle BLAS threads stop spinning;
    # a lone case has no previous case, so it runs without one
    events: list[str] = []
    monkeypatch.setattr(benchmarks.time, "sleep", lambda seconds: events.append(f"sleep {seconds}"))
    make = functools.partial(logging_case, log=events)
    benchmarks.measure_group([make("a"), make("b")], rounds=1, settle_s=0.2)
    assert events == ["sleep 0.2", "a", "sleep 0.2", "b"] * 2
    events.clear()
    benchmarks.measure_group([make("c")], rounds=1, settle_s=0.2)
    assert events == ["c", "c"]


# --------------------------------------------------------------------- ratio math
def test_ratios_are_taken_within_one_workload_size_and_dtype() -> None:
    rows = [
        row("numpy", "backprop", 0.002),
        row("numpy", "fast", 0.5),
        row("numba", "backprop", 0.001),
        row("numba", "fast", 0.01),
        row("book", "backprop", 0.004),
        row("book", "naive", 15.0, extrapolated=True, sampled_params=404),
        row("numpy", "naive", 12.0, extrapolated=True, sampled_params=404),
        row("numpy", "backprop", 1.0, hidden_size=5),  # another size: not a baseline here
        row("cupy", "fast", math.nan, times_s=[], error="check failed: x"),
    ]
    benchmarks._add_ratios(rows)
    assert rows[0]["relative_to_numpy_backprop"] == pytest.approx(1.0)
    assert rows[1]["relative_to_numpy_backprop"] == pytest.approx(250.0)
    assert rows[1]["numerical_over_backprop"] == pytest.approx(250.0)
    assert rows[3]["numerical_over_backprop"] == pytest.approx(10.0)
    assert rows[3]["relative_to_numpy_backprop"] == pytest.approx(5.0)
    assert rows[2]["speedup_vs_book"] == pytest.approx(4.0)
    assert rows[6]["speedup_vs_book"] == pytest.approx(1.25)
    assert rows[1]["speedup_vs_book"] is None  # the book has no "fast" method
    assert rows[7]["relative_to_numpy_backprop"] == pytest.approx(1.0)
    assert rows[8]["relative_to_numpy_backprop"] is None


def test_table_marks_extrapolated_and_failed_rows() -> None:
    rows = [
        row("numpy", "backprop", 0.002),
        row("numpy", "naive", 12.0, extrapolated=True, sampled_params=404),
        row("numba", "fast", math.nan, times_s=[], error="check failed: W1 off"),
    ]
    benchmarks._add_ratios(rows)
    table = benchmarks.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["workload", "impl", "method", "dtype"]
    assert set(table[1]) <= {"-", " "}
    assert "2.00 ms" in table[2] and "1.00x" in table[2]
    assert "12.00 s*" in table[3] and "6,000x" in table[3]
    assert "FAILED" in table[4] and "W1 off" in table[4]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.50 s"), (0.0125, "12.50 ms"), (3.2e-5, "32.0 us"), (math.nan, "-"), (None, "-")],
)
def test_seconds_format(seconds: float | None, text: str) -> None:
    assert benchmarks._seconds(seconds) == text


# ---------------------------------------------------------------------- arguments
def test_presets_and_overrides() -> None:
    quick = benchmarks.config_from_args(parse(["--quick", "--iterations", "7"]))
    assert (quick.mode, quick.iterations, quick.rounds) == ("quick", 7, 3)
    full = benchmarks.config_from_args(parse(["--full"]))
    assert full.iterations == 10_000
    assert benchmarks.config_from_args(parse([])).mode == "default"
    with pytest.raises(SystemExit):
        parse(["--quick", "--full"])


@pytest.mark.parametrize(
    "argv", [["--dtype", "float16"], ["--workloads", "bogus"], ["--rounds", "0"],
             ["--backends", "tpu"], ["--backends", "cupy"]],
)
def test_bad_arguments_exit_2(argv: list[str], tmp_path: Path, capsys: Any) -> None:
    if argv == ["--backends", "cupy"] and "cupy" in fastgrad.available_backends():
        pytest.skip("cupy can run here")
    assert benchmarks.run_bench(parse([*argv, "--out", str(tmp_path)])) == 2
    assert "fastgrad bench:" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


# ------------------------------------------------------------- the whole command
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    stdout, stderr = io.StringIO(), io.StringIO()
    real_stdout, real_stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        status = benchmarks.run_bench(parse([*TINY, "--out", str(out)]))
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr
    return status, stdout.getvalue() + stderr.getvalue(), out


def test_run_bench_tiny_config(tiny_run: tuple[int, str, Path]) -> None:
    status, output, _ = tiny_run
    assert status == 0, output
    assert "machine:" in output and "versions:" in output
    assert "warm-up / JIT compile" in output
    assert "train x4" in output and "gradient" in output and "scaling h=5" in output
    assert "speed-up over the book's loop" in output
    assert "load average:" in output or not hasattr(os, "getloadavg")
    assert "skipped cupy" in output or "cupy" not in output


def test_bench_json_schema(tiny_run: tuple[int, str, Path]) -> None:
    data = json.loads((tiny_run[2] / "bench.json").read_text())
    assert data["schema"] == "fastgrad-bench/1"
    assert {"created", "config", "machine", "dataset", "compile_seconds", "skipped",
            "results", "wall_seconds"} <= set(data)
    assert data["config"]["iterations"] == 4
    assert {"cpu", "logical_cpus", "usable_cpus", "gpus", "versions", "backends"} <= set(
        data["machine"]
    )
    assert "numpy" in data["compile_seconds"]
    keys = set(row("numpy", "backprop", 1.0))
    seen = set()
    for result in data["results"]:
        assert set(result) == keys
        assert result["error"] is None
        assert result["rounds"] == len(result["times_s"]) >= 1
        assert result["min_s"] <= result["median_s"] <= result["max_s"]
        seen.add((result["workload"], result["implementation"], result["method"]))
    assert {("train", "book", "backprop"), ("train", "numpy", "backprop"),
            ("gradient", "numpy", "fast"), ("gradient", "book", "naive"),
            ("scaling", "numpy", "forward")} <= seen
    naive = [r for r in data["results"] if r["method"] == "naive"]
    assert naive and all(r["extrapolated"] and r["sampled_params"] for r in naive)


def test_threads_cap_is_applied_and_reported(tmp_path: Path, capsys: Any) -> None:
    from threadpoolctl import threadpool_info

    before = [pool["num_threads"] for pool in threadpool_info()]
    argv = [*TINY, "--threads", "1", "--workloads", "train", "--out", str(tmp_path)]
    assert benchmarks.run_bench(parse(argv)) == 0
    assert "threads capped at 1 (--threads)" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["machine"]["threads_limit"] == 1
    assert [pool["num_threads"] for pool in threadpool_info()] == before  # restored


def test_scaling_plot_written(tiny_run: tuple[int, str, Path]) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in tiny_run[1]
    else:
        assert (tiny_run[2] / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_says_when_matplotlib_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert benchmarks.write_scaling_plot([], tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_missing_peers_are_skipped_with_a_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("torch", "jax") else real_find_spec(name, *args)

    monkeypatch.setattr(workloads.importlib.util, "find_spec", find_spec)
    runnable, skipped = workloads.available_peers()
    assert runnable == []
    assert set(skipped) == {"torch-cpu", "torch-cuda", "jax"}
    assert "pip install torch" in skipped["torch-cpu"]
    argv = [*TINY, "--peers", "--workloads", "gradient", "--no-plot", "--out", str(tmp_path)]
    assert benchmarks.run_bench(parse(argv)) == 0
    output = capsys.readouterr().out
    assert "skipped torch-cpu: torch is not installed" in output
    assert "skipped jax: jax is not installed" in output


def test_a_failed_check_makes_the_command_fail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    real = WorkloadFactory.gradient_case

    def broken(self: WorkloadFactory, *args: Any, **kwargs: Any) -> Case:
        case = real(self, *args, **kwargs)
        if case.method == "fast":
            run = case.run
            case.run = lambda params: {k: v + 1e-3 for k, v in run(params).items()}
        return case

    monkeypatch.setattr(WorkloadFactory, "gradient_case", broken)
    argv = [*TINY, "--workloads", "gradient", "--no-plot", "--out", str(tmp_path)]
    assert benchmarks.run_bench(parse(argv)) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "check(s) FAILED" in captured.err
    data = json.loads((tmp_path / "bench.json").read_text())
    failed = [r for r in data["results"] if r["error"]]
    assert [r["method"] for r in failed] == ["fast"]
    assert failed[0]["median_s"] is None  # NaN is not JSON


def test_importing_fastgrad_and_the_benchmarks_stays_light() -> None:
    code = (
        "import sys, fastgrad, fastgrad.benchmarks, fastgrad._bench_workloads;"
        "heavy = [m for m in ('numba', 'cupy', 'torch', 'jax', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# ------------------------------------------------------------------ data and book
def test_synthetic_mnist_looks_like_mnist() -> None:
    data = synthetic_mnist(2000, seed=3)
    assert data.images.dtype == np.uint8 and data.images.shape == (2000, 784)
    assert 0.79 < float((data.images == 0).mean()) < 0.83
    assert set(np.unique(data.labels)) == set(range(10))
    again = synthetic_mnist(2000, seed=3)
    assert np.array_equal(data.images, again.images)
    assert data.inputs(np.float32).dtype == np.float32 and data.inputs("float64").max() <= 1.0


def test_read_mnist_parses_gzipped_idx(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([7, 2, 1], dtype=np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as stream:
        stream.write(struct.pack(">HBB3I", 0, 8, 3, 3, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as stream:
        stream.write(struct.pack(">HBBI", 0, 8, 1, 3) + labels.tobytes())
    data = workloads.read_mnist(tmp_path)
    assert np.array_equal(data.images, images.reshape(3, 784))
    assert data.labels.tolist() == [7, 2, 1]


def test_book_network_gradients_agree_and_its_loop_learns() -> None:
    rng = np.random.default_rng(0)
    net = BookTwoLayerNet(6, 4, 3, rng=rng)
    x, t = rng.random((8, 6)), np.eye(3)[rng.integers(0, 3, 8)]
    analytic, numerical = net.gradient(x, t), net.numerical_gradient(x, t)
    for name in analytic:
        np.testing.assert_allclose(numerical[name], analytic[name], atol=1e-6)
    data = synthetic_mnist(500, seed=1)
    net = BookTwoLayerNet(784, 10, 10, rng=np.random.default_rng(1))
    losses = book_train(
        net, data.inputs(np.float64), np.eye(10)[data.labels], 300, 50, 0.5,
        rng=np.random.default_rng(2),
    ).train_loss_list
    assert len(losses) == 300 and np.mean(losses[-50:]) < np.mean(losses[:50])


def test_naive_sample_is_documented_fraction() -> None:
    factory = WorkloadFactory(synthetic_mnist(200), seed=0)
    case = factory.gradient_case("numpy", "naive", 5, naive_samples=100)
    stride = workloads.num_params(5) // 100
    expected = sum(len(range(0, size, stride)) for size in (784 * 5, 5, 50, 10))
    assert case.sampled_params == expected
    assert case.scale == pytest.approx(workloads.num_params(5) / expected)
    case.check(case.run(case.setup()))
