"""Where the numba.cuda kernels' tests run: under the CUDA simulator, or on a GPU.

Numba picks the simulator or the real CUDA target once, when ``numba.cuda``
is first imported, from ``NUMBA_ENABLE_CUDASIM``; so one interpreter runs one
of them. ``tests/test_cuda_simulator.py`` runs this directory in a fresh
interpreter with the simulator on, where every file here runs on NumPy
arrays. A normal run (the real target) collects ``test_kernels.py`` only
where the CuPy backend has a GPU, to launch the same cases on CuPy arrays,
and nothing here otherwise.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastgrad
from fastgrad.backends import unavailable_reason

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIMULATOR:
    collect_ignore: list[str] = []
    # The simulator runs each CUDA thread as a Python thread and releases a
    # barrier only when every thread of the block has reached it; with the
    # default 5 ms switch interval, each barrier waits for several forced
    # switches. A shorter interval makes the suite about three times faster.
    sys.setswitchinterval(5e-4)
elif unavailable_reason("cupy") is None:
    collect_ignore = ["test_simulated_backend.py"]
else:
    collect_ignore = ["test_kernels.py", "test_simulated_backend.py"]


class Device(types.SimpleNamespace):
    """Where the kernels run: ``asarray`` there, ``to_numpy`` back, the launch ``stream``."""

    name: str
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    stream: Callable[[], Any]


@pytest.fixture(scope="session")
def device() -> Device:
    """The simulator on host arrays, or the GPU on CuPy arrays on CuPy's current stream."""
    if SIMULATOR:
        return Device(name="simulator", asarray=np.array, to_numpy=np.asarray, stream=lambda: 0)
    gpu = fastgrad.get_backend("cupy")
    return Device(
        name="gpu",
        asarray=gpu.asarray,
        to_numpy=gpu.to_numpy,
        stream=gpu._kernel_stream,  # type: ignore[attr-defined]
    )
