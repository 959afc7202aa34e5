"""Fast tests of ``fastgrad bench``: timing, ratios, the JSON pytest-benchmark reads, plot, peers.

Nothing here measures speed; the workloads are shrunk until ``run_bench``
finishes in a few seconds.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad._book_reference import BookMultiLayerNet, BookTwoLayerNet, book_train
from fastgrad.benchmarks import peers, runner, workloads
from fastgrad.benchmarks.workloads import (
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

# The deep gradient's 784-100-100-10 takes seconds per fast gradient; the
# tiny run leaves it out and test_deep_gradient_workload runs it on a small net.
TINY = [
    "--backends",
    "numpy",
    "--iterations",
    "4",
    "--rounds",
    "1",
    "--hidden-sizes",
    "5",
    "--scaling-depths",
    "1,2",
    "--dtype",
    "float64",
    "--quick",
    "--naive-samples",
    "20",
    "--train-samples",
    "500",
    "--workloads",
    "train,gradient,train-deep,scaling",
]
SMALL_RELU = NetSpec((6, 5), "relu", "relu")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgrad bench")
    runner.add_bench_arguments(parser)
    return parser.parse_args(argv)


def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    status = runner.run_bench(parse(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def counting_case(scale: float = 1.0, wrong_after: int | None = None, **fields: Any) -> Case:
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

    spec = {"workload": "gradient", "implementation": "numpy", "method": "naive"}
    spec.update(fields)
    net = spec.pop("net", NetSpec.chapter(5))
    case = Case(
        spec["workload"],
        spec["implementation"],
        spec["method"],
        spec.get("dtype", "float64"),
        net,
        100,
        setup,
        run,
        check,
        iterations=spec.get("iterations", 1),
        scale=scale,
    )
    case.notes["calls"] = calls
    return case


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.perf_counter`` in the runner advances by the next queued duration per call pair."""
    durations: list[float] = []
    state = {"now": 0.0, "started": False}

    def perf_counter() -> float:
        if state["started"]:
            state["now"] += durations.pop(0)
        state["started"] = not state["started"]
        return state["now"]

    monkeypatch.setattr(runner.time, "perf_counter", perf_counter)
    return durations


def measure(case: Case, rounds: int, **options: Any) -> runner.Measurement:
    return runner.measure_group([case], rounds, **options)[0]


# ------------------------------------------------------------------------ measure
def test_measure_excludes_the_warmup_call_and_scales(fake_clock: list[float]) -> None:
    fake_clock.extend([5.0, 1.0, 3.0, 2.0])
    case = counting_case(scale=10.0)
    measured = measure(case, rounds=3)
    assert measured.first_call == 50.0
    assert measured.times == [10.0, 30.0, 20.0]
    assert measured.error is None
    assert case.notes["calls"] == {"run": 4, "setup": 4}


def test_measure_stops_at_the_budget_but_times_at_least_once(fake_clock: list[float]) -> None:
    fake_clock.extend([9.0, 4.0, 4.0, 4.0])
    assert measure(counting_case(), rounds=10, budget_s=1.0).times == [4.0]


def test_measure_without_warmup_counts_the_first_call(fake_clock: list[float]) -> None:
    fake_clock.extend([2.0, 1.0])
    assert measure(counting_case(), rounds=2, warmups=[False]).times == [2.0, 1.0]


def test_measure_reports_a_failed_check_on_the_timed_value(fake_clock: list[float]) -> None:
    fake_clock.extend([1.0, 1.0, 1.0])
    measured = measure(counting_case(wrong_after=2), rounds=2)
    assert measured.error == "check failed: value 3 is wrong"


def test_measure_reports_a_failed_check_on_the_warmup_value(fake_clock: list[float]) -> None:
    fake_clock.extend([1.0])
    measured = measure(counting_case(wrong_after=0), rounds=2, warmups=[False])
    assert measured.error == "check failed: value 1 is wrong" and measured.times == []


def logging_case(name: str, log: list[str]) -> Case:
    """A case whose every run appends its ``name`` to ``log``."""

    def run(_: None) -> str:
        log.append(name)
        return name

    return Case(
        "train", name, "backprop", "float64", CHAPTER_NET, 100, lambda: None, run, lambda _: None
    )


