"""The CuPy backend's own code with its numba.cuda kernels launched under the simulator.

Runs only with ``NUMBA_ENABLE_CUDASIM=1`` (see ``conftest.py``). The backend
runs on NumPy arrays as in ``tests/test_cupy.py``, but with its custom
kernels on: every fused softmax cross-entropy, fused two-layer update and
numerical-gradient kernel is the real source, run by the simulator. The CuPy
elementwise kernels stay off (CuPy compiles them; the gpu tests run them), so
their call sites take the reference's expressions. The launch geometry is
shrunk and the grids capped, so that these small problems still span several
blocks and several grid-stride rounds.
"""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest

from fastgrad.backends.cupy import cuda_kernels
from tests import test_cupy
from tests.test_cupy import (
    FLOATS,
    REFERENCE,
    HostCupyBackend,
    _training_setup,
    assert_params_close,
    by_name,
    close,
    naive_numerical_gradient,
    net_on,
    network_of,
    random_params,
    sparse_inputs,
)

LAUNCHERS = (
    "softmax_xent_rows",
    "sgd_update_two_layer",
    "numgrad_output_layer",
    "numgrad_hidden_layer",
)


class SimulatedCupyBackend(HostCupyBackend):
    """The host CuPy backend with its numba.cuda kernels on, in small blocks."""

    custom_kernels = True
    block = 64
    reduce_block = 32
    hidden_tile = (16, 2)


class PrimitiveLoopBackend(SimulatedCupyBackend):
    """The simulated backend without its fused steps: models run their loop of primitives."""

    def fused_sgd_steps(self, network, X, labels, batch_indices, lr, gradient):
        return None


@pytest.fixture
def simulated(monkeypatch):
    """The simulated backend, its grids capped at 3 blocks.

    With the cap every launch strides over its work in several rounds, and
    the simulator spawns a few hundred Python threads a launch, not thousands.
    """
    monkeypatch.setattr(cuda_kernels, "MAX_GRID", 3)
    return SimulatedCupyBackend()


@pytest.fixture
def host_cupy(simulated):
    """What the host tests of ``tests/test_cupy.py`` run on here."""
    return simulated


@pytest.fixture(scope="module")
def small_problem():
    """The host tests' problem, smaller: 4 inputs, 20 hidden units (two 16-wide tiles)."""
    rng = np.random.default_rng(3)
    params = random_params(rng, (4, 20, 3))
    X = sparse_inputs(rng, 24, 4, zeros=0.5)
    labels = rng.integers(0, 3, 24).astype(np.int64)
    return types.SimpleNamespace(
        params=params,
        X=X,
        labels=labels,
        oracle=naive_numerical_gradient(params, X, labels),
    )


@pytest.fixture
def launches(monkeypatch):
    """How often each launcher ran, and with which geometry (the real launchers run)."""
    record = types.SimpleNamespace(counts=collections.Counter(), geometry={})
    for name in LAUNCHERS:
        launcher = getattr(cuda_kernels, name)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            record.counts[_name] += 1
            record.geometry[_name] = {k: v for k, v in kwargs.items() if k != "stream"}
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(cuda_kernels, name, counted)
    return record


# The host tests of tests/test_cupy.py that reach the custom kernels,
# collected here again: pytest resolves their `host_cupy` and `small_problem`
# fixtures to the ones above. (The ReLU net's end-to-end test launches no
# kernel that these do not, on the same paths.)
test_sgd_steps_on_host = test_cupy.test_sgd_steps_on_host
test_losses_and_gradients_on_host = test_cupy.test_losses_and_gradients_on_host
test_fast_numerical_gradient_on_host = test_cupy.test_fast_numerical_gradient_on_host


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_steps_equal_the_primitive_loop_step_by_step(simulated, launches, dtype):
    params, X, labels, batches = _training_setup(dtype, steps=3)
    fused, looped = net_on(simulated, params), net_on(PrimitiveLoopBackend(), params)
    for step in range(batches.shape[0]):
        rows = batches[step : step + 1]
        losses = simulated.fused_sgd_steps(fused.network(), X, labels, rows, 0.5, "backprop")
        assert losses is not None, "the fused path must serve the chapter's net"
        assert losses.dtype == np.float64 and losses.shape == (1,)
        np.testing.assert_allclose(losses, looped.sgd_steps(X, labels, rows, 0.5), **close(dtype))
        assert_params_close(fused, looped, dtype)
    # One fused update per step; both paths ran the softmax kernel once a step.
    assert launches.counts == {
        "sgd_update_two_layer": batches.shape[0],
        "softmax_xent_rows": 2 * batches.shape[0],
    }


