"""The benchmark workloads, shared by ``fastgrad bench`` and the pytest-benchmark suite.

A :class:`Case` is one thing to time: an untimed ``setup`` (fresh parameters,
so every round starts from the same state), a timed ``run`` that returns the
value it computed and has already waited for the device, and a ``check`` that
raises :class:`AssertionError` when that value is wrong. Building a case does
all data movement up front, so a round times only the work itself.

Implementations are the fastgrad backends (``numpy``, ``numba``, ``cupy``),
driven through the model API (``MultiLayerNet``/``TwoLayerNet``:
``sgd_steps``, ``prepared_gradient``, ``numerical_gradient_float64``,
``prepared_loss``), the book's own code (``book``, see
:mod:`fastgrad._book_reference`: chapter 4's TwoLayerNet for the chapter's
net, chapter 6's MultiLayerNet for the others), and the peers (``torch-cpu``,
``torch-cuda``, ``jax``), whose cases :mod:`fastgrad.benchmarks.peers` builds;
that module is imported only when a peer is asked for. Parameter names come
from the models; this module never spells one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastgrad._book_reference import BookMultiLayerNet, BookTwoLayerNet, book_train
from fastgrad._book_reference import numerical_gradient as book_numerical_gradient
from fastgrad.backends import Backend, get_backend
from fastgrad.data import load_mnist, read_idx
from fastgrad.models import MultiLayerNet, TwoLayerNet

__all__ = [
    "BOOK",
    "CHAPTER_NET",
    "DEEP_GRADIENT_NET",
    "DEEP_TRAIN_NET",
    "INPUT_SIZE",
    "OUTPUT_SIZE",
    "PEERS",
    "Case",
    "Dataset",
    "HostParams",
    "NetSpec",
    "WorkloadFactory",
    "embedded_mnist",
    "net_label",
    "read_mnist",
    "scaling_net",
    "synthetic_mnist",
]

INPUT_SIZE = 784
OUTPUT_SIZE = 10
LEARNING_RATE = 0.1
H = 1e-4  # the book's difference step

BOOK = "book"
PEERS = ("torch-cpu", "torch-cuda", "jax")

# Tolerances of the checks, float64 throughout. The exact-loss numerical
# gradient of a smooth net agrees with backprop to ~1e-10 (PERF-NOTES); 1e-7
# leaves room for the largest nets without letting a wrong kernel through
# (gradient entries are ~1e-3). The book's loss carries a +1e-7 inside its
# log that its backprop ignores, which moves its numerical gradient by up to
# ~1e-7. A ReLU net's central differences are not its backprop gradient
# where a step of h moves a unit across zero (differences of ~1e-4 in a few
# hundred entries of 784-100-100-10), so its numerical gradients are checked
# against each other: the fast kernels and the naive loop compute the same
# differences and agree to ~5e-12.
EXACT_GRADIENT_ATOL = 1e-7
BOOK_NUMERICAL_ATOL = 1e-6
NUMERICAL_AGREEMENT_ATOL = 1e-9
BACKPROP_ATOL = {"float64": 1e-9, "float32": 1e-4}


def require(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O``: benchmark checks must always run."""
    if not condition:
        raise AssertionError(message)


