"""The benchmark workloads, shared by ``fastgrad bench`` and the pytest-benchmark suite.

A :class:`Case` is one thing to time: an untimed ``setup`` (fresh parameters,
so every round starts from the same state), a timed ``run`` that returns the
value it computed and has already waited for the device, and a ``check`` that
raises :class:`AssertionError` when that value is wrong. Building a case does
all data movement up front, so a round times only the work itself.

Implementations are the fastgrad backends (``numpy``, ``numba``, ``cupy``),
the book's own code (``book``, see :mod:`fastgrad._book_reference`) and the
peers (``torch-cpu``, ``torch-cuda``, ``jax``), which are imported only when
asked for and are never dependencies of fastgrad.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastgrad._book_reference import BookTwoLayerNet, book_train
from fastgrad._book_reference import numerical_gradient as book_numerical_gradient
from fastgrad.backends import Backend, get_backend
from fastgrad.backends._base import PARAM_NAMES, Params
from fastgrad.data import load_mnist, read_idx

__all__ = [
    "BOOK",
    "INPUT_SIZE",
    "OUTPUT_SIZE",
    "PEERS",
    "Case",
    "Dataset",
    "WorkloadFactory",
    "embedded_mnist",
    "find_mnist",
    "num_params",
    "peer_unavailable_reason",
    "read_mnist",
    "synthetic_mnist",
]

INPUT_SIZE = 784
OUTPUT_SIZE = 10
LEARNING_RATE = 0.1
H = 1e-4  # the book's difference step

BOOK = "book"
PEERS = ("torch-cpu", "torch-cuda", "jax")

# Tolerances of the checks, float64 throughout. The exact-loss numerical
# gradient agrees with backprop to ~1e-10 (PERF-NOTES); 1e-7 leaves room for
# the largest nets without letting a wrong kernel through (gradient entries
# are ~1e-3). The book's loss carries a +1e-7 inside its log that its
# backprop ignores, which moves its numerical gradient by up to ~1e-7.
EXACT_GRADIENT_ATOL = 1e-7
BOOK_NUMERICAL_ATOL = 1e-6
BACKPROP_ATOL = {"float64": 1e-9, "float32": 1e-4}


def num_params(hidden_size: int) -> int:
    """Parameters of TwoLayerNet(784, hidden_size, 10): 39,760 at hidden 50."""
    return INPUT_SIZE * hidden_size + hidden_size + hidden_size * OUTPUT_SIZE + OUTPUT_SIZE


def require(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O``: benchmark checks must always run."""
    if not condition:
        raise AssertionError(message)


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


def find_mnist(start: str | Path) -> Path | None:
    """``../shared/data/mnist`` next to the repository that holds ``start``, if it is there."""
    for folder in (Path(start).resolve(), *Path(start).resolve().parents):
        candidate = folder.parent / "shared" / "data" / "mnist"
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
        if (folder / ".git").exists() or (folder / "pyproject.toml").is_file():
            break
    return None


# -------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One timed workload on one implementation (see the module docstring)."""

    workload: str  # "train", "gradient", "scaling", "loss"
    implementation: str  # a backend name, "book", or a peer
    method: str  # "backprop", "fast", "naive", "forward"
    dtype: str
    hidden_size: int
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
        return num_params(self.hidden_size)

    @property
    def label(self) -> str:
        size = "" if self.hidden_size == 50 else f" h={self.hidden_size}"
        return f"{self.workload}{size} {self.implementation} {self.method} {self.dtype}"


