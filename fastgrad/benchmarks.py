"""``fastgrad bench``: the standard workloads on every backend, side by side, in one process.

Ratios are only meaningful between timings taken in one run on one machine
(shared machines drift by 10-15 % between runs), so this module times every
implementation in the same process and reports ratios next to the times:
to NumPy backprop on the same workload, and numerical/backprop on the same
backend. JIT compilation and device warm-up happen before the timed rounds
and are reported on their own.

Workloads (see :mod:`fastgrad._bench_workloads`):

``train`` (workload A)
    The chapter's training run: TwoLayerNet(784, 50, 10), batch 100, lr 0.1,
    no accuracy evaluations; 10,000 iterations with ``--full``. Includes the
    book's own loop as the baseline.
``gradient`` (workload B)
    One float64 gradient of 784-50-10 at batch 100: backprop, the fast
    numerical kernel, and the naive per-element loop timed on a fixed sample
    of the parameters and extrapolated (marked ``*``).
``train-deep`` (workload C)
    MultiLayerNet(784, [100, 100, 100], 10, "relu"), He init, batch 100,
    lr 0.1, float64 and float32, as many iterations as ``train``: the
    model's loop on each backend; the baseline ``book`` is the same net
    written out in plain NumPy (the book's chapter-6 MultiLayerNet and its
    loop); peers JAX (jit + ``lax.scan`` over all steps) and PyTorch.
``gradient-deep``
    One float64 gradient of MultiLayerNet(784, [100, 100], 10, "relu") at
    batch 100, as ``gradient``; the sampled naive loop and the fast kernels
    must agree within 1e-9.
``scaling``
    The same at hidden sizes 5, 10, 50, 100, 500 with one hidden layer, and
    up to 100 with two and three (ReLU), plus one forward loss per size for
    the cost model of the naive method (2·P forward passes).

Examples
--------
>>> import argparse
>>> from fastgrad.benchmarks import add_bench_arguments
>>> parser = argparse.ArgumentParser()
>>> add_bench_arguments(parser)
>>> parser.parse_args(["--quick", "--backends", "numpy"]).backends
'numpy'
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fastgrad._bench_workloads import (
    BOOK,
    CHAPTER_NET,
    DEEP_GRADIENT_NET,
    DEEP_TRAIN_NET,
    PEERS,
    Case,
    Dataset,
    NetSpec,
    WorkloadFactory,
    available_peers,
    embedded_mnist,
    net_label,
    read_mnist,
    scaling_net,
    synthetic_mnist,
)
from fastgrad.backends import get_backend, known_backends, unavailable_reason

__all__ = [
    "BenchConfig",
    "Measurement",
    "add_bench_arguments",
    "format_table",
    "main",
    "measure",
    "measure_group",
    "run_bench",
    "run_suite",
]

# 2: results name their net (layer_sizes, activation, hidden_layers); deep workloads.
SCHEMA = "fastgrad-bench/2"
WORKLOADS = ("train", "gradient", "train-deep", "gradient-deep", "scaling")
DTYPES = ("float64", "float32")
SCALING_HIDDEN_SIZES = (5, 10, 50, 100, 500)
SCALING_DEPTHS = (1, 2, 3)
# Beyond this width a net of 2-3 hidden layers is left out of the scaling
# curve: its fast numerical gradient (the reference kernel, ~5 s at three
# layers of 100 on 2 cores) grows with the square of the width.
SCALING_DEEP_MAX_WIDTH = 100
# Implementations whose first call runs the same code as every later one.
_NOTHING_TO_COMPILE = frozenset({"numpy", BOOK})


# ------------------------------------------------------------------ configuration
@dataclass
class BenchConfig:
    """Everything one ``fastgrad bench`` run does (see :func:`config_from_args`)."""

    mode: str = "default"
    backends: list[str] | None = None  # None: every known backend that is available
    dtypes: tuple[str, ...] = DTYPES
    workloads: tuple[str, ...] = WORKLOADS
    iterations: int = 1000
    rounds: int = 5
    budget_s: float = 5.0  # timed seconds per measurement before rounds are cut short
    hidden_sizes: tuple[int, ...] = SCALING_HIDDEN_SIZES
    scaling_depths: tuple[int, ...] = SCALING_DEPTHS  # hidden layers of the scaling curve
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
        presets: dict[str, dict[str, Any]] = {
            "quick": {"iterations": 100, "rounds": 3, "budget_s": 1.0, "naive_samples": 100,
                      "scaling_naive_samples": 10, "warm_up_everything": False,
                      "settle_s": 0.05, "scaling_deep_max_width": 50},
            "default": {},
            "full": {"iterations": 10_000, "rounds": 3, "budget_s": 120.0, "naive_samples": 4000,
                     "scaling_naive_samples": 400, "warm_up_everything": False},
        }
        if mode not in presets:
            raise ValueError(f"mode must be one of {sorted(presets)}, got {mode!r}")
        values = {"mode": mode, **presets[mode]}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``fastgrad bench``'s options to ``parser`` (the CLI's ``bench`` subparser)."""
    parser.add_argument(
        "--backends",
        metavar="LIST",
        default=None,
        help="comma-separated backends to time (default: every available one of "
        f"{','.join(known_backends())}); unavailable ones are skipped with the reason",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick", dest="mode", action="store_const", const="quick",
        help="short runs (100 training iterations, deep scaling up to width 50): a minute "
        "or two on 2 cores",
    )
    speed.add_argument(
        "--full", dest="mode", action="store_const", const="full",
        help="the issues' workloads: 10,000 training iterations, more naive samples",
    )
    parser.set_defaults(mode="default")
    parser.add_argument(
        "--peers", action="store_true",
        help="also time PyTorch (CPU, and CUDA where present) and JAX when installed",
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, default=Path("fastgrad-bench"),
        help="folder for bench.json and scaling.png (default: ./fastgrad-bench)",
    )
    parser.add_argument(
        "--dtype", metavar="LIST", default=",".join(DTYPES),
        help="dtypes of the training runs (default: float64,float32); gradients are "
        "always float64, the precision numerical differences need",
    )
    parser.add_argument(
        "--workloads", metavar="LIST", default=",".join(WORKLOADS),
        help=f"which workloads to run (default: {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, metavar="N",
        help="training iterations per timed run (default: 100 quick, 1000, 10000 full)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, metavar="N",
        help="timed rounds per measurement, after one untimed warm-up round",
    )
    parser.add_argument(
        "--hidden-sizes", metavar="LIST", default=None,
        help="hidden sizes of the scaling curve (default: 5,10,50,100,500; with 2-3 hidden "
        f"layers only those up to {SCALING_DEEP_MAX_WIDTH}, 50 with --quick)",
    )
    parser.add_argument(
        "--scaling-depths", metavar="LIST", default=None,
        help="hidden layers of the scaling curve's nets (default: 1,2,3; one is the chapter's "
        "sigmoid net, more are ReLU nets of equal widths)",
    )
    parser.add_argument(
        "--naive-samples", type=int, default=None, metavar="N",
        help="parameters the naive loop is timed on before extrapolating to all of them "
        "(default: 100 quick, 400, 4000 full; a tenth of that on the scaling curve)",
    )
    parser.add_argument(
        "--train-samples", type=int, default=None, metavar="N",
        help="training rows: of the embedded MNIST subset up to 10000 (the default), "
        "of synthetic MNIST-like data beyond",
    )
    parser.add_argument(
        "--data", metavar="DIR", type=Path, default=None,
        help="train on MNIST from this folder of .gz IDX files instead of the embedded "
        "subset (the timings depend on the data only through its ~81%% zeros)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="cap BLAS, Numba and PyTorch threads at N for the run (default: as configured)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, data and batches")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")


