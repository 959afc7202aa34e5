"""``fastgrad bench``: every backend, the book's code and the peers, timed side by side.

This runner keeps only what pytest-benchmark does not do: the rounds of one
workload's implementations are interleaved, every timing is set against
baselines timed in the same run (ratios are what compares across these noisy
machines), the naive numerical gradient is timed on a sample of the
parameters and extrapolated, and the scaling curve is drawn. Statistics,
machine and commit information, the JSON file and the tables are
pytest-benchmark's own, so ``pytest-benchmark compare FILE.json`` reads what
``fastgrad bench --out FILE.json`` writes; the ratios and the extrapolation
are in each benchmark's ``extra_info``.

Workloads (the nets are in :mod:`fastgrad.benchmarks.workloads`): ``train``,
the chapter's run (TwoLayerNet(784, 50, 10), batch 100, lr 0.1, no
evaluations; 10,000 iterations with ``--full``); ``gradient``, one float64
gradient of that net by backprop, the fast numerical kernel and the naive
loop; ``train-deep`` and ``gradient-deep``, the same for ReLU
MultiLayerNets of three and two hidden layers of 100; ``scaling``, the
gradients at hidden sizes 5 to 500 and depths 1 to 3, with one forward loss
per size for the naive method's cost model (2·P forward passes).

Examples
--------
>>> import argparse
>>> from fastgrad.benchmarks.runner import add_bench_arguments
>>> parser = argparse.ArgumentParser()
>>> add_bench_arguments(parser)
>>> parser.parse_args(["--quick", "--dtype", "float32"]).dtypes
('float32',)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pytest_benchmark.cli import TerminalReporter
from pytest_benchmark.logger import Logger
from pytest_benchmark.plugin import (
    pytest_benchmark_generate_json,
    pytest_benchmark_generate_machine_info,
    pytest_benchmark_group_stats,
    pytest_benchmark_scale_unit,
)
from pytest_benchmark.stats import Metadata
from pytest_benchmark.table import TableResults
from pytest_benchmark.utils import NAME_FORMATTERS, get_commit_info, report_noprogress, safe_dumps

from fastgrad.backends import get_backend, known_backends, unavailable_reason
from fastgrad.benchmarks import peers as peer_code
from fastgrad.benchmarks.workloads import (
    BOOK,
    CHAPTER_NET,
    DEEP_GRADIENT_NET,
    DEEP_TRAIN_NET,
    PEERS,
    Case,
    Dataset,
    NetSpec,
    WorkloadFactory,
    embedded_mnist,
    net_label,
    read_mnist,
    scaling_net,
    synthetic_mnist,
)

__all__ = [
    "BenchConfig",
    "Measurement",
    "Report",
    "add_bench_arguments",
    "add_ratios",
    "config_from_args",
    "measure_group",
    "run_bench",
    "run_suite",
    "write_json",
    "write_scaling_plot",
]

WORKLOADS = ("train", "gradient", "train-deep", "gradient-deep", "scaling")
DTYPES = ("float64", "float32")
# Beyond this width a net of 2-3 hidden layers is left out of the scaling
# curve: its fast numerical gradient (the reference kernel, ~5 s at three
# layers of 100 on 2 cores) grows with the square of the width.
SCALING_DEEP_MAX_WIDTH = 100
# Implementations whose first call runs the same code as every later one.
_NOTHING_TO_COMPILE = frozenset({"numpy", BOOK})
# The spread beside the median is part of the result.
COLUMNS = ["median", "min", "max", "rounds"]
_VERSIONED = ("fastgrad", "numpy", "numba", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax")
# Training images in the embedded MNIST subset (fastgrad/_data/mnist-mini.npz).
EMBEDDED_TRAIN_SIZE = 10_000


# ------------------------------------------------------------------ configuration
@dataclass
class BenchConfig:
    """Everything one ``fastgrad bench`` run does; the fields are the flags' names."""

    mode: str = "default"
    backends: tuple[str, ...] | None = None  # None: every known backend that is available
    dtypes: tuple[str, ...] = DTYPES
    workloads: tuple[str, ...] = WORKLOADS
    iterations: int = 1000
    rounds: int = 5
    budget_s: float = 5.0  # timed seconds per measurement before rounds are cut short
    hidden_sizes: tuple[int, ...] = (5, 10, 50, 100, 500)
    scaling_depths: tuple[int, ...] = (1, 2, 3)  # hidden layers of the scaling curve
    scaling_deep_max_width: int = SCALING_DEEP_MAX_WIDTH
    naive_samples: int = 400  # parameters the naive loop is timed on (gradient workload)
    scaling_naive_samples: int = 40
    # --quick and --full: code with nothing to compile (numpy, the book) skips
    # the untimed warm-up call, whose first call then counts as a timed round
    # (a warm-up of the book's 10,000 iterations would cost 12 s for nothing).
    warm_up_everything: bool = True
    threads: int | None = None
    # A pause before each timed call of an interleaved group: OpenBLAS's
    # worker threads spin for ~0.1 s after their last call, and on 2 cores
    # the next implementation in the round ran ~0.1 s slower for it.
    settle_s: float = 0.2
    peers: bool = False
    out: Path = Path("fastgrad-bench")
    data: Path | None = None
    train_samples: int = 10_000
    seed: int = 0
    plot: bool = True

    @classmethod
    def preset(cls, mode: str, **overrides: Any) -> BenchConfig:
        """``quick`` (a minute or two on 2 cores), ``default``, or ``full`` (the issues' sizes)."""
        quick = {"iterations": 100, "rounds": 3, "budget_s": 1.0, "naive_samples": 100}
        quick.update(scaling_naive_samples=10, settle_s=0.05, scaling_deep_max_width=50)
        full = {"iterations": 10_000, "rounds": 3, "budget_s": 120.0, "naive_samples": 4000}
        full.update(scaling_naive_samples=400)
        presets: dict[str, dict[str, Any]] = {
            "quick": {**quick, "warm_up_everything": False},
            "default": {},
            "full": {**full, "warm_up_everything": False},
        }
        values = {"mode": mode, **presets[mode]}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def json_path(self) -> Path:
        """``--out`` when it names a ``.json`` file, else ``bench.json`` in that folder."""
        return self.out if self.out.suffix == ".json" else self.out / "bench.json"

    @property
    def plot_path(self) -> Path:
        """``FILE-scaling.png`` beside ``--out FILE.json``, else ``scaling.png`` in the folder."""
        if self.out.suffix == ".json":
            return self.out.with_name(f"{self.out.stem}-scaling.png")
        return self.out / "scaling.png"


