"""The chapter's mini-batch SGD loop, run an epoch at a time inside the backend.

The loop is the book's (random mini-batches, a batch loss per iteration,
train and test accuracy on the whole sets every epoch), but the Python side
only draws each epoch's batch indices on the host and hands them to
``net.sgd_steps``, so a compiled or GPU backend runs the steps without coming
back to Python where it has a fused kernel for the net. Any ``MultiLayerNet``
trains here. The same seed on the same backend gives the
same numbers.

Divergence: with ``start = max(first_loss, DIVERGENCE_FLOOR)``, where
``first_loss`` is the run's first batch loss, measured before any update
(about ``ln 10 = 2.3`` for an untrained MNIST net), a run stops with
:class:`TrainingDivergedError`

* at the first iteration whose batch loss is NaN or infinite, or greater
  than ``DIVERGENCE_FACTOR * start`` (100 times): the explosion of a
  learning rate far too large, within a few iterations;
* at the end of an epoch (or of the run) whose median batch loss is greater
  than ``SUSTAINED_DIVERGENCE_FACTOR * start`` (4 times): a net that a
  learning rate too large has saturated, confidently wrong, at chance
  accuracy.

A converging run, even a noisy one, comes near neither. The floor of 1 nat
keeps a net that starts nearly trained (first loss 0.01) from being stopped
by a few hard batches.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastgrad._validation import check_finite
from fastgrad.backends import Backend
from fastgrad.errors import SlowPathWarning
from fastgrad.models import MultiLayerNet

__all__ = [
    "DIVERGENCE_FACTOR",
    "DIVERGENCE_FLOOR",
    "GRADIENT_METHODS",
    "SAMPLING_METHODS",
    "SUSTAINED_DIVERGENCE_FACTOR",
    "EpochRecord",
    "TrainingDivergedError",
    "TrainingHistory",
    "train",
]

GRADIENT_METHODS = ("backprop", "numerical", "numerical-naive")
SAMPLING_METHODS = ("choice", "shuffle")

# Steps per backend call. Backprop runs a whole epoch per call; numerical
# gradients are slow enough per step that a caller's progress display would
# otherwise stall for minutes between updates.
_STEPS_PER_CALL = {"backprop": None, "numerical": 10, "numerical-naive": 1}

_FORMAT = "fastgrad.TrainingHistory"
_FORMAT_VERSION = 1

#: A batch loss above ``DIVERGENCE_FACTOR * max(first loss, DIVERGENCE_FLOOR)`` is divergence.
DIVERGENCE_FACTOR = 100.0
#: An epoch whose median batch loss is above this multiple of the same start is divergence.
SUSTAINED_DIVERGENCE_FACTOR = 4.0
DIVERGENCE_FLOOR = 1.0

Dataset = tuple[tuple[Any, Any], tuple[Any, Any]]


class TrainingDivergedError(ArithmeticError):
    """The run diverged (see the module docstring for the rule).

    :attr:`iteration` (1-based) is the iteration that exploded, or the last
    of an epoch whose median loss was too high; None when only the
    parameters at the end were non-finite. :attr:`history` holds the batch
    losses before an exploded iteration, or up to the end of such an epoch.
    The net's parameters are left as the failed steps made them.
    """

    def __init__(
        self, message: str, history: TrainingHistory, iteration: int | None = None
    ) -> None:
        super().__init__(message)
        self.history = history
        self.iteration = iteration


@dataclass(frozen=True)
class EpochRecord:
    """Accuracies on the whole training and test sets after ``iteration`` steps.

    ``epoch`` is ``iteration / iters_per_epoch``: whole at epoch ends, and
    fractional for the closing evaluation of a run that stops mid-epoch.
    """

    epoch: float
    iteration: int
    train_acc: float
    test_acc: float


@dataclass
class TrainingHistory:
    """What a training run measured, ready to save as JSON and to plot.

    Attributes
    ----------
    losses
        Batch loss of every iteration, measured on the batch before its update.
    epochs
        One :class:`EpochRecord` per evaluation: before training, after every
        epoch, and after the last iteration.
    wall_time
        Seconds for the whole call, evaluations and data transfer included.
    gradient_time
        Seconds inside the SGD steps (gradients and updates).
    warmup_time
        Seconds the backend spent compiling before the first step.
    config
        The run's settings: sizes, dtype, backend, learning rate, seed, ...

    Examples
    --------
    >>> from fastgrad.train import EpochRecord, TrainingHistory
    >>> history = TrainingHistory(losses=[2.3, 2.2], epochs=[EpochRecord(1.0, 2, 0.5, 0.4)])
    >>> TrainingHistory.from_json(history.to_json()) == history
    True
    """

    losses: list[float] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    wall_time: float = 0.0
    gradient_time: float = 0.0
    warmup_time: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    # -- the book's names
    @property
    def train_loss_list(self) -> list[float]:
        return self.losses

    @property
    def train_acc_list(self) -> list[float]:
        return [record.train_acc for record in self.epochs]

    @property
    def test_acc_list(self) -> list[float]:
        return [record.test_acc for record in self.epochs]

    @property
    def final(self) -> EpochRecord | None:
        """The last evaluation, or None when the run evaluated nothing."""
        return self.epochs[-1] if self.epochs else None

    @property
    def steps_per_second(self) -> float:
        """SGD iterations per second of gradient time."""
        return len(self.losses) / self.gradient_time if self.gradient_time > 0 else 0.0

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, **asdict(self)}

    def to_json(self) -> str:
        """The history as a JSON document (``allow_nan`` off: a diverged run never gets here)."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TrainingHistory:
        if document.get("format") != _FORMAT or document.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"not a {_FORMAT} version {_FORMAT_VERSION} document "
                f"(format={document.get('format')!r}, version={document.get('version')!r})"
            )
        return cls(
            losses=[float(value) for value in document["losses"]],
            epochs=[EpochRecord(**record) for record in document["epochs"]],
            wall_time=float(document["wall_time"]),
            gradient_time=float(document["gradient_time"]),
            warmup_time=float(document.get("warmup_time", 0.0)),
            config=dict(document["config"]),
        )

    @classmethod
    def from_json(cls, text: str) -> TrainingHistory:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temporary file + rename)."""
        from fastgrad.checkpoint import atomic_write_bytes

        return atomic_write_bytes(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainingHistory:
        """Read a history written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