def _positive_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(item) for item in _comma_list(text))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Turn parsed ``fastgrad bench`` arguments into a :class:`BenchConfig`."""
    dtypes = tuple(_comma_list(args.dtype))
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype takes float64 and/or float32, got {dtype!r}")
    workloads = tuple(_comma_list(args.workloads))
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"--workloads takes {', '.join(WORKLOADS)}; got {workload!r}")
    hidden = _positive_ints(args.hidden_sizes, "--hidden-sizes")
    depths = _positive_ints(args.scaling_depths, "--scaling-depths")
    for name in ("iterations", "rounds", "threads", "naive_samples", "train_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return BenchConfig.preset(
        args.mode or "default",
        backends=_comma_list(args.backends) if args.backends else None,
        dtypes=dtypes,
        workloads=workloads,
        iterations=args.iterations,
        rounds=args.rounds,
        hidden_sizes=hidden,
        scaling_depths=depths,
        peers=args.peers,
        out=args.out,
        data=args.data,
        seed=args.seed,
        plot=args.plot,
        threads=args.threads,
        naive_samples=args.naive_samples,
        scaling_naive_samples=(
            None if args.naive_samples is None else max(1, args.naive_samples // 10)
        ),
        train_samples=args.train_samples,
    )


# ---------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    """Timed rounds of one :class:`Case`, in seconds (already scaled for sampled cases)."""

    times: list[float]
    first_call: float
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def minimum(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def maximum(self) -> float:
        return max(self.times) if self.times else math.nan


def measure(
    case: Case, rounds: int, budget_s: float = math.inf, warmup: bool = True
) -> Measurement:
    """Time one case; see :func:`measure_group`."""
    return measure_group([case], rounds, budget_s, [warmup])[0]


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

    for index, case in enumerate(cases):
        if on_start is not None:
            on_start(case)
        elapsed = timed(index)
        first_calls[index] = elapsed * case.scale
        try:
            case.check(last[index])
        except AssertionError as failure:
            errors[index] = f"check failed: {failure}"
            continue
        if not warmups[index]:
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
    for index, case in enumerate(cases):
        if errors[index] is None and times[index]:
            try:
                case.check(last[index])
            except AssertionError as failure:
                errors[index] = f"check failed: {failure}"
    return [
        Measurement(times[index], first_calls[index], errors[index])
        for index in range(len(cases))
    ]


class Progress:
    """``[ 3/24] label`` lines on stderr; on a terminal, one line rewritten in place."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.count = 0
        self.stream = sys.stderr if stream is None else stream
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, label: str) -> None:
        self.count += 1
        line = f"[{self.count:>3}/{self.total}] {label}"
        if self.live:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ------------------------------------------------------------------------ the run