def _list_of(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of some of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item.strip() for item in text.split(",") if item.strip())
        if not values or not set(values) <= set(allowed):
            raise argparse.ArgumentTypeError(
                f"takes a comma-separated list of {', '.join(allowed)}; got {text!r}"
            )
        return values

    return parse


def _positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers of at least 1."""
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated positive integers; got {text!r}")
    return values


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"takes an integer of at least {minimum}; got {text!r}"
            )
        return value

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``fastgrad bench``'s options to ``parser`` (the CLI's ``bench`` subparser)."""
    add = parser.add_argument
    backends = ",".join(known_backends())
    add(
        "--backends",
        type=_list_of(known_backends()),
        metavar="LIST",
        help=f"backends to time (default: every available one of {backends})",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="short runs: 100 training iterations, a minute or two on 2 cores",
    )
    speed.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the issues' sizes: 10,000 training iterations, more naive samples",
    )
    parser.set_defaults(mode="default")
    add("--peers", action="store_true", help="also time PyTorch and JAX where installed")
    add(
        "--out",
        metavar="PATH",
        type=Path,
        help="FILE.json in pytest-benchmark's format (plot: FILE-scaling.png), or a folder "
        "for bench.json and scaling.png (default: ./fastgrad-bench)",
    )
    add(
        "--dtype",
        dest="dtypes",
        type=_list_of(DTYPES),
        metavar="LIST",
        help="dtypes of the training runs (default: float64,float32); gradients are float64",
    )
    add(
        "--workloads",
        type=_list_of(WORKLOADS),
        metavar="LIST",
        help=f"which workloads to run (default: {','.join(WORKLOADS)})",
    )
    add(
        "--iterations",
        type=_at_least(1),
        metavar="N",
        help="training iterations per timed run (default: 100 quick, 1000, 10000 full)",
    )
    add(
        "--rounds",
        type=_at_least(1),
        metavar="N",
        help="timed rounds per measurement, after one untimed warm-up round",
    )
    add(
        "--hidden-sizes",
        type=_positive_ints,
        metavar="LIST",
        help="hidden sizes of the scaling curve (default: 5,10,50,100,500; deeper nets only "
        f"up to {SCALING_DEEP_MAX_WIDTH}, 50 with --quick)",
    )
    add(
        "--scaling-depths",
        type=_positive_ints,
        metavar="LIST",
        help="hidden layers of the scaling curve's nets (default: 1,2,3)",
    )
    add(
        "--naive-samples",
        type=_at_least(1),
        metavar="N",
        help="parameters the naive loop is timed on before extrapolating to all of them "
        "(default: 100 quick, 400, 4000 full; a tenth of that on the scaling curve)",
    )
    add(
        "--train-samples",
        type=_at_least(1),
        metavar="N",
        help="training rows: of the embedded MNIST subset up to 10000 (the default), "
        "synthetic MNIST-like rows beyond",
    )
    add("--data", metavar="DIR", type=Path, help="train on MNIST's .gz IDX files in DIR")
    add(
        "--threads",
        type=_at_least(1),
        metavar="N",
        help="cap BLAS, Numba and PyTorch threads at N for the run",
    )
    add("--seed", type=_at_least(0), help="seeds weights, data and batches (default: 0)")
    add("--no-plot", dest="plot", action="store_false", default=None, help="skip the PNG")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Turn parsed ``fastgrad bench`` arguments into a :class:`BenchConfig`."""
    given = {
        name: getattr(args, name, None)
        for name in (spec.name for spec in dataclasses.fields(BenchConfig))
        if name != "mode"
    }
    if args.naive_samples is not None:
        given["scaling_naive_samples"] = max(1, args.naive_samples // 10)
    config = BenchConfig.preset(args.mode or "default", **given)
    if config.out.suffix != ".json" and config.out.exists() and not config.out.is_dir():
        raise ValueError(f"--out {config.out} is a file: give a FILE.json or a folder")
    return config


# ---------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    """Timed rounds of one :class:`Case`, in seconds (already scaled for sampled cases)."""

    times: list[float]
    first_call: float
    error: str | None = None


def measure_group(
    cases: Sequence[Case],
    rounds: int,
    budget_s: float = math.inf,
    warmups: Sequence[bool] | None = None,
    on_start: Callable[[Case], None] | None = None,
    settle_s: float = 0.0,
) -> list[Measurement]:
    """Time ``case.run`` of each case: one untimed warm-up call, then up to ``rounds`` timed calls.

    The warm-up call takes any remaining JIT compilation, lazy kernel builds
    and allocator growth out of the timed rounds; its time is kept as
    ``first_call``. A case's rounds stop early once it has spent ``budget_s``
    timed seconds, but at least one always runs. Rounds are interleaved
    (round r of every case before round r + 1 of any), so that a change in
    the machine's load lands on every implementation alike and the ratios
    stay fair. Each ``run`` synchronises its device before returning, so the
    clock stops after the work is done. The warm-up value and the last timed
    value are both checked. ``warmups[i] = False`` makes case i's first call
    its first timed round (code with nothing to compile, when time is short).
    ``settle_s`` seconds of sleep precede every call of a group of several
    cases, so that one implementation's idle worker threads (which spin a
    while after their work, competing for the cores) are not timed as part
    of the next one's run.
    """
    warmups = [True] * len(cases) if warmups is None else list(warmups)
    times: list[list[float]] = [[] for _ in cases]
    spent = [0.0] * len(cases)
    first_calls = [math.nan] * len(cases)
    errors: list[str | None] = [None] * len(cases)
    last: list[Any] = [None] * len(cases)

    def timed(index: int) -> float:
        case = cases[index]
        if settle_s > 0 and len(cases) > 1:
            time.sleep(settle_s)
        state = case.setup()
        start = time.perf_counter()
        last[index] = case.run(state)
        return time.perf_counter() - start

    def check(index: int) -> None:
        try:
            cases[index].check(last[index])
        except AssertionError as failure:
            errors[index] = f"check failed: {failure}"

    for index, case in enumerate(cases):
        if on_start is not None:
            on_start(case)
        elapsed = timed(index)
        first_calls[index] = elapsed * case.scale
        check(index)
        if not warmups[index] and errors[index] is None:
            times[index].append(elapsed * case.scale)
            spent[index] = elapsed
    for _ in range(rounds):
        for index, case in enumerate(cases):
            if errors[index] or len(times[index]) >= rounds:
                continue
            if times[index] and spent[index] >= budget_s:
                continue
            elapsed = timed(index)
            spent[index] += elapsed
            times[index].append(elapsed * case.scale)
    for index in range(len(cases)):
        if errors[index] is None and times[index]:
            check(index)
    return [Measurement(*measured) for measured in zip(times, first_calls, errors, strict=True)]


@dataclass
class _Fixture:
    """What pytest-benchmark's ``Metadata`` reads from its ``benchmark`` fixture."""

    name: str
    fullname: str
    group: str
    param: str
    params: dict[str, str]
    extra_info: dict[str, Any]
    has_error: bool
    cprofile_stats: None = None