def train(
    net: MultiLayerNet,
    data: Dataset,
    *,
    iters: int = 10_000,
    batch_size: int = 100,
    lr: float = 0.1,
    gradient: str = "backprop",
    sampling: str = "choice",
    seed: int | None = None,
    eval_every_epoch: bool = True,
    callback: Callable[[TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """Train ``net`` by mini-batch SGD as in the chapter; updates ``net.params`` in place.

    Parameters
    ----------
    net
        The network; its backend runs everything, its dtype is the data's.
    data
        ``((x_train, t_train), (x_test, t_test))`` as :func:`fastgrad.data.load_mnist`
        returns; labels or one-hot targets. Moved to the backend once.
    iters, batch_size, lr
        The chapter's ``iters_num``, ``batch_size`` and ``learning_rate``.
    gradient
        ``"backprop"``; ``"numerical"`` (central differences by the fast
        kernel, in float64); or ``"numerical-naive"`` (the book's loop, one
        Python call per parameter: hours for MNIST, warns).
    sampling
        ``"choice"``: each batch drawn with replacement, as the book's
        ``np.random.choice``; ``"shuffle"``: every epoch walks a fresh
        permutation of the training set (a remainder smaller than a batch is
        skipped).
    seed
        Seeds the batch draws (not the weights: seed the network for that).
    eval_every_epoch
        Evaluate accuracy before training and after every epoch of
        ``max(train_size // batch_size, 1)`` iterations; the end of the run is
        always evaluated.
    callback
        Called with the history so far after each backend call and evaluation.

    Returns
    -------
    TrainingHistory

    Raises
    ------
    TrainingDivergedError
        A batch loss became NaN, infinite or more than ``DIVERGENCE_FACTOR``
        times the first (see the module docstring), or a parameter non-finite.
    ValueError
        A setting is out of range, the data holds NaN or infinities (named
        ``x_train``, ``t_train``, ``x_test`` or ``t_test``) or is empty, or the
        net's parameters are not finite before training.

    Examples
    --------
    >>> import fastgrad
    >>> from fastgrad.data import load_mnist
    >>> from fastgrad.train import train
    >>> data = load_mnist(subset="mini")
    >>> net = fastgrad.TwoLayerNet(784, 50, 10, seed=0)
    >>> history = train(net, data, iters=500, seed=0)
    >>> history.losses[0] > history.losses[-1], history.final.test_acc > 0.5
    (True, True)
    """
    started = time.perf_counter()
    _check_settings(iters, batch_size, lr, gradient, sampling)
    if gradient == "numerical-naive":
        warnings.warn(
            "gradient='numerical-naive' runs the book's loop, two full forward passes per "
            f"parameter ({net.num_params:,} here) per iteration; use 'numerical' for the same "
            "values thousands of times faster",
            SlowPathWarning,
            stacklevel=2,
        )
    backend = net.backend
    (x_train, t_train), (x_test, t_test) = (
        tuple(_to_backend(backend, array) for array in split) for split in data
    )
    X_train, labels_train = net.prepare(x_train, t_train, names=("x_train", "t_train"))
    X_test, labels_test = net.prepare(x_test, t_test, names=("x_test", "t_test"))
    for name, array in net.params.items():
        check_finite(
            backend,
            array,
            f"net.params[{name!r}]",
            "the net must start from finite parameters (was it loaded from a diverged run?)",
        )
    train_size = int(X_train.shape[0])
    iters_per_epoch = max(train_size // batch_size, 1)
    history = TrainingHistory(
        config={
            "layer_sizes": net.layer_sizes,
            "activation": net.activation,
            "weight_decay_lambda": net.weight_decay_lambda,
            "dtype": net.dtype.name,
            "backend": backend.name,
            "iters": iters,
            "batch_size": batch_size,
            "lr": lr,
            "gradient": gradient,
            "sampling": sampling,
            "seed": seed,
            "train_size": train_size,
            "test_size": int(X_test.shape[0]),
            "iters_per_epoch": iters_per_epoch,
        }
    )
    # Compile before the clock of the steps starts (the naive loop has nothing to compile).
    if gradient != "numerical-naive":
        history.warmup_time = backend.warmup(
            net.dtype, "numerical" if gradient == "numerical" else "backprop", net.network()
        )

    def evaluate(iteration: int) -> None:
        train_acc = float(net.prepared_accuracy(X_train, labels_train))
        test_acc = float(net.prepared_accuracy(X_test, labels_test))
        epoch = round(iteration / iters_per_epoch, 6)
        history.epochs.append(EpochRecord(epoch, iteration, train_acc, test_acc))

    def report() -> None:
        history.wall_time = time.perf_counter() - started
        if callback is not None:
            callback(history)

    if eval_every_epoch:
        evaluate(0)
        report()
    rng = np.random.default_rng(seed)
    steps_per_call = _STEPS_PER_CALL[gradient] or iters_per_epoch
    # Made once: the Numba backend lists the non-zeros of the whole set here
    # instead of in every call below (one per epoch).
    step_inputs = net.training_inputs(X_train) if gradient == "backprop" else X_train
    done = 0
    while done < iters:
        # Drawn a whole epoch at a time, so chunking never changes the batches.
        epoch_indices = _draw_epoch(rng, sampling, train_size, iters_per_epoch, batch_size)
        epoch_steps = min(iters_per_epoch, iters - done)
        for first in range(0, epoch_steps, steps_per_call):
            indices = epoch_indices[first : min(first + steps_per_call, epoch_steps)]
            step_started = time.perf_counter()
            with backend.single_threaded_blas():
                losses = _run_steps(net, step_inputs, labels_train, indices, lr, gradient)
            history.gradient_time += time.perf_counter() - step_started
            _check_losses(losses, done, lr, history)
            history.losses.extend(losses.tolist())
            done += len(losses)
            report()
        _check_epoch(history, epoch_steps, lr)
        if eval_every_epoch and done % iters_per_epoch == 0:
            evaluate(done)
            report()
    _check_parameters(net, lr, history)
    if not history.epochs or history.epochs[-1].iteration != done:
        evaluate(done)
        report()
    return history


def _check_settings(iters: int, batch_size: int, lr: float, gradient: str, sampling: str) -> None:
    for name, value, low in (("iters", iters, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            kind = "non-negative" if low == 0 else "positive"
            raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float, np.floating))
        or not 0 < lr < math.inf
    ):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if gradient not in GRADIENT_METHODS:
        raise ValueError(f"gradient must be one of {GRADIENT_METHODS}, got {gradient!r}")
    if sampling not in SAMPLING_METHODS:
        raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")


def _to_backend(backend: Backend, array: Any) -> Any:
    # The run's one deliberate host-to-device copy: each whole set, once.
    return array if backend.is_native(array) else backend.asarray(array)


def _draw_epoch(
    rng: np.random.Generator, sampling: str, train_size: int, steps: int, batch_size: int
) -> np.ndarray:
    """Row indices ``(steps, batch_size)`` for one epoch, drawn on the host."""
    if sampling == "choice":
        return rng.integers(0, train_size, size=(steps, batch_size), dtype=np.intp)
    needed = steps * batch_size
    # A batch larger than the set needs more than one pass over a permutation.
    passes = -(-needed // train_size)
    order = np.concatenate([rng.permutation(train_size) for _ in range(passes)])
    return order[:needed].astype(np.intp, copy=False).reshape(steps, batch_size)


def _run_steps(
    net: MultiLayerNet, X: Any, labels: Any, indices: np.ndarray, lr: float, gradient: str
) -> np.ndarray:
    """Run ``len(indices)`` SGD steps on the backend; the batch losses, on the host."""
    backend = net.backend
    if gradient != "numerical-naive":
        losses = net.sgd_steps(X, labels, backend.asarray(indices), lr, gradient)
        return backend.to_numpy(losses).astype(np.float64, copy=False)
    host_losses = np.empty(len(indices))
    for step, rows in enumerate(indices):
        X_batch, labels_batch = X[backend.asarray(rows)], labels[backend.asarray(rows)]
        host_losses[step] = float(net.prepared_loss(X_batch, labels_batch))
        grads = net.numerical_gradient_float64(X_batch, labels_batch, "naive")
        names = list(net.params)
        backend.sgd_update([net.params[n] for n in names], [grads[n] for n in names], lr)
    return host_losses


def _check_losses(losses: np.ndarray, done: int, lr: float, history: TrainingHistory) -> None:
    """Raise at the first diverged loss of ``losses`` (iterations ``done + 1, ...``)."""
    if not len(losses):
        return
    first = history.losses[0] if history.losses else float(losses[0])
    limit = DIVERGENCE_FACTOR * max(first, DIVERGENCE_FLOOR)
    with np.errstate(invalid="ignore"):
        diverged = ~np.isfinite(losses) | (losses > limit)
    bad = np.flatnonzero(diverged)
    if not bad.size:
        return
    step = int(bad[0])
    history.losses.extend(losses[:step].tolist())
    iteration = done + step + 1
    loss = float(losses[step])
    why = (
        f"is {loss}"
        if not math.isfinite(loss)
        else f"is {loss:.4g}, more than {DIVERGENCE_FACTOR:g} times the run's first loss "
        f"{first:.4g} (or than {DIVERGENCE_FACTOR * DIVERGENCE_FLOOR:g}, whichever is larger)"
    )
    raise TrainingDivergedError(
        f"training diverged: the batch loss of iteration {iteration} {why}; try a smaller "
        f"learning rate than {lr}",
        history,
        iteration,
    )


def _check_epoch(history: TrainingHistory, steps: int, lr: float) -> None:
    """Raise when the median loss of the last ``steps`` iterations shows sustained divergence."""
    losses = history.losses
    if not losses or steps < 1:
        return
    start = max(losses[0], DIVERGENCE_FLOOR)
    median = float(np.median(losses[-steps:]))
    if median > SUSTAINED_DIVERGENCE_FACTOR * start:
        done = len(losses)
        floor = SUSTAINED_DIVERGENCE_FACTOR * DIVERGENCE_FLOOR
        raise TrainingDivergedError(
            f"training diverged: the median batch loss of iterations {done - steps + 1}.."
            f"{done} is {median:.4g}, more than {SUSTAINED_DIVERGENCE_FACTOR:g} times the run's "
            f"first loss {losses[0]:.4g} (or than {floor:g}, whichever is larger); try a "
            f"smaller learning rate than {lr}",
            history,
            done,
        )


def _check_parameters(net: MultiLayerNet, lr: float, history: TrainingHistory) -> None:
    xp = net.backend.xp
    if not all(bool(xp.isfinite(array).all()) for array in net.params.values()):
        raise TrainingDivergedError(
            f"training diverged: the parameters hold NaN or infinite values after "
            f"{len(history.losses)} iterations; try a smaller learning rate than {lr}",
            history,
        )