@dataclass
class Report:
    """What :func:`run_suite` measured; :func:`to_json` writes it out."""

    config: BenchConfig
    machine: dict[str, Any]
    dataset: str
    results: list[dict[str, Any]] = field(default_factory=list)
    compile_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    created: str = ""
    wall_seconds: float = 0.0

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [row for row in self.results if row["error"]]


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
            groups.append([
                (workload, name, method, "float64", net)
                for name in everyone for method in _gradient_methods(name)
            ])
    if "scaling" in config.workloads:
        for depth in config.scaling_depths:
            for width in config.hidden_sizes:
                if depth > 1 and width > config.scaling_deep_max_width:
                    continue
                groups.append([
                    ("scaling", implementation, method, "float64", scaling_net(width, depth))
                    for implementation in backends
                    for method in ("backprop", "fast", "naive", "forward")
                ])
    return [group for group in groups if group]


def _build(factory: WorkloadFactory, config: BenchConfig, item: Item) -> Case:
    workload, implementation, method, dtype, net = item
    if workload.startswith("train"):
        return factory.train_case(implementation, dtype, config.iterations, net,
                                  workload=workload)
    samples = config.scaling_naive_samples if workload == "scaling" else config.naive_samples
    return factory.gradient_case(
        implementation, method, net, workload=workload, naive_samples=samples
    )