def group_of(case: Case) -> str:
    """The case's group, whose cases are each other's baselines: ``train x1000 float32``."""
    group = case.workload + net_label(case.workload, case.net.hidden, case.net.activation)
    if case.workload.startswith("train"):
        group += f" x{case.iterations}"
    return f"{group} {case.dtype}"


def to_benchmark(case: Case, measured: Measurement, options: dict[str, Any]) -> Metadata:
    """The case's rounds as a pytest-benchmark benchmark: its statistics and ``extra_info``.

    One round is one call of ``case.run`` (pytest-benchmark's ``iterations``
    is 1); a sampled naive gradient's rounds are already scaled to all
    parameters, by ``extra_info["scale_to_full"]``.
    """
    name, group = f"{case.implementation} {case.method}", group_of(case)
    params = {"implementation": case.implementation, "method": case.method, "dtype": case.dtype}
    extra_info = {**case.extra_info, "first_call_s": measured.first_call, "error": measured.error}
    fullname, param = f"fastgrad bench::{group}::{name}", "-".join(params.values())
    failed = measured.error is not None
    fixture = _Fixture(name, fullname, group, param, params, extra_info, failed)
    benchmark = Metadata(fixture, iterations=1, options=options)
    for seconds in measured.times:
        benchmark.update(seconds)
    return benchmark