def test_measure_group_interleaves_rounds() -> None:
    order: list[str] = []
    make = functools.partial(logging_case, log=order)
    measured = runner.measure_group([make("a"), make("b")], rounds=2)
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then round 1, then round 2
    assert [len(m.times) for m in measured] == [2, 2]


def test_measure_group_pauses_before_each_call_of_a_group_only(monkeypatch) -> None:
    # the pause lets the previous case's idle BLAS threads stop spinning;
    # a lone case has no previous case, so it runs without one
    events: list[str] = []
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: events.append(f"sleep {seconds}"))
    make = functools.partial(logging_case, log=events)
    runner.measure_group([make("a"), make("b")], rounds=1, settle_s=0.2)
    assert events == ["sleep 0.2", "a", "sleep 0.2", "b"] * 2
    events.clear()
    runner.measure_group([make("c")], rounds=1, settle_s=0.2)
    assert events == ["c", "c"]


# ------------------------------------------------- benchmarks, groups and ratios
def benchmark(
    implementation: str, method: str, median: float, error: str | None = None, **fields: Any
) -> Any:
    """A pytest-benchmark benchmark of one round of ``median`` seconds (none if it failed)."""
    case = counting_case(implementation=implementation, method=method, **fields)
    if method == "naive":
        case.sampled_params, case.scale = 404, 98.4
    measured = runner.Measurement([] if error else [median], median, error)
    return runner.to_benchmark(case, measured, {"rounds": 1})


def test_a_benchmark_holds_pytest_benchmarks_statistics_and_the_cases_facts() -> None:
    case = counting_case(scale=98.4, net=CHAPTER_NET)
    case.sampled_params = 404
    result = runner.to_benchmark(case, runner.Measurement([3.0, 1.0, 2.0], 5.0), {"rounds": 3})
    data = result.as_dict()
    assert data["group"] == "gradient float64" and data["name"] == "numpy naive"
    assert data["fullname"] == "fastgrad bench::gradient float64::numpy naive"
    assert data["param"] == "numpy-naive-float64" and data["options"] == {"rounds": 3}
    assert data["params"] == {"implementation": "numpy", "method": "naive", "dtype": "float64"}
    stats = data["stats"]
    assert (stats["min"], stats["median"], stats["max"], stats["rounds"]) == (1.0, 2.0, 3.0, 3)
    assert stats["data"] == [3.0, 1.0, 2.0] and stats["iterations"] == 1
    info = data["extra_info"]
    assert info["extrapolated"] and (info["sampled_params"], info["scale_to_full"]) == (404, 98.4)
    assert info["layer_sizes"] == [784, 50, 10] and info["first_call_s"] == 5.0
    assert info["error"] is None and not result.has_error


def test_groups_name_the_net_iterations_and_dtype() -> None:
    def group(**fields: Any) -> str:
        return runner.group_of(counting_case(**fields))

    assert group(net=CHAPTER_NET) == "gradient float64"
    assert group(net=CHAPTER_NET, workload="scaling") == "scaling h=50 float64"
    assert group(workload="scaling") == "scaling h=5 float64"
    assert group(workload="scaling", net=scaling_net(10, 3)) == "scaling h=10,10,10 relu float64"
    deep = {"workload": "train-deep", "net": DEEP_TRAIN_NET, "iterations": 100}
    assert group(**deep, dtype="float32") == "train-deep h=100,100,100 relu x100 float32"
    assert group(workload="train", net=CHAPTER_NET, iterations=7) == "train x7 float64"