@pytest.mark.parametrize(
    "case",
    ["deeper", "relu", "weight-decay", "fortran-W1", "mixed-dtype", "numerical", "empty-batch"],
)
def test_fused_steps_serve_only_the_chapter_net(simulated, launches, case):
    """Everything else returns None, and the model's loop gives the reference's steps."""
    rng = np.random.default_rng(6)
    params = random_params(rng, (10, 6, 5, 4) if case == "deeper" else (10, 6, 4))
    if case == "fortran-W1":
        params["W1"] = np.asfortranarray(params["W1"])
    X = sparse_inputs(rng, 30, 10, zeros=0.5)
    if case == "mixed-dtype":
        X = X.astype(np.float32)
    labels = rng.integers(0, 4, 30)
    batch_size = 0 if case == "empty-batch" else 6
    batches = np.stack([rng.choice(30, batch_size, replace=False) for _ in range(2)])
    activation = "relu" if case == "relu" else "sigmoid"
    weight_decay = 0.1 if case == "weight-decay" else 0.0
    gradient = "numerical" if case == "numerical" else "backprop"
    network = network_of(params, activation, weight_decay)
    assert simulated.fused_sgd_steps(network, X, labels, batches, 0.1, gradient) is None
    if case == "empty-batch":
        return  # the loss of an empty batch is undefined; nothing else to run
    net = net_on(simulated, params, activation, weight_decay)
    expected = net_on(REFERENCE, params, activation, weight_decay)
    np.testing.assert_allclose(
        net.sgd_steps(X, labels, batches, 0.1, gradient),
        expected.sgd_steps(X, labels, batches, 0.1, gradient),
        **close(np.float64),
    )
    assert_params_close(net, expected, np.float64)
    assert launches.counts["sgd_update_two_layer"] == 0
    if case == "fortran-W1":
        assert net.params["W1"].flags.f_contiguous, "updated in place, in its own layout"


@pytest.mark.parametrize(
    "sizes,activation",
    [((6, 5, 3), "relu"), ((6, 5, 4, 3), "sigmoid")],
    ids=["relu", "deeper"],
)
def test_numgrad_kernels_serve_only_one_hidden_sigmoid_layer(
    simulated, launches, sizes, activation
):
    """Other nets run the reference's differences on the device, with the same values."""
    rng = np.random.default_rng(14)
    params = random_params(rng, sizes)
    X = sparse_inputs(rng, 9, sizes[0], zeros=0.5)
    labels = rng.integers(0, sizes[-1], 9)
    network = network_of(params, activation, 0.2)
    grads = by_name(simulated.network_numerical_gradient(network, X, labels, 1e-4))
    want = by_name(REFERENCE.network_numerical_gradient(network, X, labels, 1e-4))
    assert not launches.counts["numgrad_output_layer"] + launches.counts["numgrad_hidden_layer"]
    for name in params:
        np.testing.assert_allclose(grads[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_fused_path_really_ran_the_kernels(simulated, launches):
    params, X, labels, batches = _training_setup(np.float64)
    net = net_on(simulated, params)
    net.sgd_steps(X, labels, batches, 0.1)
    simulated.network_numerical_gradient(net.network(), X, labels, 1e-4)
    assert launches.counts == {
        "softmax_xent_rows": 3,
        "sgd_update_two_layer": 3,
        "numgrad_output_layer": 1,
        "numgrad_hidden_layer": 1,
    }
    # The backend's geometry reaches the launches; the launchers size the grid.
    assert launches.geometry == {
        "softmax_xent_rows": {"threads": simulated.block},
        "sgd_update_two_layer": {"threads": simulated.block},
        "numgrad_output_layer": {"threads": simulated.reduce_block},
        "numgrad_hidden_layer": {"tile": simulated.hidden_tile},
    }


def test_fused_path_falls_back_for_non_contiguous_params(simulated, launches):
    params, X, labels, batches = _training_setup(np.float64)
    params["W1"] = np.asfortranarray(params["W1"])
    net, expected = net_on(simulated, params), net_on(REFERENCE, params)
    expected.sgd_steps(X, labels, batches, 0.1)
    net.sgd_steps(X, labels, batches, 0.1)
    assert launches.counts["sgd_update_two_layer"] == 0
    np.testing.assert_allclose(net.params["W1"], expected.params["W1"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", FLOATS)
def test_warmup_launches_every_kernel(simulated, launches, dtype):
    assert simulated.warmup(dtype) >= 0.0
    assert set(launches.counts) == set(LAUNCHERS)