def add_ratios(benchmarks: Sequence[Metadata]) -> None:
    """Set each benchmark's ratios to the baselines of its group, from medians, in extra_info.

    ``relative_to_numpy_backprop``: its time over NumPy backprop's (lower is
    faster). ``numerical_over_backprop``: a numerical gradient's time over
    backprop's on the same implementation. ``speedup_vs_book``: the book's time
    for the same result over its own (the book's numerical gradient is its
    naive loop). ``speedup_vs_peers``: each peer's backprop time over its own.
    None (no peers) where the group has no such baseline.
    """
    timed = [benchmark for benchmark in benchmarks if benchmark and not benchmark.has_error]
    medians: dict[str, dict[tuple[str, str], float]] = {}
    for benchmark in timed:
        info = benchmark.extra_info
        by_name = medians.setdefault(benchmark.group, {})
        by_name[info["implementation"], info["method"]] = benchmark.stats.median
    for benchmark in timed:
        info, own, group = benchmark.extra_info, benchmark.stats.median, medians[benchmark.group]
        method, implementation = info["method"], info["implementation"]
        numpy_backprop = group.get(("numpy", "backprop"))
        own_backprop = group.get((implementation, "backprop"))
        book = group.get((BOOK, "naive" if method == "fast" else method))
        numerical = method in ("fast", "naive")
        info["relative_to_numpy_backprop"] = own / numpy_backprop if numpy_backprop else None
        info["numerical_over_backprop"] = own / own_backprop if numerical and own_backprop else None
        info["speedup_vs_book"] = book / own if book else None
        info["speedup_vs_peers"] = {
            peer: group[peer, "backprop"] / own
            for peer in PEERS
            if method == "backprop" and peer != implementation and (peer, "backprop") in group
        }


# ------------------------------------------------------------------------ the run
@dataclass
class Report:
    """What :func:`run_suite` measured; :func:`write_json` writes it out."""

    config: BenchConfig
    machine_info: dict[str, Any]
    commit_info: dict[str, Any]
    dataset: str
    benchmarks: list[Metadata] = field(default_factory=list)
    compile_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    created: str = ""  # when the run started, UTC, ISO 8601
    wall_seconds: float = 0.0

    @property
    def timed(self) -> list[Metadata]:
        """The benchmarks that ran and passed their checks."""
        return [benchmark for benchmark in self.benchmarks if benchmark and not benchmark.has_error]

    @property
    def failures(self) -> dict[str, str]:
        """Full name -> error of every benchmark whose value failed its check."""
        return {b.fullname: b.extra_info["error"] for b in self.benchmarks if b.has_error}


Item = tuple[str, str, str, str, NetSpec]
"""A case to build: workload, implementation, method, dtype, net."""


def _gradient_methods(implementation: str) -> tuple[str, ...]:
    if implementation == BOOK:
        return ("backprop", "naive")
    if implementation in PEERS:
        return ("backprop",)
    return ("backprop", "fast", "naive")