def test_ratios_are_taken_within_one_group() -> None:
    chapter = {"net": CHAPTER_NET}
    benchmarks = [
        benchmark("numpy", "backprop", 0.002, **chapter),
        benchmark("numpy", "fast", 0.5, **chapter),
        benchmark("numba", "backprop", 0.001, **chapter),
        benchmark("numba", "fast", 0.01, **chapter),
        benchmark("book", "backprop", 0.004, **chapter),
        benchmark("book", "naive", 15.0, **chapter),
        benchmark("numpy", "naive", 12.0, **chapter),
        benchmark("jax", "backprop", 0.003, **chapter),
        benchmark("numpy", "backprop", 1.0),  # another net: not a baseline here
        benchmark("cupy", "fast", 0.001, error="check failed: x", **chapter),
        # the same widths, deeper or with another activation: other groups again
        benchmark("numba", "backprop", 0.5, net=NetSpec((50, 50), "sigmoid")),
        benchmark("numba", "backprop", 0.5, net=NetSpec((50,), "relu", "relu")),
    ]
    runner.add_ratios(benchmarks)
    info = [b.extra_info for b in benchmarks]
    assert info[0]["relative_to_numpy_backprop"] == pytest.approx(1.0)
    assert info[1]["relative_to_numpy_backprop"] == pytest.approx(250.0)
    assert info[1]["numerical_over_backprop"] == pytest.approx(250.0)
    assert info[3]["numerical_over_backprop"] == pytest.approx(10.0)
    assert info[3]["relative_to_numpy_backprop"] == pytest.approx(5.0)
    assert info[2]["speedup_vs_book"] == pytest.approx(4.0)
    assert info[6]["speedup_vs_book"] == pytest.approx(1.25)
    # the book's numerical gradient is its naive loop
    assert info[3]["speedup_vs_book"] == pytest.approx(1500.0)
    assert info[2]["speedup_vs_peers"] == {"jax": pytest.approx(3.0)}
    assert info[7]["speedup_vs_peers"] == {} and info[3]["speedup_vs_peers"] == {}
    assert info[0]["numerical_over_backprop"] is None
    assert info[8]["relative_to_numpy_backprop"] == pytest.approx(1.0)
    assert "relative_to_numpy_backprop" not in info[9]  # failed: no ratios
    assert info[10]["relative_to_numpy_backprop"] is None
    assert info[11]["relative_to_numpy_backprop"] is None


def test_ratio_table_marks_extrapolated_rows_and_names_the_peers() -> None:
    benchmarks = [
        benchmark("numpy", "backprop", 0.002, net=CHAPTER_NET),
        benchmark("numpy", "naive", 12.0, net=CHAPTER_NET),
        benchmark("jax", "backprop", 0.001, net=CHAPTER_NET),
    ]
    runner.add_ratios(benchmarks)
    lines = runner.format_ratios(benchmarks).splitlines()
    assert lines[0].split() == "group benchmark /numpy bp num/bp vs book vs jax".split()
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == "gradient float64 numpy backprop 1.00x - - 0.50x".split()
    assert lines[3].split() == "gradient float64 numpy naive* 6,000x 6,000x - -".split()
    assert lines[4].split() == "gradient float64 jax backprop 0.50x - - -".split()


@pytest.mark.parametrize(
    ("value", "text"), [(2.5, "2.50x"), (99.5, "99.50x"), (1234.4, "1,234x"), (None, "-")]
)
def test_ratio_format(value: float | None, text: str) -> None:
    assert runner._ratio(value) == text


# ---------------------------------------------------------------------- arguments
def test_presets_and_overrides() -> None:
    quick = runner.config_from_args(parse(["--quick", "--iterations", "7"]))
    assert (quick.mode, quick.iterations, quick.rounds) == ("quick", 7, 3)
    full = runner.config_from_args(parse(["--full", "--naive-samples", "50"]))
    assert (full.iterations, full.naive_samples, full.scaling_naive_samples) == (10_000, 50, 5)
    default = runner.config_from_args(parse([]))
    assert (default.mode, default.seed, default.plot, default.dtypes) == (
        "default",
        0,
        True,
        ("float64", "float32"),
    )
    assert runner.config_from_args(parse(["--no-plot", "--dtype", "float32"])).dtypes == (
        "float32",
    )