# ------------------------------------------------------------------------ networks
@dataclass(frozen=True)
class NetSpec:
    """A benchmarked network: ``MultiLayerNet(784, hidden, 10, activation, weight_init)``.

    One sigmoid hidden layer with a numeric init is the chapter's
    :class:`~fastgrad.TwoLayerNet` (and the book's chapter-4 code); anything
    else is a :class:`~fastgrad.MultiLayerNet` (and the book's chapter 6).
    """

    hidden: tuple[int, ...]
    activation: str = "sigmoid"
    weight_init: float | str = 0.01

    @classmethod
    def chapter(cls, hidden_size: int = 50) -> NetSpec:
        """The chapter's TwoLayerNet(784, hidden_size, 10), std 0.01."""
        return cls((hidden_size,))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (INPUT_SIZE, *self.hidden, OUTPUT_SIZE)

    @property
    def num_params(self) -> int:
        """39,760 for the chapter's 784-50-10."""
        return sum(fan_in * fan_out + fan_out for fan_in, fan_out in self._layers())

    @property
    def hidden_layers(self) -> int:
        return len(self.hidden)

    @property
    def two_layer(self) -> bool:
        """True for the chapter's TwoLayerNet family."""
        return (
            len(self.hidden) == 1
            and self.activation == "sigmoid"
            and not isinstance(self.weight_init, str)
        )

    @property
    def smooth(self) -> bool:
        """Whether central differences match backprop to ~1e-10 (no ReLU kinks)."""
        return self.activation != "relu"

    def _layers(self) -> list[tuple[int, int]]:
        return list(itertools.pairwise(self.layer_sizes))

    def build(self, backend: Any, dtype: Any, seed: int) -> MultiLayerNet:
        """The fastgrad model; the same seed gives the same weights on every backend."""
        if self.two_layer:
            return TwoLayerNet(
                INPUT_SIZE,
                self.hidden[0],
                OUTPUT_SIZE,
                float(self.weight_init),
                dtype=dtype,
                seed=seed,
                backend=backend,
            )
        return MultiLayerNet(
            INPUT_SIZE,
            list(self.hidden),
            OUTPUT_SIZE,
            self.activation,
            self.weight_init,
            dtype=dtype,
            seed=seed,
            backend=backend,
        )

    def book_net(self, params: HostParams) -> BookTwoLayerNet | BookMultiLayerNet:
        """The book's network holding copies of ``params``."""
        dtype = params.arrays[0].dtype
        book: BookTwoLayerNet | BookMultiLayerNet
        if self.two_layer:
            book = BookTwoLayerNet(INPUT_SIZE, self.hidden[0], OUTPUT_SIZE, dtype=dtype)
        else:
            book = BookMultiLayerNet(
                INPUT_SIZE, list(self.hidden), OUTPUT_SIZE, self.activation, dtype=dtype
            )
        # In place: chapter 6's layers hold the arrays of params.
        for name, value in params.items():
            book.params[name][...] = value
        return book


CHAPTER_NET = NetSpec.chapter(50)
"""Workloads A and B: the chapter's TwoLayerNet(784, 50, 10)."""
DEEP_TRAIN_NET = NetSpec((100, 100, 100), "relu", "relu")
"""Workload C: MultiLayerNet(784, [100, 100, 100], 10, "relu"), He init."""
DEEP_GRADIENT_NET = NetSpec((100, 100), "relu", "relu")
"""The deep numerical gradient: MultiLayerNet(784, [100, 100], 10, "relu"), He init."""


def scaling_net(width: int, hidden_layers: int) -> NetSpec:
    """The scaling curve's net: the chapter's at one hidden layer, else ReLU layers (He init)."""
    if hidden_layers == 1:
        return NetSpec.chapter(width)
    return NetSpec((width,) * hidden_layers, "relu", "relu")


def net_label(workload: str, hidden: Sequence[int], activation: str) -> str:
    """`` h=5`` or `` h=100,100 relu``; nothing for the chapter's net outside the scaling curve."""
    if workload != "scaling" and list(hidden) == [50] and activation == "sigmoid":
        return ""
    widths = ",".join(str(width) for width in hidden)
    if len(hidden) == 1 and activation == "sigmoid":
        return f" h={widths}"
    return f" h={widths} {activation}"