def _plan(config: BenchConfig, backends: Sequence[str], peers: Sequence[str]) -> list[list[Item]]:
    """The cases to build, in groups whose rounds are interleaved (one workload, net, dtype)."""
    groups: list[list[Item]] = []
    everyone = (BOOK, *backends, *peers)
    fixed_nets = (
        ("train", CHAPTER_NET),
        ("gradient", CHAPTER_NET),
        ("train-deep", DEEP_TRAIN_NET),
        ("gradient-deep", DEEP_GRADIENT_NET),
    )
    for workload, net in fixed_nets:
        if workload not in config.workloads:
            continue
        if workload.startswith("train"):
            for dtype in config.dtypes:
                groups.append([(workload, name, "backprop", dtype, net) for name in everyone])
        else:
            methods = [(name, method) for name in everyone for method in _gradient_methods(name)]
            groups.append([(workload, name, method, "float64", net) for name, method in methods])
    if "scaling" in config.workloads:
        for depth in config.scaling_depths:
            for width in config.hidden_sizes:
                if depth > 1 and width > config.scaling_deep_max_width:
                    continue
                net = scaling_net(width, depth)
                methods = [
                    (name, method)
                    for name in backends
                    for method in ("backprop", "fast", "naive", "forward")
                ]
                groups.append(
                    [("scaling", name, method, "float64", net) for name, method in methods]
                )
    return [group for group in groups if group]


def _build(factory: WorkloadFactory, config: BenchConfig, item: Item) -> Case:
    workload, implementation, method, dtype, net = item
    if workload.startswith("train"):
        steps = config.iterations
        return factory.train_case(implementation, dtype, steps, net, workload=workload)
    samples = config.scaling_naive_samples if workload == "scaling" else config.naive_samples
    return factory.gradient_case(
        implementation, method, net, workload=workload, naive_samples=samples
    )


def _load_dataset(config: BenchConfig) -> Dataset:
    if config.data is not None:
        return read_mnist(config.data, "train")
    if config.train_samples <= EMBEDDED_TRAIN_SIZE:
        return embedded_mnist(config.train_samples)
    # More rows than the embedded subset holds: MNIST-like data of that size.
    return synthetic_mnist(config.train_samples, config.seed)


def run_suite(config: BenchConfig) -> Report:
    """Run every workload of ``config`` and return the :class:`Report` (progress on stderr).

    Raises ``ValueError`` when none of the requested backends can run here.
    """
    began = time.perf_counter()
    skipped: dict[str, str] = {}
    backends: list[str] = []
    for name in config.backends or known_backends():
        reason = unavailable_reason(name)
        if reason is None:
            backends.append(name)
        else:
            skipped[name] = reason
    if not backends:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ValueError(f"none of the requested backends can run here ({reasons})")
    peers: list[str] = []
    if config.peers:
        peers, peer_skips = peer_code.available_peers()
        skipped.update(peer_skips)
    with contextlib.ExitStack() as limits:
        if config.threads is not None:
            _limit_threads(config.threads, backends, peers, limits)
        report = _run_plan(config, backends, peers, skipped)
    report.wall_seconds = time.perf_counter() - began
    return report


