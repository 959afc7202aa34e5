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
from fastgrad._bench_workloads import (
    CHAPTER_NET,
    DEEP_GRADIENT_NET,
    DEEP_TRAIN_NET,
    Case,
    HostParams,
    NetSpec,
    WorkloadFactory,
    scaling_net,
    synthetic_mnist,
)
from fastgrad._book_reference import BookMultiLayerNet, BookTwoLayerNet, book_train

# The deep gradient's 784-100-100-10 takes seconds per fast gradient; the
# tiny run leaves it out and test_deep_gradient_workload runs it on a small net.
TINY = [
    "--backends", "numpy", "--iterations", "4", "--rounds", "1", "--hidden-sizes", "5",
    "--scaling-depths", "1,2", "--dtype", "float64", "--quick", "--naive-samples", "20",
    "--train-samples", "500", "--workloads", "train,gradient,train-deep,scaling",
]
SMALL_RELU = NetSpec((6, 5), "relu", "relu")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmarks.add_bench_arguments(parser)
    return parser.parse_args(argv)


def row(
    implementation: str, method: str, median: float, net: NetSpec = CHAPTER_NET, **extra: Any
) -> dict[str, Any]:
    base = {
        "workload": "gradient", "implementation": implementation, "method": method,
        "dtype": "float64", "hidden_size": net.hidden[0], "layer_sizes": list(net.layer_sizes),
        "activation": net.activation, "hidden_layers": net.hidden_layers, "batch_size": 100,
        "num_params": net.num_params,
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

    case = Case(
        "gradient", "numpy", "naive", "float64", NetSpec.chapter(5), 100, setup, run, check,
        scale=scale,
    )
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

    return Case("train", name, "backprop", "float64", CHAPTER_NET, 100, lambda: None, run,
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
        row("numpy", "backprop", 1.0, NetSpec.chapter(5)),  # another size: not a baseline here
        row("cupy", "fast", math.nan, times_s=[], error="check failed: x"),
        # the same widths, deeper or with another activation: other nets again
        row("numba", "backprop", 0.5, NetSpec((50, 50), "sigmoid")),
        row("numba", "backprop", 0.5, NetSpec((50,), "relu", "relu")),
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
    assert rows[9]["relative_to_numpy_backprop"] is None
    assert rows[10]["relative_to_numpy_backprop"] is None


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


def test_table_names_every_net_but_the_chapters() -> None:
    rows = [
        row("numpy", "backprop", 1.0, workload="scaling"),
        row("numpy", "backprop", 1.0, NetSpec.chapter(5), workload="scaling"),
        row("numpy", "backprop", 1.0, scaling_net(10, 3), workload="scaling"),
        row("numpy", "backprop", 1.0, DEEP_TRAIN_NET, workload="train-deep", iterations=100),
        row("numpy", "backprop", 1.0, workload="train", iterations=100),
    ]
    table = benchmarks.format_table(rows).splitlines()[2:]
    assert [line.split("  ")[0] for line in table] == [
        "scaling h=50", "scaling h=5", "scaling h=10,10,10 relu",
        "train-deep h=100,100,100 relu x100", "train x100",
    ]


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
             ["--backends", "tpu"], ["--backends", "cupy"], ["--scaling-depths", "0"],
             ["--scaling-depths", "two"], ["--hidden-sizes", "5,x"]],
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
    assert "train-deep h=100,100,100 relu x4" in output and "scaling h=5,5 relu" in output
    assert "speed-up over the book's loop" in output
    assert "train-deep float64, numpy: speed-up over the plain NumPy loop" in output
    assert "scaling: nets of 2-3 hidden layers up to width 50" in output
    assert "load average:" in output or not hasattr(os, "getloadavg")
    assert "skipped cupy" in output or "cupy" not in output


def test_bench_json_schema(tiny_run: tuple[int, str, Path]) -> None:
    data = json.loads((tiny_run[2] / "bench.json").read_text())
    assert data["schema"] == "fastgrad-bench/2"
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
            ("train-deep", "book", "backprop"), ("train-deep", "numpy", "backprop"),
            ("gradient", "numpy", "fast"), ("gradient", "book", "naive"),
            ("scaling", "numpy", "forward")} <= seen
    deep = [r for r in data["results"] if r["workload"] == "train-deep"]
    assert {(tuple(r["layer_sizes"]), r["activation"], r["hidden_layers"]) for r in deep} == {
        ((784, 100, 100, 100, 10), "relu", 3)
    }
    assert all(r["speedup_vs_book"] for r in deep)  # the ratio to the plain NumPy loop
    depths = {r["hidden_layers"] for r in data["results"] if r["workload"] == "scaling"}
    assert depths == {1, 2}
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