@dataclass(frozen=True)
class HostParams:
    """A model's parameters as host arrays: its names, in ``Network.arrays`` order."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, model: MultiLayerNet) -> HostParams:
        network = model.network()
        # network().arrays are the model's own arrays in the documented order
        # W1, b1, ..., WL, bL (the peers read that tuple as (W, b) pairs); the
        # names are the model's, in the same order.
        require(
            all(a is b for a, b in zip(model.params.values(), network.arrays, strict=True)),
            "params and network().arrays are not in the same order",
        )
        arrays = tuple(model.backend.to_numpy(array).copy() for array in network.arrays)
        return cls(tuple(model.params), arrays)

    def items(self) -> Iterable[tuple[str, np.ndarray]]:
        return zip(self.names, self.arrays, strict=True)

    def named(self, values: Sequence[Any]) -> dict[str, Any]:
        """``values`` (one per parameter, in order) keyed by the parameters' names."""
        return dict(zip(self.names, values, strict=True))


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Dataset:
    """Training images as uint8 rows (N, 784) with their labels, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def inputs(self, dtype: Any) -> np.ndarray:
        """Pixels scaled to [0, 1], as the book's ``load_mnist(normalize=True)``."""
        return self.images.astype(dtype) / np.asarray(255.0, dtype=dtype)


def synthetic_mnist(num_samples: int = 10_000, seed: int = 0) -> Dataset:
    """MNIST-like data: uint8 pixels, ~81 % of them zero, and learnable labels.

    Every class has its own map of "ink" probabilities, so the net can learn
    something and a training run's loss falls as on MNIST; the zero fraction
    matches MNIST's because the sparse kernels' speed depends on it.
    """
    rng = np.random.default_rng(seed)
    # Cubing uniform draws gives a few likely pixels and many unlikely ones per
    # class; the scale puts the mean ink probability at 19 %.
    ink = rng.random((OUTPUT_SIZE, INPUT_SIZE)) ** 3
    ink *= 0.19 / ink.mean()
    np.clip(ink, 0.0, 1.0, out=ink)
    labels = rng.integers(0, OUTPUT_SIZE, num_samples)
    on = rng.random((num_samples, INPUT_SIZE)) < ink[labels]
    values = rng.integers(1, 256, (num_samples, INPUT_SIZE), dtype=np.uint8)
    images = np.where(on, values, np.uint8(0)).astype(np.uint8)
    return Dataset(images, labels.astype(np.int64), f"synthetic MNIST-like (seed {seed})")


def read_mnist(directory: str | Path, kind: str = "train") -> Dataset:
    """MNIST's ``train`` or ``t10k`` split from a folder of the four ``.gz`` IDX files."""
    folder = Path(directory)
    images = read_idx(folder / f"{kind}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{kind}-labels-idx1-ubyte.gz")
    return Dataset(
        images.reshape(images.shape[0], -1), labels.astype(np.int64), f"MNIST {kind} ({folder})"
    )


def embedded_mnist(num_samples: int = 10_000) -> Dataset:
    """The first ``num_samples`` (at most 10,000) training images of the embedded subset.

    Real MNIST pixels, so the sparse kernels see MNIST's own pattern of zeros,
    and no download or folder is needed.
    """
    (images, labels), _ = load_mnist(normalize=False, subset="mini")
    return Dataset(
        images[:num_samples], labels[:num_samples].astype(np.int64), "MNIST (embedded subset)"
    )


# -------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One timed workload on one implementation (see the module docstring)."""

    workload: str  # "train", "train-deep", "train-step", "gradient", "gradient-deep", "scaling"
    implementation: str  # a backend name, "book", or a peer
    method: str  # "backprop", "fast", "naive", "forward"
    dtype: str
    net: NetSpec
    batch_size: int
    setup: Callable[[], Any]
    run: Callable[[Any], Any]
    check: Callable[[Any], None]
    iterations: int = 1
    # The reported time is the measured time times ``scale``: the naive loop
    # is timed on ``sampled_params`` of the parameters and extrapolated.
    scale: float = 1.0
    sampled_params: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return self.net.num_params

    @property
    def hidden_size(self) -> int:
        """The first hidden layer's width."""
        return self.net.hidden[0] if self.net.hidden else 0

    @property
    def extra_info(self) -> dict[str, Any]:
        """What both runners record in pytest-benchmark's ``extra_info`` for this case.

        The workload, implementation and net, and for a sampled naive gradient
        how many parameters it was timed on and the factor that scaled its time
        to all of them.
        """
        return {
            "workload": self.workload,
            "implementation": self.implementation,
            "method": self.method,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "layer_sizes": list(self.net.layer_sizes),
            "activation": self.net.activation,
            "hidden_layers": self.net.hidden_layers,
            "batch_size": self.batch_size,
            "num_params": self.num_params,
            "iterations": self.iterations,
            "extrapolated": self.sampled_params is not None,
            "sampled_params": self.sampled_params,
            "scale_to_full": self.scale,
            "notes": self.notes,
        }


