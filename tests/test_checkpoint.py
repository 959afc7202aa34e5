"""Saving and loading parameters: exact round trips of any net, across backends, checked files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastgrad
from fastgrad.checkpoint import load_params, save_params
from tests.conftest import to_host


def assert_same_params(loaded, net) -> None:
    assert list(loaded.params) == list(net.params)
    for name in net.params:
        np.testing.assert_array_equal(
            to_host(loaded.backend, loaded.params[name]), to_host(net.backend, net.params[name])
        )


def snapshot(net) -> dict[str, np.ndarray]:
    return {name: to_host(net.backend, array).copy() for name, array in net.params.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_trip_on_every_backend(backend, tmp_path, dtype):
    net = fastgrad.TwoLayerNet(5, 4, 3, seed=0, dtype=dtype, backend=backend)
    net.params["b2"] += 0.25  # not just the initial zeros
    path = save_params(net, tmp_path / "params.npz")
    for target in (backend, "numpy"):
        loaded = load_params(path, backend=target)
        assert type(loaded) is fastgrad.TwoLayerNet
        assert loaded.backend.name == fastgrad.get_backend(target).name
        assert loaded.dtype == np.dtype(dtype)
        assert_same_params(loaded, net)
    into = fastgrad.TwoLayerNet(5, 4, 3, seed=9, dtype=dtype, backend=backend)
    assert load_params(path, into) is into
    assert_same_params(into, net)
    x = np.random.default_rng(0).random((7, 5)).astype(dtype)
    np.testing.assert_array_equal(
        to_host(backend, into.predict(backend.asarray(x))),
        to_host(backend, net.predict(backend.asarray(x))),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda backend: fastgrad.MultiLayerNet(6, [5, 4, 3], 2, "relu", seed=1, backend=backend),
        lambda backend: fastgrad.MultiLayerNet(
            6, [4], 3, "tanh", "xavier", 0.05, dtype=np.float32, seed=2, backend=backend
        ),
        lambda backend: fastgrad.MultiLayerNet(6, [], 3, "identity", 0.1, seed=3, backend=backend),
    ],
    ids=["relu-3-layers", "tanh-decay-float32", "softmax-regression"],
)
def test_any_multilayer_net_round_trips_with_its_architecture(backend, tmp_path, make):
    net = make(backend)
    path = save_params(net, tmp_path / "params.npz")
    loaded = load_params(path, backend=backend)
    assert type(loaded) is fastgrad.MultiLayerNet
    assert loaded.architecture == net.architecture and loaded.dtype == net.dtype
    assert_same_params(loaded, net)
    into = make(backend)
    for array in into.params.values():
        array += 1.0
    assert load_params(path, into) is into
    assert_same_params(into, net)


def test_the_record_is_a_json_string_not_a_pickle(tmp_path):
    net = fastgrad.MultiLayerNet(4, [3, 3], 2, "relu", weight_decay_lambda=0.1, seed=0)
    path = save_params(net, tmp_path / "params.npz")
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        record = json.loads(str(archive["architecture"][()]))
        assert archive["architecture"].dtype.kind == "U"
    assert names == {*net.params, "architecture"}
    assert record["class"] == "MultiLayerNet"
    assert {key: record[key] for key in net.architecture} == net.architecture
    assert json.loads(json.dumps(record)) == record  # plain JSON values only


def test_a_two_layer_file_loads_into_the_same_multilayer_net_and_back(tmp_path):
    chapter = fastgrad.TwoLayerNet(5, 4, 3, seed=0)
    path = save_params(chapter, tmp_path / "chapter.npz")
    general = fastgrad.MultiLayerNet(5, [4], 3, "sigmoid", seed=1)
    assert_same_params(load_params(path, general), chapter)
    back = save_params(general, tmp_path / "general.npz")
    assert type(load_params(back)) is fastgrad.MultiLayerNet
    assert_same_params(load_params(back, fastgrad.TwoLayerNet(5, 4, 3, seed=2)), chapter)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            lambda: fastgrad.MultiLayerNet(784, [50], 10, "relu"),
            "the file's net has hidden layers [100, 100] but this one has [50]",
        ),
        (
            lambda: fastgrad.MultiLayerNet(784, [100, 100], 10, "sigmoid"),
            "the file's net has activation 'relu' but this one has 'sigmoid'",
        ),
        (
            lambda: fastgrad.MultiLayerNet(784, [100, 100], 10, "relu", weight_decay_lambda=0.1),
            "the file's net has weight decay 0.0 but this one has 0.1",
        ),
        (
            lambda: fastgrad.MultiLayerNet(400, [100, 100], 5, "relu"),
            "the file's net has input size 784 but this one has 400; the file's net has "
            "output size 10 but this one has 5",
        ),
        (
            lambda: fastgrad.MultiLayerNet(784, [100, 100], 10, "relu", dtype=np.float32),
            "the file's net has dtype 'float64' but this one has 'float32'",
        ),
        (
            lambda: fastgrad.TwoLayerNet(784, 50, 10),
            "the file's net has hidden layers [100, 100] but this one has [50]; the file's net "
            "has activation 'relu' but this one has 'sigmoid'",
        ),
    ],
    ids=["hidden", "activation", "weight-decay", "sizes", "dtype", "class"],
)
def test_load_refuses_another_architecture_naming_the_difference(tmp_path, target, message):
    path = save_params(fastgrad.MultiLayerNet(784, [100, 100], 10, "relu", seed=0), tmp_path / "p")
    net = target()
    before = snapshot(net)
    with pytest.raises(ValueError) as raised:
        load_params(path, net)
    text = str(raised.value)
    assert message in text and "\n" not in text
    assert "load without net=" in text
    for name, array in before.items():  # untouched
        np.testing.assert_array_equal(net.params[name], array)


def test_old_files_without_a_record_load_as_two_layer_nets(tmp_path):
    # What the previous version wrote: exactly W1, b1, W2, b2.
    rng = np.random.default_rng(0)
    old = {
        "W1": rng.random((6, 4)), "b1": rng.random(4), "W2": rng.random((4, 3)), "b2": rng.random(3)
    }
    np.savez(tmp_path / "old.npz", **old)
    loaded = load_params(tmp_path / "old.npz")
    assert type(loaded) is fastgrad.TwoLayerNet
    assert loaded.layer_sizes == [6, 4, 3] and loaded.activation == "sigmoid"
    for name, value in old.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    into = fastgrad.TwoLayerNet(6, 4, 3, seed=1)
    assert load_params(tmp_path / "old.npz", into) is into
    with pytest.raises(ValueError, match=r"hidden layers \[4\] but this one has \[6\]"):
        load_params(tmp_path / "old.npz", fastgrad.TwoLayerNet(6, 6, 3))
    with pytest.raises(ValueError, match="activation 'sigmoid' but this one has 'relu'"):
        load_params(tmp_path / "old.npz", fastgrad.MultiLayerNet(6, [4], 3, "relu"))


def test_load_refuses_bad_files(tmp_path):
    np.savez(tmp_path / "partial.npz", W1=np.zeros((2, 3)), b1=np.zeros(3))
    with pytest.raises(ValueError, match="missing W2, b2"):
        load_params(tmp_path / "partial.npz")
    np.savez(
        tmp_path / "inconsistent.npz",
        W1=np.zeros((2, 3)),
        b1=np.zeros(4),
        W2=np.zeros((3, 2)),
        b2=np.zeros(2),
    )
    with pytest.raises(ValueError, match=r"do not fit together: b1 is \(4,\)"):
        load_params(tmp_path / "inconsistent.npz")
    np.savez(
        tmp_path / "ints.npz",
        W1=np.zeros((2, 3), int),
        b1=np.zeros(3),
        W2=np.zeros((3, 2)),
        b2=np.zeros(2),
    )
    with pytest.raises(ValueError, match="float32 or float64"):
        load_params(tmp_path / "ints.npz")
    np.savez(
        tmp_path / "mixed.npz",
        W1=np.zeros((2, 3), np.float32),
        b1=np.zeros(3),
        W2=np.zeros((3, 2)),
        b2=np.zeros(2),
    )
    with pytest.raises(ValueError, match="mixed dtypes"):
        load_params(tmp_path / "mixed.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_params(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "absent.npz")


def record_file(path, net, **changes):
    """``net``'s checkpoint with its record edited (``None`` removes a key)."""
    save_params(net, path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    record = json.loads(str(arrays.pop("architecture")[()]))
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    np.savez(path, **arrays, architecture=np.array(json.dumps(record)))
    return arrays


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class": "ConvNet"}, "class 'ConvNet' is not one of"),
        ({"activation": "softplus"}, "activation 'softplus' is not one of"),
        ({"layer_sizes": [4]}, "layer_sizes [4] is not a list of at least two"),
        ({"layer_sizes": [4, 0, 2]}, "layer_sizes [4, 0, 2]"),
        ({"weight_decay_lambda": -1}, "weight_decay_lambda -1 is not a finite number"),
        ({"format": "something else"}, "not a fastgrad.params record"),
        ({"class": "TwoLayerNet"}, "a TwoLayerNet has one sigmoid hidden layer"),
    ],
)
def test_load_refuses_a_damaged_record(tmp_path, changes, message):
    net = fastgrad.MultiLayerNet(4, [3, 3], 2, "relu", seed=0)
    record_file(tmp_path / "p.npz", net, **changes)
    with pytest.raises(ValueError, match="damaged architecture record") as raised:
        load_params(tmp_path / "p.npz")
    assert message in str(raised.value)