# Training images in the embedded MNIST subset (fastgrad/_data/mnist-mini.npz).
EMBEDDED_TRAIN_SIZE = 10_000


def _load_dataset(config: BenchConfig) -> Dataset:
    if config.data is not None:
        return read_mnist(config.data, "train")
    if config.train_samples <= EMBEDDED_TRAIN_SIZE:
        return embedded_mnist(config.train_samples)
    # More rows than the embedded subset holds: MNIST-like data of that size.
    return synthetic_mnist(config.train_samples, config.seed)


def run_suite(config: BenchConfig, stream: TextIO | None = None) -> Report:
    """Run every workload of ``config`` and return the :class:`Report` (prints progress only)."""
    began = time.perf_counter()
    progress_stream = sys.stderr if stream is None else stream
    requested = config.backends if config.backends is not None else known_backends()
    skipped: dict[str, str] = {}
    backends: list[str] = []
    for name in requested:
        if name not in known_backends():
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(known_backends())}")
        reason = _unavailable(name)
        if reason is None:
            backends.append(name)
        else:
            skipped[name] = reason
    if not backends:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ValueError(f"none of the requested backends can run here ({reasons})")
    peers: list[str] = []
    if config.peers:
        peers, peer_skips = available_peers()
        skipped.update(peer_skips)

    with contextlib.ExitStack() as limits:
        if config.threads is not None:
            _limit_threads(config.threads, backends, peers, limits)
        report = _run_plan(config, backends, peers, skipped, progress_stream)
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
    if any(peer.startswith("torch") for peer in peers):
        import torch

        previous_torch = torch.get_num_threads()
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, previous_torch)


def _run_plan(
    config: BenchConfig,
    backends: list[str],
    peers: list[str],
    skipped: dict[str, str],
    progress_stream: TextIO,
) -> Report:
    dataset = _load_dataset(config)
    factory = WorkloadFactory(dataset, config.seed)
    report = Report(config, machine_report(backends, peers), dataset.source, skipped=skipped)
    report.machine["threads_limit"] = config.threads
    report.machine["load_average_start"] = _load_average()
    report.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    groups = _plan(config, backends, peers)
    compile_dtypes = sorted(set(config.dtypes) | {"float64"})
    total = sum(len(group) for group in groups) + len(backends) * len(compile_dtypes)
    progress = Progress(total, progress_stream)
    for name, reason in skipped.items():
        progress.note(f"skipped {name}: {reason}")

    # Compile ahead, so that the timed rounds (and the first calls) see
    # steady-state code; the time is reported on its own.
    for name in backends:
        report.compile_seconds[name] = {}
        for dtype in compile_dtypes:
            progress.start(f"warm-up / JIT compile {name} {dtype}")
            start = time.perf_counter()
            get_backend(name).warmup(dtype)
            report.compile_seconds[name][dtype] = time.perf_counter() - start

    for group in groups:
        # Built one group at a time: a group's cases share the data on the
        # device, and nothing of the previous group is kept alive.
        cases = [_build(factory, config, item) for item in group]
        warmups = [
            config.warm_up_everything or case.implementation not in _NOTHING_TO_COMPILE
            for case in cases
        ]
        measured = measure_group(
            cases, config.rounds, config.budget_s, warmups,
            on_start=lambda case: progress.start(case.label),
            settle_s=config.settle_s,
        )
        for case, measurement in zip(cases, measured, strict=True):
            if measurement.error:
                progress.note(f"FAILED {case.label}: {measurement.error}")
            report.results.append(_row(case, measurement))
        del cases
    progress.done()
    _add_ratios(report.results)
    report.machine["load_average_end"] = _load_average()
    return report


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine shows up in every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on Windows
        return None