def _stride_for(total: int, samples: int) -> int:
    return max(1, total // max(1, samples))


def _sampled_views(params: dict[str, Any], stride: int) -> dict[str, Any]:
    """Every ``stride``-th element of each parameter, as writable views into it."""
    return {name: array.reshape(-1)[::stride] for name, array in params.items()}


class WorkloadFactory:
    """Builds :class:`Case` objects over one dataset, caching what cases share.

    Parameters
    ----------
    dataset
        Training rows for the training runs; the first ``batch_size`` rows are
        the batch of the gradient workloads.
    seed
        Seeds the initial weights (the same on every implementation) and the
        mini-batch schedule (the same rows for every implementation).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, batch_size: int = 100) -> None:
        self.dataset = dataset
        self.seed = seed
        self.batch_size = batch_size
        self._inputs: dict[str, np.ndarray] = {}
        self._initial: dict[tuple[NetSpec, str], HostParams] = {}
        self._backprop: dict[NetSpec, dict[str, np.ndarray]] = {}
        self._numerical: dict[NetSpec, dict[str, np.ndarray]] = {}

    # -- shared pieces
    def inputs(self, dtype: str) -> np.ndarray:
        if dtype not in self._inputs:
            self._inputs[dtype] = self.dataset.inputs(np.dtype(dtype))
        return self._inputs[dtype]

    def initial_params(self, net: NetSpec, dtype: str = "float64") -> HostParams:
        """The seeded initial parameters of ``net`` (the model's own draws) on the host."""
        key = (net, dtype)
        if key not in self._initial:
            self._initial[key] = HostParams.of(net.build("numpy", dtype, self.seed))
        return self._initial[key]

    def batch_schedule(self, steps: int) -> np.ndarray:
        """``(steps, batch_size)`` row indices drawn with replacement, like the book's."""
        rng = np.random.default_rng(self.seed + 1)
        return rng.integers(0, self.dataset.images.shape[0], (steps, self.batch_size))

    def gradient_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The gradient workloads' batch: the first ``batch_size`` rows, float64."""
        return self.inputs("float64")[: self.batch_size], self.dataset.labels[: self.batch_size]

    def _reference_model(self, net: NetSpec) -> tuple[MultiLayerNet, Any, Any]:
        model = net.build("numpy", "float64", self.seed)
        X, labels = model.prepare(*self.gradient_batch())
        return model, X, labels

    def reference_gradient(self, net: NetSpec) -> dict[str, np.ndarray]:
        """Backprop on the NumPy backend: what backprop cases are checked against."""
        if net not in self._backprop:
            model, X, labels = self._reference_model(net)
            self._backprop[net] = model.prepared_gradient(X, labels)[1]
        return self._backprop[net]

    def reference_numerical(self, net: NetSpec) -> dict[str, np.ndarray]:
        """The NumPy backend's fast numerical gradient: what a ReLU net's are checked against."""
        if net not in self._numerical:
            model, X, labels = self._reference_model(net)
            self._numerical[net] = model.numerical_gradient_float64(X, labels, "fast", H)
        return self._numerical[net]

    # -- checks
    @staticmethod
    def check_losses(losses: Any, steps: int, ceiling: float = 3.0) -> None:
        values = np.asarray(losses, dtype=np.float64).reshape(-1)
        require(values.shape == (steps,), f"expected {steps} losses, got {values.shape}")
        require(bool(np.isfinite(values).all()), "a training loss is not finite")
        # Cross-entropy over 10 classes starts near ln 10 = 2.303 and must not blow up.
        require(float(values.max()) < ceiling, f"training diverged: max loss {values.max():.3f}")
        if steps >= 100:
            quarter = steps // 4
            first, last = values[:quarter].mean(), values[-quarter:].mean()
            require(last < first, f"loss did not fall: {first:.4f} -> {last:.4f}")

    def gradient_check(
        self,
        reference: dict[str, np.ndarray],
        to_host: Callable[[Any], np.ndarray],
        atol: float,
        stride: int = 1,
        against: str = "backprop",
    ) -> Callable[[Any], None]:
        """A check that every gradient (read by ``to_host``) is within ``atol`` of ``reference``.

        With ``stride``, only every ``stride``-th element (a sampled naive gradient).
        """

        def check(grads: Any) -> None:
            for name, value in reference.items():
                expected = value.reshape(-1)[::stride]
                got = to_host(grads[name]).reshape(-1).astype(np.float64)
                require(got.shape == expected.shape, f"{name}: shape {got.shape}")
                error = float(np.max(np.abs(got - expected)))
                require(
                    error <= atol,
                    f"{name}: max abs difference {error:.2e} from {against} > {atol:.0e}",
                )

        return check

    def _numerical_check(
        self,
        net: NetSpec,
        to_host: Callable[[Any], np.ndarray],
        stride: int = 1,
        book: bool = False,
    ) -> Callable[[Any], None]:
        """A numerical gradient's check: against backprop for smooth nets, else the NumPy kernel.

        The book's ``+1e-7`` guard moves its differences by up to ~1e-7.
        """
        if net.smooth:
            atol = BOOK_NUMERICAL_ATOL if book else EXACT_GRADIENT_ATOL
            return self.gradient_check(self.reference_gradient(net), to_host, atol, stride)
        return self.gradient_check(
            self.reference_numerical(net),
            to_host,
            BOOK_NUMERICAL_ATOL if book else NUMERICAL_AGREEMENT_ATOL,
            stride,
            against="the numpy fast numerical gradient",
        )

    # -- training runs: the chapter's (workload A) and the deep one (workload C)
    def train_case(
        self,
        implementation: str,
        dtype: str,
        steps: int,
        net: NetSpec = CHAPTER_NET,
        *,
        workload: str | None = None,
    ) -> Case:
        """``steps`` SGD iterations of ``net`` at lr 0.1, no evaluations."""
        workload = workload or ("train" if net == CHAPTER_NET else "train-deep")
        schedule = self.batch_schedule(steps)
        X_host = self.inputs(dtype)
        labels_host = self.dataset.labels
        init = self.initial_params(net, dtype)
        # A ReLU net is not bounded by the sigmoid net's 3.0 (a spike is not a
        # divergence); 10 still catches one.
        ceiling = 3.0 if net.smooth else 10.0

        def check(losses: Any) -> None:
            self.check_losses(losses, steps, ceiling)

        if implementation == BOOK:
            onehot = np.eye(OUTPUT_SIZE, dtype=dtype)[labels_host]

            def book_run(book: Any) -> list[float]:
                return book_train(
                    book,
                    X_host,
                    onehot,
                    steps,
                    self.batch_size,
                    LEARNING_RATE,
                    batch_masks=schedule,
                ).train_loss_list

            return Case(
                workload,
                BOOK,
                "backprop",
                dtype,
                net,
                self.batch_size,
                lambda: net.book_net(init),
                book_run,
                check,
                iterations=steps,
            )
        if implementation in PEERS:
            from fastgrad.benchmarks import peers

            return peers.train_case(self, implementation, dtype, steps, net, workload, ceiling)

        backend = get_backend(implementation)
        X, labels = net.build(backend, dtype, self.seed).prepare(
            backend.asarray(X_host), backend.asarray(labels_host)
        )
        batch_indices = backend.asarray(schedule)

        def setup() -> MultiLayerNet:
            return net.build(backend, dtype, self.seed)

        def run(model: MultiLayerNet) -> Any:
            losses = model.sgd_steps(X, labels, batch_indices, LEARNING_RATE, "backprop")
            backend.synchronize()
            return losses

        return Case(
            workload,
            implementation,
            "backprop",
            dtype,
            net,
            self.batch_size,
            setup,
            run,
            lambda losses: check(backend.to_numpy(losses)),
            iterations=steps,
        )

    def train_step_case(self, implementation: str, dtype: str, net: NetSpec = CHAPTER_NET) -> Case:
        """One SGD step on a fixed batch (``sgd_steps`` of one step; the book's three lines)."""
        X_host, labels_host = self.gradient_batch()
        X_host = X_host.astype(dtype)
        init = self.initial_params(net, dtype)

        def check(loss: Any) -> None:
            value = float(np.asarray(loss).reshape(-1)[0])
            require(np.isfinite(value) and 0.0 < value < 3.0, f"one-step loss {value}")

        if implementation == BOOK:
            onehot = np.eye(OUTPUT_SIZE, dtype=dtype)[labels_host]

            def book_run(book: Any) -> float:
                grad = book.gradient(X_host, onehot)
                for key in book.params:
                    book.params[key] -= LEARNING_RATE * grad[key]
                return book.loss(X_host, onehot)

            return Case(
                "train-step",
                BOOK,
                "backprop",
                dtype,
                net,
                self.batch_size,
                lambda: net.book_net(init),
                book_run,
                check,
            )

        backend = get_backend(implementation)
        X, labels = net.build(backend, dtype, self.seed).prepare(
            backend.asarray(X_host), backend.asarray(labels_host)
        )
        whole_batch = backend.asarray(np.arange(X_host.shape[0])[None, :])

        def setup() -> MultiLayerNet:
            return net.build(backend, dtype, self.seed)

        def run(model: MultiLayerNet) -> Any:
            loss = model.sgd_steps(X, labels, whole_batch, LEARNING_RATE, "backprop")
            backend.synchronize()
            return loss

        return Case(
            "train-step",
            implementation,
            "backprop",
            dtype,
            net,
            self.batch_size,
            setup,
            run,
            lambda loss: check(backend.to_numpy(loss)),
        )

    # -- one gradient of the whole net (workload B, the deep gradient, the scaling curve)
    def gradient_case(
        self,
        implementation: str,
        method: str,
        net: NetSpec = CHAPTER_NET,
        *,
        workload: str | None = None,
        naive_samples: int = 400,
    ) -> Case:
        """One float64 gradient of ``net`` at batch ``batch_size`` by ``method``.

        ``"naive"`` runs the per-element loop (two full losses per parameter)
        on every ``s``-th element of each parameter, ``s = P // naive_samples``,
        and reports that time scaled by ``P / sampled``: each element costs the
        same two losses, so the extrapolation is exact up to timing noise.
        ``"forward"`` times one loss evaluation, the unit of the cost model
        ``naive ≈ 2·P·forward``. Numerical gradients of smooth nets are checked
        against backprop; those of ReLU nets against the NumPy backend's fast
        kernel (within 1e-9 for fastgrad's naive loop).
        """
        workload = workload or ("gradient" if net == CHAPTER_NET else "gradient-deep")
        X_host, labels_host = self.gradient_batch()
        init = self.initial_params(net)
        total = net.num_params
        stride = _stride_for(total, naive_samples)
        sampled = sum(len(range(0, array.size, stride)) for array in init.arrays)
        common: dict[str, Any] = {
            "workload": workload,
            "implementation": implementation,
            "method": method,
            "dtype": "float64",
            "net": net,
            "batch_size": self.batch_size,
        }
        if implementation == BOOK:
            return self._book_gradient_case(common, X_host, labels_host, init, stride, sampled)
        if implementation in PEERS:
            from fastgrad.benchmarks import peers

            return peers.gradient_case(self, implementation, method, net, workload)

        backend = get_backend(implementation)
        X, labels = net.build(backend, "float64", self.seed).prepare(
            backend.asarray(X_host), backend.asarray(labels_host)
        )

        def setup() -> MultiLayerNet:
            return net.build(backend, "float64", self.seed)

        common["setup"] = setup
        if method == "backprop":

            def run_backprop(model: MultiLayerNet) -> dict[str, Any]:
                grads = model.prepared_gradient(X, labels)[1]
                backend.synchronize()
                return grads

            check = self.gradient_check(
                self.reference_gradient(net), backend.to_numpy, BACKPROP_ATOL["float64"]
            )
            return Case(run=run_backprop, check=check, **common)
        if method == "fast":

            def run_fast(model: MultiLayerNet) -> dict[str, Any]:
                grads = model.numerical_gradient_float64(X, labels, "fast", H)
                backend.synchronize()
                return grads

            check = self._numerical_check(net, backend.to_numpy)
            return Case(run=run_fast, check=check, **common)
        if method == "naive":

            def run_naive(model: MultiLayerNet) -> dict[str, Any]:
                def loss(_: Any) -> Any:
                    return model.prepared_loss(X, labels)

                # The base class's loop, as MultiLayerNet.numerical_gradient(method="naive")
                # runs it, on strided views so that only the sample is perturbed.
                views = _sampled_views(model.params, stride)
                grads = {
                    name: Backend.numerical_gradient(backend, loss, view, H, "central")
                    for name, view in views.items()
                }
                backend.synchronize()
                return grads

            check = self._numerical_check(net, backend.to_numpy, stride)
            return Case(
                run=run_naive,
                check=check,
                scale=total / sampled,
                sampled_params=sampled,
                **common,
            )
        if method == "forward":
            reference, X64, labels64 = self._reference_model(net)
            expected = float(reference.prepared_loss(X64, labels64))

            def run_forward(model: MultiLayerNet) -> Any:
                value = model.prepared_loss(X, labels)
                backend.synchronize()
                return value

            def check_forward(value: Any) -> None:
                got = float(backend.to_numpy(value))
                require(abs(got - expected) <= 1e-9, f"loss {got} != reference {expected}")

            return Case(run=run_forward, check=check_forward, **common)
        raise ValueError(f"unknown gradient method {method!r}")

    def _book_gradient_case(
        self,
        common: dict[str, Any],
        X: np.ndarray,
        labels: np.ndarray,
        init: HostParams,
        stride: int,
        sampled: int,
    ) -> Case:
        net: NetSpec = common["net"]
        onehot = np.eye(OUTPUT_SIZE)[labels]
        common["setup"] = lambda: net.book_net(init)
        method = common["method"]
        if method == "backprop":
            check = self.gradient_check(
                self.reference_gradient(net), np.asarray, BACKPROP_ATOL["float64"]
            )
            return Case(run=lambda book: book.gradient(X, onehot), check=check, **common)
        if method == "naive":

            def run_naive(book: Any) -> dict[str, np.ndarray]:
                def loss_W(W: np.ndarray) -> float:
                    return book.loss(X, onehot)

                views = _sampled_views(book.params, stride)
                return {name: book_numerical_gradient(loss_W, view) for name, view in views.items()}

            check = self._numerical_check(net, np.asarray, stride, book=True)
            return Case(
                run=run_naive,
                check=check,
                scale=net.num_params / sampled,
                sampled_params=sampled,
                **common,
            )
        raise ValueError(f"the book has no {method!r} gradient")