def test_load_refuses_newer_files_and_arrays_that_do_not_fit_the_record(tmp_path):
    net = fastgrad.MultiLayerNet(4, [3, 3], 2, "relu", seed=0)
    record_file(tmp_path / "newer.npz", net, version=99)
    with pytest.raises(ValueError, match="newer fastgrad"):
        load_params(tmp_path / "newer.npz")
    # The record says three hidden layers, the arrays hold two.
    record_file(tmp_path / "short.npz", net, layer_sizes=[4, 3, 3, 3, 2])
    with pytest.raises(ValueError, match="lacks W4, b4 of its 4-3-3-3-2 net"):
        load_params(tmp_path / "short.npz")
    record_file(tmp_path / "long.npz", net, layer_sizes=[4, 3, 2])
    with pytest.raises(ValueError, match="holds arrays a 4-3-2 net does not have: W3, b3"):
        load_params(tmp_path / "long.npz")
    record_file(tmp_path / "wide.npz", net, layer_sizes=[4, 3, 5, 2])
    with pytest.raises(ValueError, match=r"do not fit together: W2 is \(3, 3\)"):
        load_params(tmp_path / "wide.npz")


def test_a_failed_load_leaves_the_net_as_it_was(tmp_path):
    # The mismatch is in the last layer, after the first arrays have been read.
    net = fastgrad.MultiLayerNet(4, [3, 3], 2, "relu", seed=0)
    arrays = record_file(tmp_path / "p.npz", net)
    arrays["b3"] = np.zeros(5)
    record = json.dumps({"format": "fastgrad.params", "version": 2, "class": "MultiLayerNet",
                         **net.architecture})
    np.savez(tmp_path / "p.npz", **arrays, architecture=np.array(record))
    target = fastgrad.MultiLayerNet(4, [3, 3], 2, "relu", seed=5)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"b3 is \(5,\)"):
        load_params(tmp_path / "p.npz", target)
    for name, array in before.items():
        np.testing.assert_array_equal(target.params[name], array)


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "params.npz"
    save_params(fastgrad.TwoLayerNet(3, 2, 2, seed=0), path)
    save_params(fastgrad.MultiLayerNet(3, [2, 2], 2, seed=1), path)
    assert [p.name for p in tmp_path.iterdir()] == ["params.npz"]  # no temporary files left
    expected = fastgrad.MultiLayerNet(3, [2, 2], 2, seed=1).params["W3"]
    np.testing.assert_array_equal(load_params(path).params["W3"], expected)