def _stride_for(total: int, samples: int) -> int:
    return max(1, total // max(1, samples))


def _sampled_views(params: Params, stride: int) -> dict[str, Any]:
    """Every ``stride``-th element of each parameter, as writable views into it."""
    return {name: params[name].reshape(-1)[::stride] for name in PARAM_NAMES}


class WorkloadFactory:
    """Builds :class:`Case` objects over one dataset, caching what cases share.

    Parameters
    ----------
    dataset
        Training rows for the training run; the first ``batch_size`` rows are
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
        self._reference: dict[int, tuple[Params, np.ndarray, np.ndarray]] = {}

    # -- shared pieces
    def inputs(self, dtype: str) -> np.ndarray:
        if dtype not in self._inputs:
            self._inputs[dtype] = self.dataset.inputs(np.dtype(dtype))
        return self._inputs[dtype]

    def initial_params(self, hidden_size: int, dtype: str = "float64") -> dict[str, np.ndarray]:
        """The seeded initial weights as host arrays (std 0.01, zero biases)."""
        rng = np.random.default_rng(self.seed)
        init = {
            "W1": 0.01 * rng.standard_normal((INPUT_SIZE, hidden_size)),
            "b1": np.zeros(hidden_size),
            "W2": 0.01 * rng.standard_normal((hidden_size, OUTPUT_SIZE)),
            "b2": np.zeros(OUTPUT_SIZE),
        }
        return {name: value.astype(dtype) for name, value in init.items()}

    def batch_schedule(self, steps: int) -> np.ndarray:
        """``(steps, batch_size)`` row indices drawn with replacement, like the book's."""
        rng = np.random.default_rng(self.seed + 1)
        return rng.integers(0, self.dataset.images.shape[0], (steps, self.batch_size))

    def gradient_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The gradient workloads' batch: the first ``batch_size`` rows, float64."""
        return self.inputs("float64")[: self.batch_size], self.dataset.labels[: self.batch_size]

    def reference_gradient(self, hidden_size: int) -> tuple[Params, np.ndarray, np.ndarray]:
        """Backprop on the NumPy backend: what every gradient case is checked against."""
        if hidden_size not in self._reference:
            numpy_backend = get_backend("numpy")
            X, labels = self.gradient_batch()
            params = self.initial_params(hidden_size)
            grads = numpy_backend.two_layer_gradient(params, X, labels)[1]
            self._reference[hidden_size] = (grads, X, labels)
        return self._reference[hidden_size]

    # -- checks
    @staticmethod
    def check_losses(losses: Any, steps: int) -> None:
        values = np.asarray(losses, dtype=np.float64).reshape(-1)
        require(values.shape == (steps,), f"expected {steps} losses, got {values.shape}")
        require(bool(np.isfinite(values).all()), "a training loss is not finite")
        # Cross-entropy over 10 classes starts at ln 10 = 2.303 and must not blow up.
        require(float(values.max()) < 3.0, f"training diverged: max loss {values.max():.3f}")
        if steps >= 100:
            quarter = steps // 4
            first, last = values[:quarter].mean(), values[-quarter:].mean()
            require(last < first, f"loss did not fall: {first:.4f} -> {last:.4f}")

    def _gradient_check(
        self, hidden_size: int, to_host: Callable[[Any], np.ndarray], atol: float, stride: int = 1
    ) -> Callable[[Any], None]:
        reference = self.reference_gradient(hidden_size)[0]

        def check(grads: Any) -> None:
            for name in PARAM_NAMES:
                expected = reference[name].reshape(-1)[::stride]
                got = to_host(grads[name]).reshape(-1).astype(np.float64)
                require(got.shape == expected.shape, f"{name}: shape {got.shape}")
                error = float(np.max(np.abs(got - expected)))
                require(error <= atol, f"{name}: max abs difference {error:.2e} > {atol:.0e}")

        return check

    # -- the chapter's training run
    def train_case(
        self, implementation: str, dtype: str, steps: int, hidden_size: int = 50
    ) -> Case:
        """``steps`` SGD iterations of 784-``hidden_size``-10 at lr 0.1, no evaluations."""
        schedule = self.batch_schedule(steps)
        X_host = self.inputs(dtype)
        labels_host = self.dataset.labels
        init = self.initial_params(hidden_size, dtype)

        def check(losses: Any) -> None:
            self.check_losses(losses, steps)

        if implementation == BOOK:
            onehot = np.eye(OUTPUT_SIZE, dtype=dtype)[labels_host]

            def book_setup() -> BookTwoLayerNet:
                net = BookTwoLayerNet(INPUT_SIZE, hidden_size, OUTPUT_SIZE, dtype=dtype)
                net.params = {name: value.copy() for name, value in init.items()}
                return net

            def book_run(net: BookTwoLayerNet) -> list[float]:
                return book_train(
                    net, X_host, onehot, steps, self.batch_size, LEARNING_RATE,
                    batch_masks=schedule,
                ).train_loss_list

            return Case(
                "train", BOOK, "backprop", dtype, hidden_size, self.batch_size,
                book_setup, book_run, check, iterations=steps,
            )
        if implementation in PEERS:
            return _peer_train_case(self, implementation, dtype, steps, hidden_size)

        backend = get_backend(implementation)
        X = backend.asarray(X_host)
        labels = backend.asarray(labels_host)
        batch_indices = backend.asarray(schedule)

        def setup() -> Params:
            return {name: backend.asarray(value.copy()) for name, value in init.items()}

        def run(params: Params) -> Any:
            losses = backend.two_layer_sgd_steps(
                params, X, labels, batch_indices, LEARNING_RATE, "backprop"
            )
            backend.synchronize()
            return losses

        def check_device(losses: Any) -> None:
            check(backend.to_numpy(losses))

        return Case(
            "train", implementation, "backprop", dtype, hidden_size, self.batch_size,
            setup, run, check_device, iterations=steps,
        )

    def train_step_case(self, implementation: str, dtype: str, hidden_size: int = 50) -> Case:
        """One SGD iteration on a fixed batch (``two_layer_sgd_step``; the book's three lines)."""
        X_host, labels_host = self.gradient_batch()
        X_host = X_host.astype(dtype)
        init = self.initial_params(hidden_size, dtype)

        def check(loss: Any) -> None:
            value = float(loss)
            require(np.isfinite(value) and 0.0 < value < 3.0, f"one-step loss {value}")

        if implementation == BOOK:
            onehot = np.eye(OUTPUT_SIZE, dtype=dtype)[labels_host]

            def book_setup() -> BookTwoLayerNet:
                net = BookTwoLayerNet(INPUT_SIZE, hidden_size, OUTPUT_SIZE, dtype=dtype)
                net.params = {name: value.copy() for name, value in init.items()}
                return net

            def book_run(net: BookTwoLayerNet) -> float:
                grad = net.gradient(X_host, onehot)
                for key in PARAM_NAMES:
                    net.params[key] -= LEARNING_RATE * grad[key]
                return net.loss(X_host, onehot)

            return Case(
                "train-step", BOOK, "backprop", dtype, hidden_size, self.batch_size,
                book_setup, book_run, check,
            )

        backend = get_backend(implementation)
        X = backend.asarray(X_host)
        labels = backend.asarray(labels_host)

        def setup() -> Params:
            return {name: backend.asarray(value.copy()) for name, value in init.items()}

        def run(params: Params) -> Any:
            loss = backend.two_layer_sgd_step(params, X, labels, LEARNING_RATE)
            backend.synchronize()
            return loss

        return Case(
            "train-step", implementation, "backprop", dtype, hidden_size, self.batch_size,
            setup, run, lambda loss: check(backend.to_numpy(loss)),
        )

    # -- one gradient of the whole net
    def gradient_case(
        self,
        implementation: str,
        method: str,
        hidden_size: int = 50,
        *,
        workload: str = "gradient",
        naive_samples: int = 400,
    ) -> Case:
        """One float64 gradient at batch ``batch_size`` by ``method``.

        ``"naive"`` runs the per-element loop (two full losses per parameter)
        on every ``s``-th element of each parameter, ``s = P // naive_samples``,
        and reports that time scaled by ``P / sampled``: each element costs the
        same two losses, so the extrapolation is exact up to timing noise.
        ``"forward"`` times one loss evaluation, the unit of the cost model
        ``naive ≈ 2·P·forward``.
        """
        _, X_host, labels_host = self.reference_gradient(hidden_size)
        init = self.initial_params(hidden_size)
        total = num_params(hidden_size)
        stride = _stride_for(total, naive_samples)
        sampled = sum(len(range(0, value.size, stride)) for value in init.values())

        def fresh() -> dict[str, np.ndarray]:
            return {name: value.copy() for name, value in init.items()}

        if implementation == BOOK:
            return self._book_gradient_case(
                method, hidden_size, workload, X_host, labels_host, fresh, stride, sampled
            )
        if implementation in PEERS:
            return _peer_gradient_case(self, implementation, method, hidden_size, workload)

        backend = get_backend(implementation)
        X = backend.asarray(X_host)
        labels = backend.asarray(labels_host)

        def setup() -> Params:
            return {name: backend.asarray(value) for name, value in fresh().items()}

        common: dict[str, Any] = {
            "workload": workload, "implementation": implementation, "method": method,
            "dtype": "float64", "hidden_size": hidden_size, "batch_size": self.batch_size,
            "setup": setup,
        }
        if method == "backprop":

            def run_backprop(params: Params) -> Params:
                grads = backend.two_layer_gradient(params, X, labels)[1]
                backend.synchronize()
                return grads

            check = self._gradient_check(hidden_size, backend.to_numpy, BACKPROP_ATOL["float64"])
            return Case(run=run_backprop, check=check, **common)
        if method == "fast":

            def run_fast(params: Params) -> Params:
                grads = backend.two_layer_numerical_gradient(params, X, labels, H)
                backend.synchronize()
                return grads

            check = self._gradient_check(hidden_size, backend.to_numpy, EXACT_GRADIENT_ATOL)
            return Case(run=run_fast, check=check, **common)
        if method == "naive":

            def run_naive(params: Params) -> dict[str, Any]:
                def loss(_: Any) -> Any:
                    return backend.two_layer_loss(params, X, labels)

                # The base class's loop, as TwoLayerNet.numerical_gradient(method="naive")
                # runs it, on strided views so that only the sample is perturbed.
                views = _sampled_views(params, stride)
                grads = {
                    name: Backend.numerical_gradient(backend, loss, view, H, "central")
                    for name, view in views.items()
                }
                backend.synchronize()
                return grads

            check = self._gradient_check(
                hidden_size, backend.to_numpy, EXACT_GRADIENT_ATOL, stride
            )
            return Case(
                run=run_naive, check=check, scale=total / sampled, sampled_params=sampled,
                **common,
            )
        if method == "forward":
            expected = float(get_backend("numpy").two_layer_loss(init, X_host, labels_host))

            def run_forward(params: Params) -> Any:
                value = backend.two_layer_loss(params, X, labels)
                backend.synchronize()
                return value

            def check_forward(value: Any) -> None:
                got = float(backend.to_numpy(value))
                require(abs(got - expected) <= 1e-9, f"loss {got} != reference {expected}")

            return Case(run=run_forward, check=check_forward, **common)
        raise ValueError(f"unknown gradient method {method!r}")

    def _book_gradient_case(
        self,
        method: str,
        hidden_size: int,
        workload: str,
        X: np.ndarray,
        labels: np.ndarray,
        fresh: Callable[[], dict[str, np.ndarray]],
        stride: int,
        sampled: int,
    ) -> Case:
        onehot = np.eye(OUTPUT_SIZE)[labels]

        def setup() -> BookTwoLayerNet:
            net = BookTwoLayerNet(INPUT_SIZE, hidden_size, OUTPUT_SIZE)
            net.params = fresh()
            return net

        common: dict[str, Any] = {
            "workload": workload, "implementation": BOOK, "method": method, "dtype": "float64",
            "hidden_size": hidden_size, "batch_size": self.batch_size, "setup": setup,
        }
        if method == "backprop":
            check = self._gradient_check(hidden_size, np.asarray, BACKPROP_ATOL["float64"])
            return Case(run=lambda net: net.gradient(X, onehot), check=check, **common)
        if method == "naive":

            def run_naive(net: BookTwoLayerNet) -> dict[str, np.ndarray]:
                def loss_W(W: np.ndarray) -> float:
                    return net.loss(X, onehot)

                views = _sampled_views(net.params, stride)
                return {name: book_numerical_gradient(loss_W, view) for name, view in views.items()}

            check = self._gradient_check(hidden_size, np.asarray, BOOK_NUMERICAL_ATOL, stride)
            return Case(
                run=run_naive, check=check, scale=num_params(hidden_size) / sampled,
                sampled_params=sampled, **common,
            )
        raise ValueError(f"the book has no {method!r} gradient")


# -------------------------------------------------------------------------- peers
_PEER_PACKAGES = {"torch-cpu": "torch", "torch-cuda": "torch", "jax": "jax"}


def peer_unavailable_reason(peer: str) -> str | None:
    """Why ``peer`` cannot run here (package missing, no CUDA), or None when it can."""
    package = _PEER_PACKAGES[peer]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install {package}); skipped"
    if peer == "torch-cuda":
        import torch

        if not torch.cuda.is_available():
            return "PyTorch has no CUDA device here; skipped"
    return None


