"""The chapter's figures render headless and write real PNG files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastgrad.train import EpochRecord, TrainingHistory

pytest.importorskip("matplotlib")

from fastgrad import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history() -> TrainingHistory:
    return TrainingHistory(
        losses=[2.3 * 0.99**i for i in range(200)],
        epochs=[EpochRecord(float(e), 50 * e, 0.1 + 0.2 * e, 0.1 + 0.19 * e) for e in range(5)],
        config={
            "layer_sizes": [784, 50, 10],
            "backend": "numpy",
            "dtype": "float64",
            "lr": 0.1,
            "batch_size": 100,
        },
    )


@pytest.mark.parametrize(
    "draw",
    [
        plot.plot_tangent_lines,
        plot.plot_gradient_field,
        plot.plot_gradient_descent,
        lambda path: plot.plot_loss(history(), path),
        lambda path: plot.plot_accuracy(history(), path),
        lambda path: plot.plot_history(history(), path),
    ],
    ids=["tangent", "field", "descent", "loss", "accuracy", "history"],
)
def test_figures_write_png(tmp_path, draw):
    from matplotlib.figure import Figure

    path = tmp_path / "figure.png"
    figure = draw(path)
    assert isinstance(figure, Figure)
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 5_000


@pytest.mark.parametrize(
    ("config", "title"),
    [
        (
            {"model": "MultiLayerNet", "layer_sizes": [784, 100, 100, 10], "activation": "relu",
             "weight_decay_lambda": 0.01, "backend": "numba", "dtype": "float32", "lr": 0.1,
             "batch_size": 100},
            "MultiLayerNet 784-100-100-10 relu, weight decay 0.01, numba, float32, lr 0.1, "
            "batch 100",
        ),
        (
            # a history written before the net's class and activation were recorded
            {"layer_sizes": [784, 50, 10], "backend": "numpy", "dtype": "float64", "lr": 0.1,
             "batch_size": 100},
            "network 784-50-10, numpy, float64, lr 0.1, batch 100",
        ),
    ],
    ids=["deep", "old-history"],
)
def test_history_title_names_the_network(config, title):
    run = TrainingHistory(losses=[2.3, 1.0], epochs=[EpochRecord(1.0, 2, 0.5, 0.5)], config=config)
    assert plot.plot_history(run).get_suptitle() == title


def test_figures_without_a_path_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot.plot_tangent_lines()
    assert list(tmp_path.iterdir()) == []


def test_gradient_field_arrows_point_downhill():
    quiver = plot.plot_gradient_field().axes[0].collections[0]
    offsets, (u, v) = quiver.get_offsets(), (quiver.U, quiver.V)
    # The negative gradient of x0² + x1² points at the origin: -2x.
    assert (offsets[:, 0] * u <= 1e-9).all() and (offsets[:, 1] * v <= 1e-9).all()


def test_descent_path_starts_at_the_start_and_approaches_zero():
    line = plot.plot_gradient_descent().axes[0].lines[-1]
    xs, ys = line.get_xdata(), line.get_ydata()
    assert (xs[0], ys[0]) == (-3.0, 4.0) and abs(xs[-1]) < 0.1 and abs(ys[-1]) < 0.1


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'fastgrad\[plot\]'"):
        plot.plot_tangent_lines()


def test_importing_fastgrad_and_plot_does_not_import_matplotlib():
    code = "import sys, fastgrad, fastgrad.plot, fastgrad.cli; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_figure_is_written_atomically_and_a_failed_one_leaves_the_old_file(
    tmp_path, monkeypatch
):
    from matplotlib.figure import Figure

    path = tmp_path / "training.png"
    plot.plot_history(history(), path)
    before = path.read_bytes()
    real_savefig = Figure.savefig

    def savefig_then_break(self, target, **options):
        real_savefig(self, target, **options)  # the whole image, then a failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_then_break)
    with pytest.raises(OSError, match="No space left on device"):
        plot.plot_history(history(), path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["training.png"]


def test_a_write_failure_leaves_no_partial_figure(tmp_path, monkeypatch):
    import os

    def failing_fsync(handle):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        plot.plot_loss(history(), tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "signature"), [("f.png", PNG_SIGNATURE), ("f.svg", b"<?xml"),
                                                  ("f.PDF", b"%PDF"), ("f", PNG_SIGNATURE)])
def test_the_suffix_names_the_format(tmp_path, name, signature):
    plot.plot_tangent_lines(tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(signature)
    assert [entry.name for entry in tmp_path.iterdir()] == [name]


def test_an_unknown_suffix_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="Format 'xyz' is not supported"):
        plot.plot_tangent_lines(tmp_path / "figure.xyz")
    assert list(tmp_path.iterdir()) == []