def test_quick_and_full_exclude_each_other(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_request:
        parse(["--quick", "--full"])
    assert exit_request.value.code == 2
    assert "not allowed with argument --quick" in capsys.readouterr().err


def test_out_names_a_json_file_or_a_folder() -> None:
    as_file = runner.config_from_args(parse(["--out", "runs/today.json"]))
    assert as_file.json_path == Path("runs/today.json")
    assert as_file.plot_path == Path("runs/today-scaling.png")
    as_folder = runner.config_from_args(parse(["--out", "runs"]))
    assert as_folder.json_path == Path("runs/bench.json")
    assert as_folder.plot_path == Path("runs/scaling.png")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dtype", "float16"],
            "argument --dtype: takes a comma-separated list of float64, float32; got 'float16'",
        ),
        (["--workloads", "bogus"], "argument --workloads: takes a comma-separated list of train"),
        (["--backends", "tpu"], "argument --backends: takes a comma-separated list of numpy"),
        (["--rounds", "0"], "argument --rounds: takes an integer of at least 1; got '0'"),
        (["--iterations", "x"], "argument --iterations: takes an integer of at least 1; got 'x'"),
        (["--seed", "-1"], "argument --seed: takes an integer of at least 0; got '-1'"),
        (["--threads", "0"], "argument --threads: takes an integer of at least 1; got '0'"),
        (["--scaling-depths", "0"], "argument --scaling-depths: takes comma-separated positive"),
        (["--scaling-depths", "two"], "argument --scaling-depths: takes comma-separated"),
        (["--hidden-sizes", "5,x"], "argument --hidden-sizes: takes comma-separated positive"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], message: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_request:
        parse(argv)
    assert exit_request.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_argument_is_one_line_from_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastgrad", "bench", "--dtype", "float16", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "fastgrad bench: error: argument --dtype: takes a comma-separated list of float64, "
        "float32; got 'float16' (see 'fastgrad bench --help')"
    ]
    assert list(tmp_path.iterdir()) == []


def test_no_runnable_backend_exits_2_before_timing(tmp_path: Path, capsys: Any) -> None:
    if "cupy" in fastgrad.available_backends():
        pytest.skip("cupy can run here")
    status, out, err = run(["--backends", "cupy", "--out", str(tmp_path / "b.json")], capsys)
    assert status == 2 and out == ""
    assert err.startswith("fastgrad: error: none of the requested backends can run here (cupy: ")
    assert not (tmp_path / "b.json").exists()


def test_out_naming_an_existing_file_exits_2_and_leaves_it(tmp_path: Path, capsys: Any) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    status, out, err = run([*TINY, "--out", str(existing)], capsys)
    assert status == 2 and out == ""
    assert err == f"fastgrad: error: --out {existing} is a file: give a FILE.json or a folder\n"
    assert existing.read_text() == "mine"


# ------------------------------------------------------------- the whole command
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """``fastgrad bench`` at its smallest, to ``--out RUN/tiny.json``: status, output, JSON path."""
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastgrad", "bench", *TINY, "--out", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr, path


def test_run_bench_tiny_config(tiny_run: tuple[int, str, Path]) -> None:
    status, output, path = tiny_run
    assert status == 0, output
    assert "machine:" in output and "numpy 2" in output and "load average:" in output
    assert "warm-up / JIT compile (not in the timings): numpy float64" in output
    # pytest-benchmark's table, one per group
    for group in (
        "train x4 float64",
        "gradient float64",
        "scaling h=5 float64",
        "train-deep h=100,100,100 relu x4 float64",
        "scaling h=5,5 relu float64",
    ):
        assert f"benchmark '{group}'" in output
    assert "Name (time in " in output and "Median" in output
    assert "ratios of this run's medians, within each group:" in output
    rows = [line.split() for line in output.splitlines()]
    assert any(row[:4] == ["gradient", "float64", "numpy", "naive*"] for row in rows)
    assert f"wrote {path} (read it with: pytest-benchmark compare {path})" in output