def available_peers(peers: Sequence[str] = PEERS) -> tuple[list[str], dict[str, str]]:
    """The peers that can run, and a reason for each that cannot."""
    runnable, skipped = [], {}
    for peer in peers:
        reason = peer_unavailable_reason(peer)
        if reason is None:
            runnable.append(peer)
        else:
            skipped[peer] = reason
    return runnable, skipped


# The peers run the same network, init, batches and loss (exact log-softmax
# cross-entropy, batch mean) in their own idiom: PyTorch eager with autograd
# and a manual SGD update; JAX with a jitted step called from a Python loop.
def _torch_device(peer: str) -> tuple[Any, Any]:
    import torch

    return torch, torch.device("cuda" if peer == "torch-cuda" else "cpu")


def _torch_synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_loss(torch: Any, params: Sequence[Any], X: Any, labels: Any) -> Any:
    W1, b1, W2, b2 = params
    hidden = torch.sigmoid(X @ W1 + b1)
    return torch.nn.functional.cross_entropy(hidden @ W2 + b2, labels)


def _jax_modules() -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    # float64 needs x64 mode; float32 arrays stay float32 under it.
    jax.config.update("jax_enable_x64", True)
    return jax, jnp


def _jax_loss(jax: Any, jnp: Any) -> Callable[..., Any]:
    def loss(params: Sequence[Any], X: Any, labels: Any) -> Any:
        W1, b1, W2, b2 = params
        hidden = jax.nn.sigmoid(X @ W1 + b1)
        log_p = jax.nn.log_softmax(hidden @ W2 + b2)
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))

    return loss