def _limit_threads(
    threads: int, backends: Sequence[str], peers: Sequence[str], stack: contextlib.ExitStack
) -> None:
    """Cap BLAS, Numba and PyTorch at ``threads`` threads for the run (``--threads``)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("threadpoolctl is not installed: BLAS threads left as they are", file=sys.stderr)
    else:
        stack.enter_context(threadpool_limits(limits=threads))
    if "numba" in backends:
        import numba

        previous = numba.get_num_threads()
        try:
            numba.set_num_threads(threads)
        except ValueError as error:  # more than NUMBA_NUM_THREADS: keep Numba's own count
            print(f"numba threads left at {previous}: {error}", file=sys.stderr)
        else:
            stack.callback(numba.set_num_threads, previous)
    peer_code.limit_threads(threads, peers, stack)


def _run_plan(
    config: BenchConfig, backends: list[str], peers: list[str], skipped: dict[str, str]
) -> Report:
    dataset = _load_dataset(config)
    factory = WorkloadFactory(dataset, config.seed)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info(backends, peers, config.threads)
    report = Report(config, machine, get_commit_info("fastgrad"), dataset.source, created=now)
    report.skipped = skipped
    groups = _plan(config, backends, peers)
    compile_dtypes = sorted(set(config.dtypes) | {"float64"})
    total = sum(len(group) for group in groups) + len(backends) * len(compile_dtypes)
    done = 0

    def progress(label: str) -> None:
        nonlocal done
        done += 1
        print(f"[{done:>3}/{total}] {label}", file=sys.stderr, flush=True)

    def announce(case: Case) -> None:
        progress(f"{group_of(case)}: {case.implementation} {case.method}")

    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    # Compile ahead, so that the timed rounds (and the first calls) see
    # steady-state code; the time is reported on its own.
    for name in backends:
        report.compile_seconds[name] = {}
        for dtype in compile_dtypes:
            progress(f"warm-up / JIT compile {name} {dtype}")
            start = time.perf_counter()
            get_backend(name).warmup(dtype)
            report.compile_seconds[name][dtype] = time.perf_counter() - start
    # pytest-benchmark's "options": how the rounds were taken.
    options: dict[str, Any] = {"rounds": config.rounds, "budget_s": config.budget_s}
    options.update(interleaved=True, settle_s=config.settle_s, timer="time.perf_counter")
    for group in groups:
        # Built one group at a time: a group's cases share the data on the
        # device, and nothing of the previous group is kept alive.
        cases = [_build(factory, config, item) for item in group]
        warmups = [
            config.warm_up_everything or case.implementation not in _NOTHING_TO_COMPILE
            for case in cases
        ]
        measured = measure_group(
            cases, config.rounds, config.budget_s, warmups, announce, config.settle_s
        )
        for case, warmup, measurement in zip(cases, warmups, measured, strict=True):
            benchmark = to_benchmark(case, measurement, {**options, "warmup": warmup})
            if measurement.error:
                print(f"FAILED {benchmark.fullname}: {measurement.error}", file=sys.stderr)
            report.benchmarks.append(benchmark)
        del cases
    add_ratios(report.benchmarks)
    report.machine_info["fastgrad"]["load_average_end"] = _load_average()
    return report


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine shows up in every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on Windows
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(
    backends: Sequence[str], peers: Sequence[str], threads: int | None
) -> dict[str, Any]:
    """pytest-benchmark's machine info, and under ``fastgrad`` what else the timings depend on.

    That is: the CPUs this process may use, the packages' versions, each
    backend's ``describe()`` (BLAS, threads, device), the peers' threads, the
    ``--threads`` cap and the load average before (and, once run, after) the run.
    """
    info = pytest_benchmark_generate_machine_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    info["fastgrad"] = {
        "usable_cpus": usable,
        "versions": {name: version for name in _VERSIONED if (version := _version(name))},
        "backends": {name: get_backend(name).describe() for name in backends},
        "peers": peer_code.describe(peers),
        "threads_limit": threads,
        "load_average_start": _load_average(),
    }
    return info


# ------------------------------------------------------------------------ report
def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def format_ratios(benchmarks: Sequence[Metadata]) -> str:
    """One line per benchmark: its ratios to the baselines of its group (see :func:`add_ratios`).

    A ``*`` marks the naive loop's extrapolated timings.
    """
    peers = sorted({peer for b in benchmarks for peer in b.extra_info["speedup_vs_peers"]})
    rows = [("group", "benchmark", "/numpy bp", "num/bp", "vs book", *(f"vs {p}" for p in peers))]
    for benchmark in benchmarks:
        info = benchmark.extra_info
        ratios = [info[key] for key in ("relative_to_numpy_backprop", "numerical_over_backprop")]
        ratios += [info["speedup_vs_book"], *(info["speedup_vs_peers"].get(p) for p in peers)]
        name = benchmark.name + ("*" if info["extrapolated"] else "")
        rows.append((benchmark.group, name, *map(_ratio, ratios)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in [rows[0], tuple("-" * width for width in widths), *rows[1:]]:
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_table(benchmarks: Sequence[Metadata]) -> None:
    """pytest-benchmark's own table of the timings, one per group, on stdout."""
    flat = [{**b.as_dict(include_data=False, flat=True), "source": None} for b in benchmarks]
    groups = pytest_benchmark_group_stats(config=None, benchmarks=flat, group_by="group")
    scale_unit = partial(pytest_benchmark_scale_unit, config=None)
    table = TableResults(
        COLUMNS, "name", False, NAME_FORMATTERS["short"], Logger(Logger.QUIET), scale_unit
    )
    table.display(TerminalReporter(), groups, progress_reporter=report_noprogress)


