"""Saving and loading parameters: exact round trips, across backends, checked shapes."""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad
from fastgrad.checkpoint import load_params, save_params
from tests.conftest import to_host

NAMES = ("W1", "b1", "W2", "b2")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_trip_on_every_backend(backend, tmp_path, dtype):
    net = fastgrad.TwoLayerNet(5, 4, 3, seed=0, dtype=dtype, backend=backend)
    net.params["b2"] += 0.25  # not just the initial zeros
    path = save_params(net, tmp_path / "params.npz")
    for target in (backend, "numpy"):
        loaded = load_params(path, backend=target)
        assert loaded.backend.name == fastgrad.get_backend(target).name
        assert loaded.dtype == np.dtype(dtype)
        for name in NAMES:
            np.testing.assert_array_equal(
                to_host(loaded.backend, loaded.params[name]), to_host(backend, net.params[name])
            )
    into = fastgrad.TwoLayerNet(5, 4, 3, seed=9, dtype=dtype, backend=backend)
    assert load_params(path, into) is into
    np.testing.assert_array_equal(
        to_host(backend, into.params["W1"]), to_host(backend, net.params["W1"])
    )
    x = np.random.default_rng(0).random((7, 5)).astype(dtype)
    np.testing.assert_array_equal(
        to_host(backend, into.predict(backend.asarray(x))),
        to_host(backend, net.predict(backend.asarray(x))),
    )


def test_load_refuses_mismatched_network(tmp_path):
    path = save_params(fastgrad.TwoLayerNet(5, 4, 3, seed=0), tmp_path / "params.npz")
    target = fastgrad.TwoLayerNet(5, 6, 3, seed=0)
    before = target.params["W1"].copy()
    with pytest.raises(
        ValueError, match=r"W1 is float64\[5, 4\] but the network needs float64\[5, 6\]"
    ):
        load_params(path, target)
    np.testing.assert_array_equal(target.params["W1"], before)  # untouched
    with pytest.raises(ValueError, match="float32"):
        load_params(path, fastgrad.TwoLayerNet(5, 4, 3, dtype=np.float32))


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
    with pytest.raises(ValueError, match="do not fit together"):
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
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_params(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "absent.npz")


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "params.npz"
    save_params(fastgrad.TwoLayerNet(3, 2, 2, seed=0), path)
    save_params(fastgrad.TwoLayerNet(3, 2, 2, seed=1), path)
    assert [p.name for p in tmp_path.iterdir()] == ["params.npz"]  # no temporary files left
    expected = fastgrad.TwoLayerNet(3, 2, 2, seed=1).params["W1"]
    np.testing.assert_array_equal(load_params(path).params["W1"], expected)