def test_scaling_plot_has_a_depth_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: list[Any] = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig",
        lambda self, *args, **kwargs: (figures.append(self), real_savefig(self, *args, **kwargs)),
    )
    rows = [
        row(implementation, method, seconds * depth, scaling_net(width, depth),
            workload="scaling")
        for implementation, seconds in (("numpy", 1e-2), ("numba", 1e-3))
        for method in ("backprop", "fast", "naive", "forward")
        for depth in (1, 2, 3)
        for width in (5, 10, 50 if depth == 1 else 10)
    ]
    assert benchmarks.write_scaling_plot(rows, tmp_path / "depth.png")
    width_axes, depth_axes = figures[-1].axes
    assert width_axes.get_xscale() == "log" and len(width_axes.lines) == 7  # 6 series + model
    assert "width 10" in depth_axes.get_title()
    assert sorted(depth_axes.get_xticks()) == [1, 2, 3] and len(depth_axes.lines) == 7
    only_depth_one = [r for r in rows if r["hidden_layers"] == 1]
    assert benchmarks.write_scaling_plot(only_depth_one, tmp_path / "width.png")
    assert len(figures[-1].axes) == 1


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
    net = NetSpec.chapter(5)
    case = factory.gradient_case("numpy", "naive", net, naive_samples=100)
    assert net.num_params == 784 * 5 + 5 + 5 * 10 + 10
    stride = net.num_params // 100
    expected = sum(len(range(0, size, stride)) for size in (784 * 5, 5, 50, 10))
    assert case.sampled_params == expected
    assert case.scale == pytest.approx(net.num_params / expected)
    case.check(case.run(case.setup()))


# ------------------------------------------------------------- the deep workloads
def test_the_workloads_nets() -> None:
    assert CHAPTER_NET.num_params == 39_760 and CHAPTER_NET.two_layer
    assert DEEP_TRAIN_NET.layer_sizes == (784, 100, 100, 100, 10)
    assert DEEP_TRAIN_NET.num_params == 99_710 and not DEEP_TRAIN_NET.smooth
    assert DEEP_GRADIENT_NET.layer_sizes == (784, 100, 100, 10)
    model = DEEP_TRAIN_NET.build("numpy", "float32", seed=0)
    assert type(model) is fastgrad.MultiLayerNet and model.num_params == 99_710
    assert model.activation == "relu" and model.dtype == np.float32
    # He init: std sqrt(2 / fan_in) per layer
    assert float(np.std(model.params["W1"])) == pytest.approx(np.sqrt(2 / 784), rel=0.02)
    assert type(CHAPTER_NET.build("numpy", "float64", seed=0)) is fastgrad.TwoLayerNet
    assert scaling_net(50, 1) == CHAPTER_NET and scaling_net(5, 3).hidden == (5, 5, 5)


def test_host_params_follow_the_models_names_and_order() -> None:
    model = fastgrad.MultiLayerNet(4, [3, 2], 2, seed=0)
    host = HostParams.of(model)
    assert host.names == tuple(model.params)
    for name, array in host.items():
        np.testing.assert_array_equal(array, model.params[name])
        assert array is not model.params[name]  # a copy, safe from training
    assert list(host.named(range(6)).values()) == list(range(6))


@pytest.mark.parametrize("net", [CHAPTER_NET, SMALL_RELU], ids=["chapter", "relu"])
def test_the_book_networks_compute_what_fastgrad_computes(net: NetSpec) -> None:
    factory = WorkloadFactory(synthetic_mnist(200), seed=0)
    init = factory.initial_params(net)
    book = net.book_net(init)
    assert isinstance(book, BookTwoLayerNet if net.two_layer else BookMultiLayerNet)
    X, labels = factory.gradient_batch()
    reference = factory.reference_gradient(net)
    grads = book.gradient(X, np.eye(10)[labels])
    for name, value in reference.items():
        np.testing.assert_allclose(grads[name], value, atol=1e-12)
    # the book's nets train in its own loop from the shared start
    losses = book_train(
        book, factory.inputs("float64"), np.eye(10)[factory.dataset.labels], 150, 50, 0.1,
        rng=np.random.default_rng(0),
    ).train_loss_list
    assert np.mean(losses[-30:]) < np.mean(losses[:30])