def print_report(report: Report) -> None:
    """The machine, compile times, pytest-benchmark's table and the ratios, on stdout."""
    info, ours, config = report.machine_info, report.machine_info["fastgrad"], report.config
    cpu = info.get("cpu", {})
    versions = ", ".join(f"{name} {version}" for name, version in ours["versions"].items())
    lines = [
        f"fastgrad bench ({config.mode}) - {report.created}, commit {report.commit_info['id']}",
        f"machine: {cpu.get('brand_raw', info['machine'])}, {ours['usable_cpus']} usable of "
        f"{cpu.get('count', '?')} CPUs, Python {info['python_version']}; {versions}",
    ]
    for name, facts in {**ours["backends"], "peers": ours["peers"]}.items():
        if facts:
            lines.append(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in facts.items()))
    if ours["threads_limit"] is not None:
        lines.append(f"threads capped at {ours['threads_limit']} (--threads)")
    start, end = ours["load_average_start"], ours.get("load_average_end")
    if start is not None and end is not None:
        lines.append(f"load average: {start:.2f} before the run, {end:.2f} at its end")
        # The start value is other people's work; the end value includes this run's.
        if start > 0.5 * (ours["usable_cpus"] or 1):
            lines[-1] += "; the machine was busy: expect noisy timings (--threads 1 keeps "
            lines[-1] += "multi-threaded BLAS from waiting on a busy core)"
    lines.append(f"data: {report.dataset}; a {config.settle_s:g} s pause before each timed")
    lines[-1] += " call lets the previous implementation's idle BLAS threads stop spinning"
    lines += [f"skipped {name}: {reason}" for name, reason in report.skipped.items()]
    compiled = "; ".join(
        f"{name} " + ", ".join(f"{dtype} {seconds:.2f} s" for dtype, seconds in by_dtype.items())
        for name, by_dtype in report.compile_seconds.items()
    )
    lines.append(f"warm-up / JIT compile (not in the timings): {compiled}")
    print("\n".join(lines))
    if report.timed:
        print_table(report.timed)
        print(f"ratios of this run's medians, within each group:\n{format_ratios(report.timed)}")
    for fullname, error in report.failures.items():
        print(f"FAILED {fullname}: {error}")
    print(
        "* naive: the per-element loop timed on every s-th element of each parameter "
        "(s = P // samples) and scaled by P / sampled: each element costs the same two losses.\n"
        "/numpy bp: time over NumPy backprop's (lower is faster); num/bp: numerical gradient "
        "over backprop; vs book, vs a peer: its time over this one (higher is faster).\n"
        "book: the book's code in plain NumPy (chapter 4's TwoLayerNet, chapter 6's "
        "MultiLayerNet for deeper nets); ReLU nets' numerical gradients are checked against "
        "NumPy's fast kernel (within 1e-9), not backprop, which differs at the kinks.\n"
        f"total wall time {report.wall_seconds:.1f} s"
    )


def write_json(report: Report, path: Path) -> None:
    """Write pytest-benchmark's JSON (what ``pytest-benchmark compare`` reads), plus ours.

    ``machine_info``, ``commit_info``, ``benchmarks`` (group, name, fullname,
    params, extra_info with the ratios, options, stats with the rounds' data),
    ``datetime`` and ``version`` are pytest-benchmark's; ``fastgrad`` holds the
    run's config, data, compile times, skipped implementations, failed checks
    (pytest-benchmark leaves failed benchmarks out) and wall time.
    """
    output = pytest_benchmark_generate_json(
        None, report.benchmarks, True, report.machine_info, report.commit_info
    )
    config = dataclasses.asdict(report.config)
    config.update(out=str(config["out"]), data=config["data"] and str(config["data"]))
    output["fastgrad"] = {
        "config": config,
        "dataset": report.dataset,
        "compile_seconds": report.compile_seconds,
        "skipped": report.skipped,
        "failed": report.failures,
        "wall_seconds": report.wall_seconds,
    }
    path.write_text(safe_dumps(output, ensure_ascii=True, indent=4) + "\n", encoding="utf-8")


