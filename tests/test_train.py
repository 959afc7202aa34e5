"""The chapter's training loop: it learns, it repeats itself, it keeps its records."""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad
from fastgrad.data import load_mnist
from fastgrad.errors import SlowPathWarning
from fastgrad.train import (
    EpochRecord,
    TrainingDivergedError,
    TrainingHistory,
    _draw_epoch,
    train,
)


@pytest.fixture(scope="module")
def mini():
    return load_mnist(subset="mini")


def tiny_data(seed: int = 0, train_size: int = 40, test_size: int = 12):
    """A small separable 3-class problem for the slow gradient methods."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, (3, 6))

    def draw(count):
        labels = rng.integers(0, 3, count)
        return centers[labels] + rng.normal(0.0, 0.5, (count, 6)), labels

    return draw(train_size), draw(test_size)


def test_short_run_learns_on_the_embedded_subset(backend, mini):
    net = fastgrad.TwoLayerNet(784, 50, 10, seed=0, backend=backend)
    history = train(net, mini, iters=500, batch_size=100, lr=0.1, seed=0)
    assert len(history.losses) == 500
    assert np.mean(history.losses[:20]) > 2.2 > 1.5 > np.mean(history.losses[-20:])
    assert [record.iteration for record in history.epochs] == list(range(0, 501, 100))
    assert history.final.test_acc > 0.6 and history.final.train_acc > 0.6  # chance: 0.1
    assert 0 < history.gradient_time < history.wall_time
    assert history.config["iters_per_epoch"] == 100 and history.config["backend"] == backend.name


def test_same_seed_same_numbers(backend, mini):
    (x_train, t_train), test = mini
    small = ((x_train[:2000], t_train[:2000]), test)
    runs = []
    for _ in range(2):
        net = fastgrad.TwoLayerNet(784, 20, 10, seed=3, backend=backend)
        runs.append((train(net, small, iters=50, seed=7), backend.to_numpy(net.params["W1"])))
    assert runs[0][0].losses == runs[1][0].losses
    assert runs[0][0].epochs == runs[1][0].epochs
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    other_seed = train(
        fastgrad.TwoLayerNet(784, 20, 10, seed=3, backend=backend), small, iters=50, seed=8
    )
    assert other_seed.losses != runs[0][0].losses


def test_numerical_gradient_training_matches_backprop(backend):
    data = tiny_data()
    histories = {}
    for method in ("backprop", "numerical"):
        net = fastgrad.TwoLayerNet(6, 4, 3, weight_init_std=0.5, seed=1, backend=backend)
        histories[method] = train(
            net, data, iters=8, batch_size=10, lr=0.5, gradient=method, seed=2
        )
    np.testing.assert_allclose(
        histories["numerical"].losses, histories["backprop"].losses, atol=1e-7
    )
    assert histories["numerical"].losses[-1] < histories["numerical"].losses[0]


def test_a_deep_relu_net_learns_on_the_embedded_subset(backend, mini):
    net = fastgrad.MultiLayerNet(
        784, [50, 30], 10, "relu", weight_decay_lambda=1e-4, seed=0, backend=backend
    )
    history = train(net, mini, iters=300, batch_size=100, lr=0.1, seed=0)
    assert len(history.losses) == 300
    assert np.mean(history.losses[:10]) > 1.8 > 0.5 > np.mean(history.losses[-20:])
    assert history.final.test_acc > 0.8 and history.final.train_acc > 0.8  # chance: 0.1
    assert history.config["layer_sizes"] == [784, 50, 30, 10]
    assert history.config["activation"] == "relu"
    assert history.config["weight_decay_lambda"] == 1e-4
    assert history.config["backend"] == backend.name and history.config["dtype"] == "float64"


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_deep_net_numerical_training_matches_backprop(backend, activation):
    data = tiny_data()
    histories = {}
    for method in ("backprop", "numerical"):
        net = fastgrad.MultiLayerNet(
            6,
            [5, 4],
            3,
            activation,
            weight_init_std=0.5,
            weight_decay_lambda=0.01,
            seed=1,
            backend=backend,
        )
        histories[method] = train(
            net, data, iters=8, batch_size=10, lr=0.5, gradient=method, seed=2
        )
    np.testing.assert_allclose(
        histories["numerical"].losses, histories["backprop"].losses, atol=1e-7
    )
    assert histories["numerical"].losses[-1] < histories["numerical"].losses[0]


def test_deep_net_numerical_naive_agrees_with_numerical():
    data = tiny_data()

    def run(gradient):
        net = fastgrad.MultiLayerNet(6, [4, 3], 3, "sigmoid", weight_decay_lambda=0.1, seed=1)
        return train(net, data, iters=3, batch_size=10, lr=0.5, gradient=gradient, seed=2)

    with pytest.warns(SlowPathWarning, match="numerical-naive"):
        naive = run("numerical-naive")
    np.testing.assert_allclose(naive.losses, run("numerical").losses, atol=1e-9)


def test_numerical_naive_warns_and_agrees():
    data = tiny_data()
    net = fastgrad.TwoLayerNet(6, 4, 3, weight_init_std=0.5, seed=1)
    with pytest.warns(SlowPathWarning, match="numerical-naive"):
        naive = train(net, data, iters=3, batch_size=10, lr=0.5, gradient="numerical-naive", seed=2)
    fast = train(
        fastgrad.TwoLayerNet(6, 4, 3, weight_init_std=0.5, seed=1),
        data,
        iters=3,
        batch_size=10,
        lr=0.5,
        gradient="numerical",
        seed=2,
    )
    np.testing.assert_allclose(naive.losses, fast.losses, atol=1e-9)


def test_chunking_does_not_change_the_batches(monkeypatch):
    # Numerical runs call the backend ten steps at a time; batches must not depend on it.
    data = tiny_data(train_size=200)
    reference = train(fastgrad.TwoLayerNet(6, 4, 3, seed=0), data, iters=25, batch_size=10, seed=5)
    monkeypatch.setitem(fastgrad.train._STEPS_PER_CALL, "backprop", 3)
    chunked = train(fastgrad.TwoLayerNet(6, 4, 3, seed=0), data, iters=25, batch_size=10, seed=5)
    np.testing.assert_allclose(chunked.losses, reference.losses, rtol=1e-12)


def test_shuffle_sampling_covers_each_epoch_once():
    rng = np.random.default_rng(0)
    epoch = _draw_epoch(rng, "shuffle", 103, 10, 10)
    assert epoch.shape == (10, 10) and len(np.unique(epoch)) == 100
    big_batch = _draw_epoch(rng, "shuffle", 7, 1, 10)  # batch larger than the set
    assert np.bincount(big_batch.ravel(), minlength=7).min() >= 1
    choice = _draw_epoch(rng, "choice", 5, 4, 50)
    assert choice.shape == (4, 50) and set(np.unique(choice)) == set(range(5))


def test_shuffle_training_runs_and_learns():
    data = tiny_data(train_size=100)
    history = train(
        fastgrad.TwoLayerNet(6, 8, 3, seed=0),
        data,
        iters=60,
        batch_size=10,
        lr=0.5,
        sampling="shuffle",
        seed=0,
    )
    assert history.final.train_acc > 0.9
    assert [record.iteration for record in history.epochs] == [0, 10, 20, 30, 40, 50, 60]


def test_partial_last_epoch_and_no_epoch_evaluations():
    data = tiny_data(train_size=100)
    history = train(fastgrad.TwoLayerNet(6, 4, 3, seed=0), data, iters=25, batch_size=10, seed=0)
    assert [record.iteration for record in history.epochs] == [0, 10, 20, 25]
    assert history.final.epoch == 2.5
    quiet = train(
        fastgrad.TwoLayerNet(6, 4, 3, seed=0),
        data,
        iters=25,
        batch_size=10,
        seed=0,
        eval_every_epoch=False,
    )
    assert [record.iteration for record in quiet.epochs] == [25]


def test_callback_sees_progress():
    data = tiny_data(train_size=100)
    seen = []
    train(
        fastgrad.TwoLayerNet(6, 4, 3, seed=0),
        data,
        iters=30,
        batch_size=10,
        seed=0,
        callback=lambda history: seen.append((len(history.losses), len(history.epochs))),
    )
    assert seen[0] == (0, 1) and seen[-1] == (30, 4)
    assert [count for count, _ in seen] == sorted(count for count, _ in seen)


def test_divergence_stops_with_a_clear_error():
    # The sigmoid saturates, so only a rate that overflows float64 makes the loss infinite.
    net = fastgrad.TwoLayerNet(6, 4, 3, seed=0)
    expected = "iteration 2 is inf; try a smaller learning rate"
    with np.errstate(all="ignore"), pytest.raises(TrainingDivergedError, match=expected) as caught:
        train(net, tiny_data(), iters=50, batch_size=10, lr=1e308, seed=0)
    assert len(caught.value.history.losses) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"iters": -1}, "iters"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0}, "lr"),
        ({"gradient": "magic"}, "gradient"),
        ({"sampling": "sorted"}, "sampling"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        train(fastgrad.TwoLayerNet(6, 4, 3), tiny_data(), **settings)


def test_history_json_round_trip(tmp_path):
    data = tiny_data()
    history = train(fastgrad.TwoLayerNet(6, 4, 3, seed=0), data, iters=12, batch_size=10, seed=0)
    path = history.save(tmp_path / "history.json")
    loaded = TrainingHistory.load(path)
    assert loaded == history
    assert (
        loaded.train_acc_list == history.train_acc_list and loaded.train_loss_list == history.losses
    )
    with pytest.raises(ValueError, match=r"not a fastgrad\.TrainingHistory"):
        TrainingHistory.from_json('{"losses": []}')


def test_history_book_names():
    history = TrainingHistory(losses=[1.0], epochs=[EpochRecord(0.0, 0, 0.1, 0.2)])
    assert history.train_acc_list == [0.1] and history.test_acc_list == [0.2]
    assert TrainingHistory().final is None and TrainingHistory().steps_per_second == 0.0