@pytest.mark.parametrize("implementation", ["book", "numpy", "numba"])
def test_the_deep_training_run_learns(implementation: str) -> None:
    if implementation == "numba" and "numba" not in fastgrad.available_backends():
        pytest.skip("numba is not installed")
    factory = WorkloadFactory(synthetic_mnist(1000), seed=0)
    for dtype in ("float64", "float32"):
        case = factory.train_case(implementation, dtype, 100, SMALL_RELU)
        assert case.workload == "train-deep" and case.iterations == 100
        case.check(case.run(case.setup()))  # finite, falling losses


@pytest.mark.parametrize("peer", ["jax", "torch-cpu"])
def test_the_peers_train_and_differentiate_deep_nets(peer: str) -> None:
    if workloads.peer_unavailable_reason(peer):
        pytest.skip(workloads.peer_unavailable_reason(peer))
    factory = WorkloadFactory(synthetic_mnist(1000), seed=0)
    case = factory.train_case(peer, "float32", 100, SMALL_RELU)
    losses = case.run(case.setup())
    case.check(losses)
    reference = factory.train_case("numpy", "float32", 100, SMALL_RELU)
    np.testing.assert_allclose(
        np.asarray(losses if peer == "jax" else losses.numpy()),
        np.asarray(reference.run(reference.setup())), rtol=1e-3, atol=1e-4,
    )
    gradient = factory.gradient_case(peer, "backprop", SMALL_RELU)
    gradient.check(gradient.run(gradient.setup()))


def test_relu_numerical_gradients_are_checked_against_each_other() -> None:
    factory = WorkloadFactory(synthetic_mnist(200), seed=0)
    fast = factory.gradient_case("numpy", "fast", SMALL_RELU)
    naive = factory.gradient_case("numpy", "naive", SMALL_RELU, naive_samples=60)
    fast_value, naive_value = fast.run(fast.setup()), naive.run(naive.setup())
    fast.check(fast_value)
    naive.check(naive_value)  # within 1e-9 of the fast kernel at every sampled entry
    stride = SMALL_RELU.num_params // 60
    for name, value in naive_value.items():
        assert np.max(np.abs(value - fast_value[name].reshape(-1)[::stride])) <= 1e-9
    off = {name: value + 1e-8 for name, value in naive_value.items()}
    with pytest.raises(AssertionError, match="from the numpy fast numerical gradient > 1e-09"):
        naive.check(off)
    book = factory.gradient_case("book", "naive", SMALL_RELU, naive_samples=60)
    book.check(book.run(book.setup()))  # the +1e-7 guard: within 1e-6


def test_deep_gradient_workload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    # The command's plumbing on a small ReLU net in place of 784-100-100-10.
    monkeypatch.setattr(benchmarks, "DEEP_GRADIENT_NET", SMALL_RELU)
    argv = [*TINY, "--workloads", "gradient-deep", "--no-plot", "--out", str(tmp_path)]
    assert benchmarks.run_bench(parse(argv)) == 0
    output = capsys.readouterr().out
    assert "gradient-deep h=6,5 relu  numpy  naive" in output
    assert "numerical gradient 784-6-5-10 relu, numpy fast: speed-up over the book's naive" in (
        output
    )
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {(r["implementation"], r["method"]) for r in results} == {
        ("book", "backprop"), ("book", "naive"),
        ("numpy", "backprop"), ("numpy", "fast"), ("numpy", "naive"),
    }
    assert all(r["workload"] == "gradient-deep" and not r["error"] for r in results)


def test_plan_keeps_wide_deep_nets_off_the_scaling_curve() -> None:
    config = benchmarks.BenchConfig.preset("default", hidden_sizes=(5, 100, 500))
    groups = benchmarks._plan(config, ["numpy"], [])
    scaling = sorted({item[4].hidden for group in groups for item in group
                      if item[0] == "scaling"})
    assert scaling == [(5,), (5, 5), (5, 5, 5), (100,), (100, 100), (100, 100, 100), (500,)]
    quick = benchmarks.BenchConfig.preset("quick", hidden_sizes=(50, 100))
    deep = {item[4].hidden for group in benchmarks._plan(quick, ["numpy"], [])
            for item in group if item[0] == "scaling" and item[4].hidden_layers > 1}
    assert deep == {(50, 50), (50, 50, 50)}
    workloads_run = [group[0][0] for group in groups]
    assert workloads_run == ["train", "train", "gradient", "train-deep", "train-deep",
                             "gradient-deep"] + ["scaling"] * 7
