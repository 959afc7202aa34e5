"""The chapter's figures, drawn with matplotlib (the ``plot`` extra).

Figures are built with matplotlib's object-oriented API (``Figure``), never
through ``pyplot``: no GUI backend is chosen, so they render headless (Agg)
anywhere, and no global figure registry keeps them alive. matplotlib is
imported on the first call, so ``import fastgrad.plot`` stays light. A figure
given a path is rendered in memory and written atomically (a temporary file,
then a rename), in the format the path's suffix names.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastgrad.gradient import gradient_descent, numerical_gradient, tangent_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fastgrad.train import TrainingHistory

__all__ = [
    "plot_accuracy",
    "plot_gradient_descent",
    "plot_gradient_field",
    "plot_history",
    "plot_loss",
    "plot_tangent_lines",
]

PathLike = str | os.PathLike[str] | None


def _new_figure(width: float = 6.4, height: float = 4.8) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "fastgrad's figures need matplotlib: pip install 'fastgrad[plot]'"
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def _finish(figure: Figure, path: PathLike) -> Figure:
    """Save ``figure`` to ``path`` (when given) atomically, in the format its suffix names.

    The image is rendered in memory and then written by a temporary file and a
    rename, so a failure while drawing or writing leaves no partial file, and
    a reader never sees half a figure. A path without a suffix gets PNG.
    """
    if path is not None:
        from fastgrad.checkpoint import atomic_write_bytes

        target = Path(os.fspath(path))
        buffer = io.BytesIO()
        # Agg renders without any display; the format comes from the suffix, as savefig's.
        figure.savefig(buffer, format=target.suffix[1:].lower() or "png", dpi=100)
        atomic_write_bytes(target, buffer.getvalue())
    return figure


def function_1(x: Any) -> Any:
    """The chapter's ``0.01 x² + 0.1 x``."""
    return 0.01 * x**2 + 0.1 * x


def function_2(x: Any) -> Any:
    """The chapter's ``x0² + x1²``."""
    return x[0] ** 2 + x[1] ** 2