def write_scaling_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Time per gradient against network size, log-log; False when matplotlib is missing.

    ``rows`` are benchmarks' extra_info with their ``median_s``. Left, against
    the parameters of the one-hidden-layer nets (the chapter's TwoLayerNet at
    every width): one line per implementation x method, and the line of the
    naive method's cost model, 2·P forward passes, from each size's measured
    NumPy forward loss. Right, when deeper nets were measured: the same
    against the number of hidden layers, at the widest width every depth has.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    scaling = [row for row in rows if row["workload"] == "scaling"]
    depths = sorted({row["hidden_layers"] for row in scaling})
    figure = Figure(figsize=(13.0 if len(depths) > 1 else 7.5, 5.0), layout="constrained")
    width_axes, *depth_axes = figure.subplots(1, 2 if len(depths) > 1 else 1, squeeze=False)[0]
    # Colour says which backend, the line style which method.
    implementations = sorted({row["implementation"] for row in scaling})
    colours = {name: f"C{index}" for index, name in enumerate(implementations)}
    one_layer = [row for row in scaling if row["hidden_layers"] == 1]
    _draw_scaling(width_axes, one_layer, colours, lambda row: row["num_params"])
    width_axes.set_xscale("log")
    width_axes.set_xlabel("parameters P of TwoLayerNet(784, H, 10)")
    width_axes.set_title(title or "gradient cost against network size")
    if depth_axes:
        figure.suptitle(title or "gradient cost against network size")
        width_axes.set_title("against width, one hidden layer")
        axes = depth_axes[0]
        widths = [
            {row["hidden_size"] for row in scaling if row["hidden_layers"] == d} for d in depths
        ]
        common = set.intersection(*widths)
        if common:
            width = max(common)
            chosen = [row for row in scaling if row["hidden_size"] == width]
            # The left panel's legend names the same lines.
            _draw_scaling(axes, chosen, colours, lambda row: row["hidden_layers"], legend=False)
            sizes = sorted({(row["hidden_layers"], row["num_params"]) for row in chosen})
            axes.set_xticks([depth for depth, _ in sizes])
            axes.set_xticklabels([f"{depth}\nP={params:,}" for depth, params in sizes])
            axes.set_title(f"against depth, hidden layers of width {width}")
        axes.set_xlabel("hidden layers (one: the chapter's sigmoid net; more: ReLU)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return True


def _draw_scaling(
    axes: Any,
    rows: Sequence[dict[str, Any]],
    colours: dict[str, str],
    x_of: Callable[[dict[str, Any]], float],
    legend: bool = True,
) -> None:
    """One line per implementation x method of ``rows`` at ``x_of(row)``, and the cost model."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row["method"] != "forward":
            points = series.setdefault((row["implementation"], row["method"]), [])
            points.append((x_of(row), row["median_s"]))
    styles = {"backprop": "o-", "fast": "s--", "naive": "^:"}
    for (implementation, method), points in sorted(series.items()):
        label = f"{implementation} {method}" + (" (extrapolated)" if method == "naive" else "")
        style, colour = styles.get(method, "o-"), colours[implementation]
        axes.plot(*zip(*sorted(points), strict=True), style, color=colour, label=label)
    model = sorted(
        (x_of(row), 2 * row["num_params"] * row["median_s"])
        for row in rows
        if row["method"] == "forward" and row["implementation"] == "numpy"
    )
    if model:
        label = "cost model: 2·P forward passes (numpy)"
        axes.plot(*zip(*model, strict=True), "k-", linewidth=3, alpha=0.25, label=label)
    axes.set_yscale("log")
    axes.set_ylabel("seconds per gradient (batch 100, float64)")
    axes.grid(True, which="both", alpha=0.3)
    if legend and (series or model):
        axes.legend(fontsize="small")


# --------------------------------------------------------------------- entry point
def run_bench(args: argparse.Namespace) -> int:
    """``fastgrad bench``: run, print the report, write the JSON and the scaling plot.

    Returns the exit status: 0 when every timed value passed its check, 1 when
    a check failed, 2 when ``--out`` names a file that is not ``.json`` or none
    of the requested backends can run (nothing is timed then).
    """
    try:
        config = config_from_args(args)
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        report = run_suite(config)
    except ValueError as error:
        print(f"fastgrad: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    write_json(report, config.json_path)
    print(f"wrote {config.json_path} (read it with: pytest-benchmark compare {config.json_path})")
    if config.plot and "scaling" in config.workloads:
        rows = [dict(b.extra_info, median_s=b.stats.median) for b in report.timed]
        title = f"{report.machine_info['cpu'].get('brand_raw', '')} - {report.created[:10]}"
        if write_scaling_plot(rows, config.plot_path, title):
            print(f"wrote {config.plot_path}")
        else:
            print("matplotlib is not installed: no scaling plot (pip install 'fastgrad[plot]')")
    if report.failures:
        print(f"{len(report.failures)} benchmark check(s) FAILED", file=sys.stderr)
        return 1
    return 0