def _peer_train_case(
    factory: WorkloadFactory, peer: str, dtype: str, steps: int, hidden_size: int
) -> Case:
    schedule = factory.batch_schedule(steps)
    X_host = factory.inputs(dtype)
    labels_host = factory.dataset.labels
    init = factory.initial_params(hidden_size, dtype)

    if peer == "jax":
        jax, jnp = _jax_modules()
        loss_fn = _jax_loss(jax, jnp)
        X, labels = jnp.asarray(X_host), jnp.asarray(labels_host)
        rows_per_step = [jnp.asarray(rows) for rows in schedule]

        @jax.jit
        def step(params: Any, rows: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(params, X[rows], labels[rows])
            return tuple(p - LEARNING_RATE * g for p, g in zip(params, grads, strict=True)), loss

        def jax_setup() -> Any:
            return tuple(jnp.asarray(init[name]) for name in PARAM_NAMES)

        def jax_run(params: Any) -> Any:
            losses = []
            for rows in rows_per_step:
                params, loss = step(params, rows)
                losses.append(loss)
            return jax.block_until_ready(jnp.stack(losses))

        return Case(
            "train", peer, "backprop", dtype, hidden_size, factory.batch_size, jax_setup,
            jax_run, lambda losses: factory.check_losses(np.asarray(losses), steps),
            iterations=steps, notes={"device": str(jax.devices()[0])},
        )

    torch, device = _torch_device(peer)
    X = torch.from_numpy(X_host).to(device)
    labels = torch.from_numpy(labels_host).to(device)
    batch_indices = torch.from_numpy(schedule).to(device)

    def setup() -> list[Any]:
        return [
            torch.tensor(init[name], device=device, requires_grad=True) for name in PARAM_NAMES
        ]

    def run(params: list[Any]) -> Any:
        # Losses stay on the device: reading each one would synchronise a GPU
        # every step, which fastgrad's own loops do not do either.
        losses = torch.empty(steps, dtype=torch.float64, device=device)
        for step in range(steps):
            rows = batch_indices[step]
            loss = _torch_loss(torch, params, X[rows], labels[rows])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    param.sub_(grad, alpha=LEARNING_RATE)
            losses[step] = loss.detach()
        _torch_synchronize(torch, device)
        return losses

    return Case(
        "train", peer, "backprop", dtype, hidden_size, factory.batch_size, setup, run,
        lambda losses: factory.check_losses(losses.cpu().numpy(), steps), iterations=steps,
        notes={"threads": torch.get_num_threads()} if device.type == "cpu" else {},
    )


def _peer_gradient_case(
    factory: WorkloadFactory, peer: str, method: str, hidden_size: int, workload: str
) -> Case:
    if method != "backprop":
        raise ValueError(f"peers are timed on backprop only, not {method!r}")
    _, X_host, labels_host = factory.reference_gradient(hidden_size)
    init = factory.initial_params(hidden_size)

    if peer == "jax":
        jax, jnp = _jax_modules()
        gradient = jax.jit(jax.grad(_jax_loss(jax, jnp)))
        X, labels = jnp.asarray(X_host), jnp.asarray(labels_host)

        def jax_run(params: Any) -> dict[str, Any]:
            grads = jax.block_until_ready(gradient(params, X, labels))
            return dict(zip(PARAM_NAMES, grads, strict=True))

        return Case(
            workload, peer, "backprop", "float64", hidden_size, factory.batch_size,
            lambda: tuple(jnp.asarray(init[name]) for name in PARAM_NAMES), jax_run,
            factory._gradient_check(hidden_size, np.asarray, BACKPROP_ATOL["float64"]),
        )

    torch, device = _torch_device(peer)
    X = torch.from_numpy(X_host.copy()).to(device)
    labels = torch.from_numpy(labels_host.copy()).to(device)

    def setup() -> list[Any]:
        return [
            torch.tensor(init[name], device=device, requires_grad=True) for name in PARAM_NAMES
        ]

    def run(params: list[Any]) -> dict[str, Any]:
        grads = torch.autograd.grad(_torch_loss(torch, params, X, labels), params)
        _torch_synchronize(torch, device)
        return dict(zip(PARAM_NAMES, grads, strict=True))

    return Case(
        workload, peer, "backprop", "float64", hidden_size, factory.batch_size, setup, run,
        factory._gradient_check(
            hidden_size, lambda t: t.detach().cpu().numpy(), BACKPROP_ATOL["float64"]
        ),
    )