def test_bench_json_is_pytest_benchmarks(tiny_run: tuple[int, str, Path]) -> None:
    data = json.loads(tiny_run[2].read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(data)
    assert {"cpu", "python_version", "fastgrad"} <= set(data["machine_info"])
    assert {"usable_cpus", "versions", "backends"} <= set(data["machine_info"]["fastgrad"])
    assert "id" in data["commit_info"]
    ours = data["fastgrad"]
    assert ours["config"]["iterations"] == 4 and ours["failed"] == {}
    assert "numpy" in ours["compile_seconds"] and ours["dataset"] == "MNIST (embedded subset)"
    seen = set()
    for bench in data["benchmarks"]:
        assert {
            "group",
            "name",
            "fullname",
            "params",
            "param",
            "extra_info",
            "options",
            "stats",
        } <= set(bench)
        stats, info = bench["stats"], bench["extra_info"]
        assert stats["rounds"] == len(stats["data"]) == 1
        assert stats["min"] <= stats["median"] <= stats["max"]
        assert info["error"] is None and "relative_to_numpy_backprop" in info
        seen.add((info["workload"], info["implementation"], info["method"]))
    assert {
        ("train", "book", "backprop"),
        ("train", "numpy", "backprop"),
        ("train-deep", "book", "backprop"),
        ("train-deep", "numpy", "backprop"),
        ("gradient", "numpy", "fast"),
        ("gradient", "book", "naive"),
        ("scaling", "numpy", "forward"),
    } <= seen
    deep = [b["extra_info"] for b in data["benchmarks"] if b["group"].startswith("train-deep")]
    assert {(tuple(i["layer_sizes"]), i["activation"], i["hidden_layers"]) for i in deep} == {
        ((784, 100, 100, 100, 10), "relu", 3)
    }
    assert all(info["speedup_vs_book"] for info in deep)  # the ratio to the plain NumPy loop
    naive = [b["extra_info"] for b in data["benchmarks"] if b["name"].endswith("naive")]
    assert naive and all(i["extrapolated"] and i["scale_to_full"] > 1 for i in naive)


def test_pytest_benchmark_compare_reads_the_json(
    tiny_run: tuple[int, str, Path], tmp_path: Path
) -> None:
    # In an empty folder: compare would load a conftest.py from its working directory.
    result = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "compare", str(tiny_run[2])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to load" not in result.stdout + result.stderr
    for group in ("train x4 float64", "gradient float64", "scaling h=5,5 relu float64"):
        assert f"benchmark '{group}'" in result.stdout
    for name in ("book backprop", "numpy fast", "numpy naive", "numpy forward"):
        assert name in result.stdout


def test_threads_cap_and_the_folder_out(tmp_path: Path, capsys: Any) -> None:
    from threadpoolctl import threadpool_info

    before = [pool["num_threads"] for pool in threadpool_info()]
    argv = [*TINY, "--threads", "1", "--workloads", "train", "--out", str(tmp_path)]
    status, out, _ = run(argv, capsys)
    assert status == 0 and "threads capped at 1 (--threads)" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine_info"]["fastgrad"]["threads_limit"] == 1
    assert [pool["num_threads"] for pool in threadpool_info()] == before  # restored
    assert not (tmp_path / "scaling.png").exists()  # no scaling workload, no plot


def test_scaling_plot_written(tiny_run: tuple[int, str, Path]) -> None:
    plot = tiny_run[2].with_name("tiny-scaling.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in tiny_run[1]
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {plot}" in tiny_run[1]


def plot_row(implementation: str, method: str, seconds: float, net: NetSpec) -> dict[str, Any]:
    """What the plot reads of a benchmark: its extra_info and median."""
    info = counting_case(implementation=implementation, method=method, net=net).extra_info
    return {**info, "workload": "scaling", "median_s": seconds}


def test_scaling_plot_has_a_depth_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: list[Any] = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda self, *args, **kwargs: (figures.append(self), real_savefig(self, *args, **kwargs)),
    )
    rows = [
        plot_row(implementation, method, seconds * depth, scaling_net(width, depth))
        for implementation, seconds in (("numpy", 1e-2), ("numba", 1e-3))
        for method in ("backprop", "fast", "naive", "forward")
        for depth in (1, 2, 3)
        for width in (5, 10, 50 if depth == 1 else 10)
    ]
    assert runner.write_scaling_plot(rows, tmp_path / "depth.png")
    width_axes, depth_axes = figures[-1].axes
    assert width_axes.get_xscale() == "log" and len(width_axes.lines) == 7  # 6 series + model
    assert "width 10" in depth_axes.get_title()
    assert sorted(depth_axes.get_xticks()) == [1, 2, 3] and len(depth_axes.lines) == 7
    only_depth_one = [r for r in rows if r["hidden_layers"] == 1]
    assert runner.write_scaling_plot(only_depth_one, tmp_path / "width.png")
    assert len(figures[-1].axes) == 1


def test_plot_says_when_matplotlib_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert runner.write_scaling_plot([], tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_missing_peers_are_skipped_with_a_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("torch", "jax") else real_find_spec(name, *args)

    monkeypatch.setattr(peers.importlib.util, "find_spec", find_spec)
    runnable, skipped = peers.available_peers()
    assert runnable == []
    assert set(skipped) == {"torch-cpu", "torch-cuda", "jax"}
    assert "pip install torch" in skipped["torch-cpu"]
    argv = [*TINY, "--peers", "--workloads", "gradient", "--no-plot", "--out", str(tmp_path)]
    status, out, err = run(argv, capsys)
    assert status == 0
    assert "skipped torch-cpu: torch is not installed" in out
    assert "skipped jax: jax is not installed" in err


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
    argv = [*TINY, "--workloads", "gradient", "--no-plot", "--out", str(tmp_path / "f.json")]
    status, out, err = run(argv, capsys)
    assert status == 1
    failed = "fastgrad bench::gradient float64::numpy fast"
    assert f"FAILED {failed}: check failed: W1: max abs difference" in out
    assert err.endswith("1 benchmark check(s) FAILED\n")
    data = json.loads((tmp_path / "f.json").read_text())
    assert list(data["fastgrad"]["failed"]) == [failed]
    assert "numpy fast" not in [b["name"] for b in data["benchmarks"]]  # pytest-benchmark's rule


def test_the_kernels_import_path_leaves_the_peers_out() -> None:
    code = (
        "import sys, fastgrad, fastgrad.backends, fastgrad.benchmarks.workloads\n"
        "for name in fastgrad.available_backends(): fastgrad.get_backend(name)\n"
        "print(','.join(m for m in ('torch', 'jax', 'fastgrad.benchmarks.peers') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_importing_the_runner_stays_light() -> None:
    code = (
        "import sys, fastgrad.benchmarks.runner\n"
        "heavy = ('numba', 'cupy', 'torch', 'jax', 'matplotlib')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_bench_without_pytest_benchmark_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['pytest_benchmark'] = None\n"  # as if it were not installed
        "from fastgrad.cli import main; sys.exit(main(['bench', '--quick']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "fastgrad: error: bench needs pytest-benchmark, which is not installed "
        "(pip install 'fastgrad[bench]')"
    ]


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
        net,
        data.inputs(np.float64),
        np.eye(10)[data.labels],
        300,
        50,
        0.5,
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
        book,
        factory.inputs("float64"),
        np.eye(10)[factory.dataset.labels],
        150,
        50,
        0.1,
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
    if peers.peer_unavailable_reason(peer):
        pytest.skip(peers.peer_unavailable_reason(peer))
    factory = WorkloadFactory(synthetic_mnist(1000), seed=0)
    case = factory.train_case(peer, "float32", 100, SMALL_RELU)
    losses = case.run(case.setup())
    case.check(losses)
    reference = factory.train_case("numpy", "float32", 100, SMALL_RELU)
    np.testing.assert_allclose(
        np.asarray(losses if peer == "jax" else losses.numpy()),
        np.asarray(reference.run(reference.setup())),
        rtol=1e-3,
        atol=1e-4,
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
    monkeypatch.setattr(runner, "DEEP_GRADIENT_NET", SMALL_RELU)
    argv = [*TINY, "--workloads", "gradient-deep", "--no-plot", "--out", str(tmp_path)]
    status, out, _ = run(argv, capsys)
    assert status == 0
    assert "benchmark 'gradient-deep h=6,5 relu float64': 5 tests" in out
    benchmarks = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert {b["name"] for b in benchmarks} == {
        "book backprop",
        "book naive",
        "numpy backprop",
        "numpy fast",
        "numpy naive",
    }
    assert {b["group"] for b in benchmarks} == {"gradient-deep h=6,5 relu float64"}
    numpy_fast = next(b["extra_info"] for b in benchmarks if b["name"] == "numpy fast")
    assert numpy_fast["speedup_vs_book"] > 1  # over the book's naive loop


def test_plan_keeps_wide_deep_nets_off_the_scaling_curve() -> None:
    config = runner.BenchConfig.preset("default", hidden_sizes=(5, 100, 500))
    groups = runner._plan(config, ["numpy"], [])
    scaling = sorted({item[4].hidden for group in groups for item in group if item[0] == "scaling"})
    assert scaling == [(5,), (5, 5), (5, 5, 5), (100,), (100, 100), (100, 100, 100), (500,)]
    quick = runner.BenchConfig.preset("quick", hidden_sizes=(50, 100))
    deep = {
        item[4].hidden
        for group in runner._plan(quick, ["numpy"], [])
        for item in group
        if item[0] == "scaling" and item[4].hidden_layers > 1
    }
    assert deep == {(50, 50), (50, 50, 50)}
    workloads_run = [group[0][0] for group in groups]
    assert (
        workloads_run
        == ["train", "train", "gradient", "train-deep", "train-deep", "gradient-deep"]
        + ["scaling"] * 7
    )