def plot_tangent_lines(path: PathLike = None, points: tuple[float, ...] = (5.0, 10.0)) -> Figure:
    """``0.01x² + 0.1x`` on [0, 20] with its numerical tangents at ``points``.

    Examples
    --------
    >>> from fastgrad.plot import plot_tangent_lines
    >>> figure = plot_tangent_lines()
    >>> len(figure.axes[0].lines)
    3
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    x = np.arange(0.0, 20.0, 0.1)
    axes.plot(x, function_1(x), label="f(x) = 0.01x² + 0.1x")
    for point in points:
        tangent = tangent_line(function_1, point)
        axes.plot(x, tangent(x), linestyle="--", label=f"tangent at x = {point:g}")
    axes.set_xlabel("x")
    axes.set_ylabel("f(x)")
    axes.legend()
    return _finish(figure, path)


def plot_gradient_field(path: PathLike = None) -> Figure:
    """The negative gradient of ``x0² + x1²`` as arrows on the book's grid.

    The gradient at every grid point comes from one batched numerical
    gradient: the sum of ``x0² + x1²`` over all points has, at each point,
    that point's own gradient.

    Examples
    --------
    >>> from fastgrad.plot import plot_gradient_field
    >>> figure = plot_gradient_field()
    >>> figure.axes[0].get_xlabel()
    'x0'
    """
    x0, x1 = np.meshgrid(np.arange(-2, 2.5, 0.25), np.arange(-2, 2.5, 0.25))
    points = np.stack([x0.ravel(), x1.ravel()])  # (2, N), as the book's X, Y rows
    grad = numerical_gradient(
        lambda stack: (stack**2).sum(axis=(1, 2)), points, batched=True, backend="numpy"
    )
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.quiver(points[0], points[1], -grad[0], -grad[1], angles="xy", color="#666666")
    axes.set_xlim(-2, 2)
    axes.set_ylim(-2, 2)
    axes.set_xlabel("x0")
    axes.set_ylabel("x1")
    axes.grid()
    return _finish(figure, path)


def plot_gradient_descent(
    path: PathLike = None,
    init_x: tuple[float, float] = (-3.0, 4.0),
    lr: float = 0.1,
    step_num: int = 20,
) -> Figure:
    """The path gradient descent takes on ``x0² + x1²`` from ``init_x``.

    Examples
    --------
    >>> from fastgrad.plot import plot_gradient_descent
    >>> figure = plot_gradient_descent()
    >>> len(figure.axes[0].lines[-1].get_xdata())
    20
    """
    _, history = gradient_descent(
        function_2, np.array(init_x, dtype=np.float64), lr=lr, step_num=step_num, backend="numpy"
    )
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.axhline(0.0, color="#0000ff", linestyle="--")
    axes.axvline(0.0, color="#0000ff", linestyle="--")
    axes.plot(history[:, 0], history[:, 1], "o")
    axes.set_xlim(-3.5, 3.5)
    axes.set_ylim(-4.5, 4.5)
    axes.set_xlabel("X0")
    axes.set_ylabel("X1")
    return _finish(figure, path)


def _draw_loss(axes: Axes, history: TrainingHistory) -> None:
    iterations = np.arange(1, len(history.losses) + 1)
    axes.plot(iterations, history.losses, linewidth=0.6)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title("batch loss")


def _draw_accuracy(axes: Axes, history: TrainingHistory) -> None:
    epochs = [record.epoch for record in history.epochs]
    axes.plot(epochs, history.train_acc_list, marker="o", label="train acc")
    axes.plot(epochs, history.test_acc_list, marker="s", linestyle="--", label="test acc")
    axes.set_xlabel("epochs")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.0)
    axes.set_title("accuracy")
    axes.legend(loc="lower right")


def plot_loss(history: TrainingHistory, path: PathLike = None) -> Figure:
    """The batch loss of every iteration of a training run.

    Examples
    --------
    >>> from fastgrad.plot import plot_loss
    >>> from fastgrad.train import TrainingHistory
    >>> plot_loss(TrainingHistory(losses=[2.3, 1.2, 0.7])).axes[0].get_ylabel()
    'loss'
    """
    figure = _new_figure()
    _draw_loss(figure.add_subplot(), history)
    return _finish(figure, path)


def plot_accuracy(history: TrainingHistory, path: PathLike = None) -> Figure:
    """Train and test accuracy at every evaluation of a training run.

    Examples
    --------
    >>> from fastgrad.plot import plot_accuracy
    >>> from fastgrad.train import EpochRecord, TrainingHistory
    >>> records = [EpochRecord(0.0, 0, 0.1, 0.1), EpochRecord(1.0, 600, 0.8, 0.8)]
    >>> history = TrainingHistory(epochs=records)
    >>> len(plot_accuracy(history).axes[0].lines)
    2
    """
    figure = _new_figure()
    _draw_accuracy(figure.add_subplot(), history)
    return _finish(figure, path)


def plot_history(history: TrainingHistory, path: PathLike = None) -> Figure:
    """The chapter's training figure: batch loss (left) and accuracies per epoch (right).

    Examples
    --------
    >>> from fastgrad.plot import plot_history
    >>> from fastgrad.train import EpochRecord, TrainingHistory
    >>> history = TrainingHistory(losses=[2.3, 0.5], epochs=[EpochRecord(1.0, 2, 0.8, 0.7)])
    >>> len(plot_history(history).axes)
    2
    """
    figure = _new_figure(11.0, 4.2)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    _draw_loss(loss_axes, history)
    _draw_accuracy(accuracy_axes, history)
    if history.config:
        figure.suptitle(_run_title(history.config))
    return _finish(figure, path)


def _run_title(config: dict[str, Any]) -> str:
    """``MultiLayerNet 784-100-100-10 relu, numpy, float64, lr 0.1, batch 100``, from what is known.

    Histories record the network by its sizes and activation (any MultiLayerNet);
    older ones lack the activation and the class, and get what they have.
    """
    sizes = config.get("layer_sizes")
    network = " ".join(
        str(part)
        for part in (
            config.get("model", "network"),
            "-".join(map(str, sizes)) if isinstance(sizes, list) else sizes,
            config.get("activation"),
        )
        if part is not None
    )
    if config.get("weight_decay_lambda"):
        network += f", weight decay {config['weight_decay_lambda']:g}"
    return (
        f"{network}, {config.get('backend')}, {config.get('dtype')}, lr {config.get('lr')}, "
        f"batch {config.get('batch_size')}"
    )