def _unavailable(name: str) -> str | None:
    # A backend module that is being written may fail in ways other than
    # ImportError; the benchmark reports that instead of dying on it.
    try:
        return unavailable_reason(name)
    except Exception as error:  # any failure means "cannot run here"
        return f"backend {name!r} failed to load: {type(error).__name__}: {error}"


def _row(case: Case, measured: Measurement) -> dict[str, Any]:
    return {
        "workload": case.workload,
        "implementation": case.implementation,
        "method": case.method,
        "dtype": case.dtype,
        "hidden_size": case.hidden_size,
        "layer_sizes": list(case.net.layer_sizes),
        "activation": case.net.activation,
        "hidden_layers": case.net.hidden_layers,
        "batch_size": case.batch_size,
        "num_params": case.num_params,
        "iterations": case.iterations,
        "rounds": len(measured.times),
        "times_s": measured.times,
        "median_s": measured.median,
        "min_s": measured.minimum,
        "max_s": measured.maximum,
        "first_call_s": measured.first_call,
        "sampled_params": case.sampled_params,
        "extrapolated": case.sampled_params is not None,
        "error": measured.error,
        "notes": case.notes,
        "relative_to_numpy_backprop": None,
        "numerical_over_backprop": None,
        "speedup_vs_book": None,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill the ratio columns from rows of the same workload, net and dtype."""

    def key(row: dict[str, Any]) -> tuple:
        return (row["workload"], tuple(row["layer_sizes"]), row["activation"], row["dtype"])

    medians = {
        (*key(row), row["implementation"], row["method"]): row["median_s"]
        for row in rows
        if not row["error"] and row["times_s"]
    }
    for row in rows:
        own = row["median_s"]
        if row["error"] or not row["times_s"]:
            continue
        numpy_backprop = medians.get((*key(row), "numpy", "backprop"))
        if numpy_backprop:
            row["relative_to_numpy_backprop"] = own / numpy_backprop
        if row["method"] in ("fast", "naive"):
            backprop = medians.get((*key(row), row["implementation"], "backprop"))
            if backprop:
                row["numerical_over_backprop"] = own / backprop
        book = medians.get((*key(row), BOOK, row["method"]))
        if book and row["method"] in ("backprop", "naive"):
            row["speedup_vs_book"] = book / own


# ------------------------------------------------------------------------ machine
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in output.splitlines() if line.strip()]


def machine_report(backends: Iterable[str] = (), peers: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, threads, GPU and library versions: what the timings depend on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    packages = ("fastgrad", "numpy", "numba", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax",
                "jaxlib", "matplotlib", "threadpoolctl")
    machine: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "gpus": _gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages if _version(name)},
        "backends": {},
    }
    for name in backends:
        try:
            machine["backends"][name] = get_backend(name).describe()
        except Exception as error:  # a report line must not kill the run
            machine["backends"][name] = {"error": str(error)}
    peers = list(peers)
    if any(peer.startswith("torch") for peer in peers):
        import torch

        machine["torch_threads"] = torch.get_num_threads()
    return machine


# ------------------------------------------------------------------------ report
def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}x"
    return f"{value:.2f}x"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The result table: one line per workload x implementation x method x dtype.

    Columns: median and min-max of the timed rounds; ``/numpy bp`` the median
    over NumPy backprop's on the same workload (lower is faster); ``num/bp``
    numerical over backprop on the same implementation; ``vs book`` the
    book's time over this one (higher is faster). ``*`` marks extrapolated
    naive timings.
    """
    header = ("workload", "impl", "method", "dtype", "median", "min-max", "/numpy bp", "num/bp",
              "vs book")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        # The scaling curve names every size; elsewhere 784-50-10 is the chapter's net.
        hidden = row["layer_sizes"][1:-1]
        workload = row["workload"] + net_label(row["workload"], hidden, row["activation"])
        if row["workload"].startswith("train"):
            workload += f" x{row['iterations']}"
        median = _seconds(row["median_s"]) + ("*" if row["extrapolated"] else "")
        if row["error"]:
            lines.append((workload, row["implementation"], row["method"], row["dtype"],
                          "FAILED", row["error"][:40], "", "", ""))
            continue
        lines.append((
            workload, row["implementation"], row["method"], row["dtype"], median,
            f"{_seconds(row['min_s'])} - {_seconds(row['max_s'])}",
            _ratio(row["relative_to_numpy_backprop"]),
            _ratio(row["numerical_over_backprop"]),
            _ratio(row["speedup_vs_book"]),
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = []
    for index, line in enumerate(lines):
        cells = [
            cell.ljust(width) if column < 4 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
        if index == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def format_report(report: Report) -> str:
    """The machine, compile times, the table and its footnotes, as printed."""
    machine = report.machine
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    lines = [
        f"fastgrad bench ({report.config.mode}) - {report.created}",
        f"machine: {machine['cpu']}, {machine['usable_cpus']} usable of "
        f"{machine['logical_cpus']} logical CPUs; GPU: {', '.join(machine['gpus']) or 'none'}",
        f"python {machine['python']} on {machine['platform']}",
        f"versions: {versions}",
    ]
    for name, facts in machine["backends"].items():
        lines.append(f"backend {name}: " + "; ".join(f"{k}: {v}" for k, v in facts.items()))
    if "torch_threads" in machine:
        lines.append(f"torch threads: {machine['torch_threads']}")
    if machine.get("threads_limit") is not None:
        lines.append(f"threads capped at {machine['threads_limit']} (--threads)")
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if start is not None and end is not None:
        # The start value is other people's work; the end value includes this run's.
        busy = start > 0.5 * (machine["usable_cpus"] or 1)
        lines.append(
            f"load average: {start:.2f} before the run, {end:.2f} at its end"
            + (
                "; the machine was busy before the run: expect noisy timings "
                "(--threads 1 keeps multi-threaded BLAS from waiting on a busy core)"
                if busy else ""
            )
        )
    lines.append(f"data: {report.dataset}")
    if report.config.settle_s > 0:
        lines.append(
            f"a {report.config.settle_s:g} s pause precedes each timed call, so that the "
            "previous implementation's idle BLAS/OpenMP threads have stopped spinning"
        )
    for name, reason in report.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    if report.compile_seconds:
        compiled = "; ".join(
            f"{name} " + ", ".join(f"{dtype} {_seconds(s)}" for dtype, s in per_dtype.items())
            for name, per_dtype in report.compile_seconds.items()
        )
        lines.append(f"warm-up / JIT compile (not in the timings): {compiled}")
    lines += ["", format_table(report.results), ""]
    if any(row["extrapolated"] for row in report.results):
        lines.append(
            "* naive: the per-element loop timed on every s-th element of each parameter "
            "(s = P // samples) and scaled by P / sampled; each element costs the same two losses."
        )
    lines.append("/numpy bp: time over NumPy backprop's on the same workload (lower is faster); "
                 "num/bp: numerical over backprop; vs book: the book's time over this one.")
    lines.append("book: the book's code in plain NumPy, chapter 4's TwoLayerNet for 784-50-10 "
                 "and chapter 6's MultiLayerNet (Affine/ReLU/SoftmaxWithLoss layers) for the "
                 "deeper nets; numerical gradients of ReLU nets are checked against NumPy's fast "
                 "kernel (within 1e-9), not backprop, which differs where a step crosses a kink.")
    if "scaling" in report.config.workloads and max(report.config.scaling_depths) > 1:
        lines.append(f"scaling: nets of 2-3 hidden layers up to width "
                     f"{report.config.scaling_deep_max_width} (wider ones take minutes per "
                     "numerical gradient)")
    lines += _headlines(report.results)
    lines.append(f"total wall time {report.wall_seconds:.1f} s")
    return "\n".join(lines)


def _headlines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ratios the issues set targets for, as measured (no verdicts)."""
    found = {
        (row["workload"], tuple(row["layer_sizes"]), row["implementation"], row["method"],
         row["dtype"]): row["median_s"]
        for row in rows if not row["error"] and row["times_s"]
    }
    lines = []
    trainings = (("train", CHAPTER_NET, "the book's loop"),
                 ("train-deep", DEEP_TRAIN_NET, "the plain NumPy loop"))
    for workload, net, baseline_name in trainings:
        sizes = net.layer_sizes
        for dtype in DTYPES:
            baseline = found.get((workload, sizes, BOOK, "backprop", dtype))
            peers = [(label, found.get((workload, sizes, peer, "backprop", dtype)))
                     for label, peer in (("JAX", "jax"), ("PyTorch CPU eager", "torch-cpu"))]
            for name in known_backends():
                own = found.get((workload, sizes, name, "backprop", dtype))
                if own and baseline:
                    text = (f"{workload} {dtype}, {name}: speed-up over {baseline_name} "
                            f"{baseline / own:.2f}x")
                    text += "".join(f", over {label} {peer / own:.2f}x"
                                    for label, peer in peers if peer)
                    lines.append(text)
    gradients = (("gradient", CHAPTER_NET), ("gradient-deep", DEEP_GRADIENT_NET))
    for workload, net in gradients:
        sizes = net.layer_sizes
        described = "-".join(map(str, sizes)) + ("" if net.smooth else f" {net.activation}")
        naive = found.get((workload, sizes, BOOK, "naive", "float64"))
        numpy_fast = found.get((workload, sizes, "numpy", "fast", "float64"))
        for name in known_backends():
            fast = found.get((workload, sizes, name, "fast", "float64"))
            if fast and naive:
                line = (
                    f"numerical gradient {described}, {name} fast: speed-up over the book's naive "
                    f"loop* {naive / fast:,.0f}x"
                )
                if numpy_fast and name != "numpy":
                    line += f", over numpy fast {numpy_fast / fast:.1f}x"
                lines.append(line)
    return lines


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain JSON data (schema ``fastgrad-bench/2``).

    Top level: ``schema``, ``created`` (UTC, ISO 8601), ``wall_seconds``,
    ``config`` (the :class:`BenchConfig`), ``machine`` (CPU, cores, GPUs,
    package versions, each backend's ``describe()``), ``dataset``,
    ``compile_seconds`` (backend -> dtype -> warm-up seconds), ``skipped``
    (name -> reason) and ``results``: one object per timed case with
    ``workload``, ``implementation``, ``method``, ``dtype``, ``hidden_size``
    (the first hidden layer's width), ``layer_sizes``, ``activation``,
    ``hidden_layers``, ``batch_size``, ``num_params``, ``iterations``,
    ``rounds``, ``times_s``, ``median_s``, ``min_s``, ``max_s``,
    ``first_call_s``, ``sampled_params``,
    ``extrapolated``, ``error``, ``notes`` and the three ratios
    ``relative_to_numpy_backprop``, ``numerical_over_backprop`` and
    ``speedup_vs_book`` (null where they do not apply). Times of naive
    cases are already extrapolated to all parameters.
    """
    config = asdict(report.config)
    config["out"] = str(report.config.out)
    config["data"] = None if report.config.data is None else str(report.config.data)

    def clean(value: Any) -> Any:
        # JSON has no NaN; an unmeasured time is null.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return clean({
        "schema": SCHEMA,
        "created": report.created,
        "wall_seconds": report.wall_seconds,
        "config": config,
        "machine": report.machine,
        "dataset": report.dataset,
        "compile_seconds": report.compile_seconds,
        "skipped": report.skipped,
        "results": report.results,
    })


def write_scaling_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Time per gradient against network size, log-log; False when matplotlib is missing.

    Left, against the parameters of the one-hidden-layer nets (the chapter's
    TwoLayerNet at every width): one line per implementation x method, and
    the dashed line of the naive method's cost model, 2·P forward passes,
    from each size's measured NumPy forward loss. Right, when deeper nets
    were measured: the same against the number of hidden layers, at the
    widest width measured at every depth.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    scaling = [row for row in rows if row["workload"] == "scaling" and row["times_s"]
               and not row["error"]]
    depths = sorted({row["hidden_layers"] for row in scaling})
    figure = Figure(figsize=(13.0 if len(depths) > 1 else 7.5, 5.0), layout="constrained")
    width_axes, *depth_axes = figure.subplots(1, 2 if len(depths) > 1 else 1, squeeze=False)[0]
    # Colour says which backend, the line style which method.
    implementations = sorted({row["implementation"] for row in scaling})
    colours = {name: f"C{index}" for index, name in enumerate(implementations)}
    _draw_scaling(
        width_axes, [row for row in scaling if row["hidden_layers"] == 1], colours,
        lambda row: row["num_params"],
    )
    width_axes.set_xscale("log")
    width_axes.set_xlabel("parameters P of TwoLayerNet(784, H, 10)")
    if depth_axes:
        figure.suptitle(title or "gradient cost against network size")
        width_axes.set_title("against width, one hidden layer")
    else:
        width_axes.set_title(title or "gradient cost against network size")
    if depth_axes:
        axes = depth_axes[0]
        widths_at = [{row["hidden_size"] for row in scaling if row["hidden_layers"] == depth}
                     for depth in depths]
        common = set.intersection(*widths_at)
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
    axes: Any, rows: Sequence[dict[str, Any]], colours: dict[str, str],
    x_of: Callable[[dict[str, Any]], float], legend: bool = True,
) -> None:
    """One line per implementation x method of ``rows`` at ``x_of(row)``, and the cost model."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row["method"] != "forward":
            series.setdefault((row["implementation"], row["method"]), []).append(
                (x_of(row), row["median_s"])
            )
    styles = {"backprop": "o-", "fast": "s--", "naive": "^:"}
    for (implementation, method), points in sorted(series.items()):
        points.sort()
        label = f"{implementation} {method}" + (" (extrapolated)" if method == "naive" else "")
        axes.plot(
            *zip(*points, strict=True), styles.get(method, "o-"), color=colours[implementation],
            label=label,
        )
    model = sorted(
        (x_of(row), 2 * row["num_params"] * row["median_s"])
        for row in rows if row["method"] == "forward" and row["implementation"] == "numpy"
    )
    if model:
        axes.plot(
            *zip(*model, strict=True), "k-", linewidth=3, alpha=0.25,
            label="cost model: 2·P forward passes (numpy)",
        )
    axes.set_yscale("log")
    axes.set_ylabel("seconds per gradient (batch 100, float64)")
    axes.grid(True, which="both", alpha=0.3)
    if legend and (series or model):
        axes.legend(fontsize="small")


# --------------------------------------------------------------------- entry point
def run_bench(args: argparse.Namespace) -> int:
    """``fastgrad bench``: run, print the report, write ``bench.json`` and ``scaling.png``.

    Returns the exit status: 0 when every timed value passed its check, 1 when
    a check failed, 2 for unusable arguments (nothing is timed then).
    """
    try:
        config = config_from_args(args)
        report = run_suite(config)
    except ValueError as error:
        print(f"fastgrad bench: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {json_path}")
    if config.plot and "scaling" in config.workloads:
        plot_path = out / "scaling.png"
        title = f"{report.machine['cpu']} - {report.created[:10]}"
        if write_scaling_plot(report.results, plot_path, title):
            print(f"wrote {plot_path}")
        else:
            print("matplotlib is not installed: no scaling plot (pip install 'fastgrad[plot]')")
    if report.failures:
        print(f"{len(report.failures)} benchmark check(s) FAILED", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastgrad.benchmarks [options]``: the same as ``fastgrad bench``."""
    parser = argparse.ArgumentParser(
        prog="fastgrad bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
