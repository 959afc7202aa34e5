"""The ``fastgrad`` command: ``train``, ``info`` and ``bench``.

A user's mistake (a bad flag, an unknown or unavailable backend, missing data)
ends in one line on stderr and a non-zero exit, never a traceback; anything
else is a bug and keeps its traceback. Heavy modules (matplotlib, the benchmarks)
are imported only by the subcommand that needs them, tqdm only by a run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, NoReturn

import numpy as np

from fastgrad import __version__
from fastgrad._runs import LOCK_NAME, RunFolderBusyError
from fastgrad.backends._base import ACTIVATIONS
from fastgrad.errors import BackendUnavailableError

if TYPE_CHECKING:
    from fastgrad.models import MultiLayerNet

__all__ = ["main"]

_EMBEDDED_SUBSET = "the embedded subset (10,000 train / 2,000 test images)"


# ------------------------------------------------------------------ parsing
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _hidden_sizes(text: str) -> list[int]:
    sizes = []
    for item in text.split(","):
        try:
            size = int(item)
        except ValueError:
            size = 0
        if size < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive widths such as 100,100, got {text!r}"
            )
        sizes.append(size)
    return sizes


def _weight_decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


_INIT_RULES = ("relu", "he", "sigmoid", "xavier")


def _weight_init(text: str) -> float | str:
    if text.lower() in _INIT_RULES:
        return text.lower()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected a positive standard deviation or one of {', '.join(_INIT_RULES)}, "
            f"got {text!r}"
        )
    return value


def _build_parser(bench: ModuleType | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgrad", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"fastgrad {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{train,info,bench}")

    train = commands.add_parser(
        "train",
        help="train the chapter's TwoLayerNet, or any MultiLayerNet, on MNIST",
        description="Train a network by mini-batch SGD as in the chapter; the defaults "
        "reproduce the book's run (TwoLayerNet 784-50-10, sigmoid). --hidden, --activation "
        "and --weight-decay describe any other MultiLayerNet (one sigmoid hidden layer "
        "without weight decay is a TwoLayerNet). Writes history.json, params.npz and "
        "training.png.",
    )
    train.add_argument(
        "--backend",
        default=None,
        help="numpy, numba, cupy, or auto: the fastest that can run here (cupy with a usable "
        "CUDA device, else numba when installed, else numpy); default: $FASTGRAD_BACKEND "
        "when set, else auto",
    )
    train.add_argument(
        "--grad",
        default="backprop",
        choices=("backprop", "numerical", "numerical-naive"),
        help="how gradients are computed (default: backprop)",
    )
    train.add_argument("--iters", type=_positive_int, default=10_000, help="default: 10000")
    train.add_argument("--batch-size", type=_positive_int, default=100, help="default: 100")
    train.add_argument("--lr", type=_learning_rate, default=0.1, help="default: 0.1")
    train.add_argument(
        "--hidden",
        type=_hidden_sizes,
        default=None,
        metavar="WIDTHS",
        help="widths of the hidden layers, comma-separated, e.g. 100,100,100 "
        "(default: the chapter's 50)",
    )
    train.add_argument(
        "--activation",
        default=None,
        choices=ACTIVATIONS,
        help="of the hidden layers (default: sigmoid, the chapter's)",
    )
    train.add_argument(
        "--weight-decay",
        type=_weight_decay,
        default=0.0,
        metavar="LAMBDA",
        help="L2 penalty 0.5·λ·sum(W²) over the weights (default: 0)",
    )
    train.add_argument(
        "--weight-init",
        type=_weight_init,
        default=None,
        metavar="STD",
        help="standard deviation of the initial weights, or relu/he (sqrt(2/fan_in)) or "
        "sigmoid/xavier (sqrt(1/fan_in)); default: 0.01 for one sigmoid hidden layer (the "
        "chapter's), He for relu nets, Xavier for the others, as the book",
    )
    train.add_argument(
        "--dataset",
        default="mnist",
        choices=("mnist", "mini"),
        help="full MNIST, or the embedded 10,000/2,000-image subset",
    )
    train.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four MNIST files (default: $FASTGRAD_DATA_DIR, "
        "then the cache, then a download)",
    )
    train.add_argument(
        "--sampling",
        default="choice",
        choices=("choice", "shuffle"),
        help="batches drawn with replacement (book) or shuffled epochs",
    )
    train.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seeds the weights and the batches (default: random, recorded)",
    )
    train.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32"),
        help="parameter and data precision (default: float64)",
    )
    train.add_argument(
        "--out",
        default=None,
        help="output folder (default: a new ./runs/<UTC timestamp>, with -2, -3, ... appended "
        "when another run took that name). A run locks its folder while it writes it (the "
        f"file {LOCK_NAME}, removed at the end); a run asking for a folder that another live "
        "run holds is refused. The lock of a run that was killed is taken over",
    )
    train.set_defaults(handler=_run_train)

    info = commands.add_parser("info", help="versions, backends, devices and BLAS threads")
    info.set_defaults(handler=_run_info)

    bench_parser = commands.add_parser("bench", help="benchmark the kernels on each backend")
    if bench is not None:
        bench.add_bench_arguments(bench_parser)
        bench_parser.set_defaults(handler=bench.run_bench)
    return parser


# --------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastgrad`` command; returns the exit status.

    Examples
    --------
    >>> from fastgrad.cli import main
    >>> main(["--version"])  # doctest: +SKIP
    fastgrad 0.1.0
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    bench = None
    if arguments[:1] == ["bench"]:
        bench = _import_benchmarks()
        if bench is None:
            return 2
    parser = _build_parser(bench)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_request:  # --help, --version and usage errors
        return exit_request.code if isinstance(exit_request.code, int) else 1
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.handler(args))
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except Exception as error:
            message = _user_error_message(error)
            if message is None:
                raise
            _error(message)
            return 1


def _import_benchmarks() -> ModuleType | None:
    # Imported only for `fastgrad bench`: the runner is built on pytest-benchmark.
    try:
        return importlib.import_module("fastgrad.benchmarks.runner")
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.startswith("fastgrad.benchmarks"):
            _error("bench is not available yet: this installation has no fastgrad.benchmarks")
        elif (error.name or "").split(".")[0] == "pytest_benchmark":
            _error(
                "bench needs pytest-benchmark, which is not installed "
                "(pip install 'fastgrad[bench]')"
            )
        else:
            _error(f"bench needs {error.name}, which is not installed ({error})")
        return None


def _user_error_message(error: Exception) -> str | None:
    """One line for the errors a user causes and can fix; None for bugs."""
    from fastgrad.data import MNISTError
    from fastgrad.train import TrainingDivergedError

    if isinstance(
        error, (BackendUnavailableError, MNISTError, RunFolderBusyError, TrainingDivergedError)
    ):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return None


def _error(message: str) -> None:
    print(f"fastgrad: error: {message}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    print(f"fastgrad: warning: {message}", file=sys.stderr)


# -------------------------------------------------------------------- train
def _run_train(args: argparse.Namespace) -> int:
    from fastgrad._runs import locked_run_folder

    backend, chosen_by = _choose_backend(args.backend)
    # Taken before the data is read, so a folder another run holds is refused at once.
    with locked_run_folder(Path(args.out) if args.out else None) as out:
        return _train_into(args, backend, chosen_by, out)


def _train_into(args: argparse.Namespace, backend: Any, chosen_by: str, out: Path) -> int:
    from fastgrad.checkpoint import save_params
    from fastgrad.train import TrainingDivergedError, TrainingHistory, train

    dtype = np.dtype(args.dtype)
    data, dataset = _load_data(args.dataset, args.data_dir, dtype)
    # An unseeded run still records its seed, so any run can be repeated.
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(2**32))
    (x_train, _), (x_test, _) = data
    net, weight_init = _build_net(args, x_train.shape[1], dtype, seed, backend)
    print(
        f"training {type(net).__name__} {'-'.join(map(str, net.layer_sizes))} "
        f"({net.activation} hidden layers, weight init {_describe_init(weight_init)}, "
        f"weight decay {net.weight_decay_lambda:g}; {net.num_params:,} {dtype.name} parameters) "
        f"on {backend.name}{chosen_by} with {dataset}: {len(x_train):,} train / "
        f"{len(x_test):,} test images, {args.iters} iterations of batch {args.batch_size}, "
        f"lr {args.lr}, {args.grad} gradients, seed {seed}; writing to {out}",
        flush=True,
    )
    progress = _Progress(args.iters)
    evaluations = _evaluation_count(args.iters, len(x_train), args.batch_size)
    table = _EpochTable(progress.write, evaluations, args.iters)

    def on_progress(history: TrainingHistory) -> None:
        progress.update(history)
        table.update(history)

    try:
        history = train(
            net,
            data,
            iters=args.iters,
            batch_size=args.batch_size,
            lr=args.lr,
            gradient=args.grad,
            sampling=args.sampling,
            seed=seed,
            callback=on_progress,
        )
    except TrainingDivergedError as error:
        progress.close()
        table.finish(error.history)
        # The losses up to the divergence say what went wrong; the parameters
        # are useless, so neither they nor a figure are written.
        error.history.config.update(
            dataset=dataset,
            model=type(net).__name__,
            weight_init=weight_init,
            weight_seed=seed,
            diverged=str(error),
        )
        path = error.history.save(out / "history.json")
        kept = len(error.history.losses)
        _error(
            f"{error}; wrote only {path} (the losses of the {kept} iteration"
            f"{'' if kept == 1 else 's'} before the divergence), no params.npz or training.png"
        )
        return 1
    finally:
        progress.close()
    table.finish(history)
    history.config.update(
        dataset=dataset, model=type(net).__name__, weight_init=weight_init, weight_seed=seed
    )
    # Each file is written whole or not at all (a temporary file, then a rename).
    written = [
        _write(out / "history.json", history.save),
        _write(out / "params.npz", lambda path: save_params(net, path)),
    ]
    figure = _write(out / "training.png", lambda path: _save_figure(history, path))
    if figure is not None:
        written.append(figure)
    final = history.final
    assert final is not None  # train() always evaluates the end of the run
    print(
        f"final: train acc {final.train_acc:.4f}, test acc {final.test_acc:.4f} after "
        f"{final.iteration} iterations; {history.wall_time:.1f} s in all, "
        f"{history.gradient_time:.1f} s in SGD steps ({history.steps_per_second:,.0f} it/s)"
    )
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0


# Fastest first: --backend auto takes the first that can run here.
_AUTO_ORDER = ("cupy", "numba", "numpy")
_AUTO_NOTE = " (auto: fastest available here)"


def _choose_backend(requested: str | None) -> tuple[Any, str]:
    """The backend to train on, and how it was chosen, for the run's header.

    ``auto`` (the CLI's default) is the CLI's own choice; the library's default
    selection (``get_backend(None)``: NumPy unless told otherwise) is unchanged.
    """
    from fastgrad.backends import ENV_VARIABLE, get_backend, unavailable_reason

    if requested is None:
        from_env = os.environ.get(ENV_VARIABLE, "").strip()
        if from_env and from_env != "auto":
            return get_backend(None), f" (from ${ENV_VARIABLE})"
        requested = "auto"
    if requested != "auto":
        return get_backend(requested), ""
    for name in _AUTO_ORDER:
        reason = unavailable_reason(name)
        if reason is None:
            return get_backend(name), _AUTO_NOTE
        # A backend that is installed but cannot start is worth a word: the user
        # may expect it. One that is not installed is simply not a candidate.
        if importlib.util.find_spec(name) is not None:
            print(f"fastgrad: note: --backend auto passes over {name}: {reason}", file=sys.stderr)
    raise AssertionError("the numpy backend is always available")


# The chapter's network, and its init: std 0.01, as the book's TwoLayerNet.
_CHAPTER_HIDDEN = [50]
_CHAPTER_ACTIVATION = "sigmoid"
_CHAPTER_INIT = 0.01


def _build_net(
    args: argparse.Namespace, input_size: int, dtype: np.dtype, seed: int, backend: Any
) -> tuple[MultiLayerNet, float | str]:
    """The net the flags describe, and its weight init: a TwoLayerNet for the chapter's.

    Without --hidden the hidden layers are sigmoid (the chapter's run); with
    it, relu, as the book's MultiLayerNet. The init follows the book: std
    0.01 for one sigmoid hidden layer (the chapter's shape, with or without
    weight decay), He for relu, Xavier for the other sigmoid, tanh and
    identity nets. Weight decay or a named init makes it a MultiLayerNet,
    since TwoLayerNet has neither.
    """
    from fastgrad.models import MultiLayerNet, TwoLayerNet

    hidden = _CHAPTER_HIDDEN if args.hidden is None else args.hidden
    activation = args.activation or _CHAPTER_ACTIVATION
    chapter_shape = len(hidden) == 1 and activation == _CHAPTER_ACTIVATION
    weight_init = args.weight_init
    if weight_init is None:
        default = "relu" if activation == "relu" else "xavier"
        weight_init = _CHAPTER_INIT if chapter_shape else default
    net: MultiLayerNet
    if chapter_shape and not args.weight_decay and not isinstance(weight_init, str):
        net = TwoLayerNet(
            input_size, hidden[0], 10, weight_init, dtype=dtype, seed=seed, backend=backend
        )
    else:
        net = MultiLayerNet(
            input_size,
            hidden,
            10,
            activation,
            weight_init,
            args.weight_decay,
            dtype=dtype,
            seed=seed,
            backend=backend,
        )
    return net, weight_init


def _describe_init(weight_init: float | str) -> str:
    if weight_init in ("relu", "he"):
        return "He (sqrt(2/fan_in))"
    if weight_init in ("sigmoid", "xavier"):
        return "Xavier (sqrt(1/fan_in))"
    return f"std {weight_init:g}"


def _load_data(dataset: str, data_dir: str | None, dtype: np.dtype) -> tuple[Any, str]:
    from fastgrad.data import ENV_DATA_DIR, MNISTUnavailableError, load_mnist

    if dataset == "mini":
        return load_mnist(subset="mini", dtype=dtype), "mnist-mini"
    # A folder the user named must be right; only the default search falls back.
    if data_dir is not None or os.environ.get(ENV_DATA_DIR, "").strip():
        return load_mnist(data_dir=data_dir, dtype=dtype), "mnist"
    try:
        return load_mnist(dtype=dtype), "mnist"
    except MNISTUnavailableError as error:
        print(
            f"fastgrad: full MNIST is unavailable ({error.brief}); using {_EMBEDDED_SUBSET}",
            file=sys.stderr,
        )
        return load_mnist(subset="mini", dtype=dtype), "mnist-mini"


def _write(path: Path, write: Callable[[Path], Path | None]) -> Path | None:
    """``write(path)``, with a failure to write (a full disk) naming ``path``.

    The writers remove their temporary file when they fail, so nothing partial
    is left; the OSError they raise often names only that temporary file, or
    nothing.
    """
    try:
        return write(path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def _save_figure(history: Any, path: Path) -> Path | None:
    try:
        from fastgrad.plot import plot_history

        plot_history(history, path)
    except ImportError:
        print(
            "fastgrad: matplotlib is not installed, so no figure was written "
            "(pip install 'fastgrad[plot]')",
            file=sys.stderr,
        )
        return None
    return path


def _evaluation_count(iters: int, train_size: int, batch_size: int) -> int:
    """How many evaluations train() makes: before training, after each epoch, at the end."""
    iters_per_epoch = max(train_size // batch_size, 1)
    return 1 + iters // iters_per_epoch + (1 if iters % iters_per_epoch else 0)


def _rows(evaluations: int, stride: int) -> int:
    """Rows of a table showing evaluations 0, stride, 2·stride, ... and the last."""
    last = evaluations - 1
    return last // stride + 1 + (1 if last % stride else 0)


class _EpochTable:
    """Prints the evaluations as rows as training goes: at most ``MAX_ROWS`` of them.

    A long run shows every k-th evaluation (k chosen from how many there will
    be), always the first and the last, and the last one held when a run
    diverges; history.json keeps them all.
    """

    MAX_ROWS = 25

    def __init__(self, write: Callable[[str], None], evaluations: int, iters: int) -> None:
        self._write = write
        self._iters = iters
        self._seen = 0
        self._last_shown = -1
        # Rows 0, k, 2k, ... and the last one: the smallest k that fits in MAX_ROWS.
        self.stride = next(k for k in itertools.count(1) if _rows(evaluations, k) <= self.MAX_ROWS)
        write(f"{'epoch':>7}  {'iteration':>9}  {'train acc':>9}  {'test acc':>8}  {'time':>7}")
        if self.stride > 1:
            write(
                f"(a row every {self.stride} evaluations, and the last; history.json holds "
                f"all {evaluations})"
            )

    def update(self, history: Any) -> None:
        for index in range(self._seen, len(history.epochs)):
            record = history.epochs[index]
            if index % self.stride == 0 or record.iteration == self._iters:
                self._show(index, history)
        self._seen = len(history.epochs)

    def finish(self, history: Any) -> None:
        """Show the last evaluation, if it was skipped (a run that diverged, or cut short)."""
        self.update(history)
        last = len(history.epochs) - 1
        if last > self._last_shown:
            self._show(last, history)

    def _show(self, index: int, history: Any) -> None:
        record = history.epochs[index]
        self._write(
            f"{record.epoch:7.2f}  {record.iteration:9d}  {record.train_acc:9.4f}  "
            f"{record.test_acc:8.4f}  {history.wall_time:6.1f}s"
        )
        self._last_shown = index


class _Progress:
    """tqdm's progress bar on stderr, shown only on a terminal.

    Logs and pipes get the table and no clutter.
    """

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._done = 0
        self._bar = tqdm(
            total=total,
            unit="it",
            desc="train",
            disable=not sys.stderr.isatty(),
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, history: Any) -> None:
        done = len(history.losses)
        if done == self._done or not history.losses:
            return
        self._bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
        self._bar.update(done - self._done)
        self._done = done

    def write(self, line: str) -> None:
        """Print ``line`` to stdout without tearing the progress bar."""
        self._bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------- info
def _run_info(args: argparse.Namespace) -> int:
    from fastgrad.backends import get_backend, known_backends, unavailable_reason
    from fastgrad.data import cache_dir, find_mnist_dir

    print(
        f"fastgrad {__version__} (Python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.system()} {platform.machine()})"
    )
    print(f"CPU: {os.cpu_count()} logical cores" + _thread_variables())
    print("backends:")
    for name in known_backends():
        reason = unavailable_reason(name)
        if reason is not None:
            print(f"  {name:<6} unavailable: {reason}")
            continue
        print(f"  {name:<6} available")
        for key, value in _describe(get_backend(name)).items():
            print(f"         {key}: {value}")
    found = find_mnist_dir()
    where = (
        f"found in {found}" if found else f"not found (load_mnist downloads it to {cache_dir()})"
    )
    print(f"MNIST: {where}; {_EMBEDDED_SUBSET} is always available")
    optional = [f"{package} {_version_of(package)}" for package in ("matplotlib", "threadpoolctl")]
    print(f"packages: tqdm {_version_of('tqdm')}; optional: {', '.join(optional)}")
    return 0


def _describe(backend: Any) -> dict[str, str]:
    # info is a diagnosis tool: a backend that cannot describe itself is a fact
    # worth printing, not a reason to stop.
    try:
        return dict(backend.describe())
    except Exception as error:
        return {"describe() failed": f"{type(error).__name__}: {error}"}


def _thread_variables() -> str:
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    found = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    return f" ({', '.join(found)})" if found else ""


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
