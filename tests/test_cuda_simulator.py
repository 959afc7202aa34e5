"""The numba.cuda kernels' own source, run on the CPU: simulated, and compiled for a GPU.

Numba chooses between its CUDA simulator and the real CUDA target when
``numba.cuda`` is first imported, from ``NUMBA_ENABLE_CUDASIM``, so the
simulated tests (``tests/cuda_kernels/``) run in a fresh interpreter started
here, with the variable set; the rest of the suite keeps Numba's normal CPU
target. Run them directly with
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_kernels``.

The simulator runs the kernels as Python, so it cannot show that the CUDA
target types and compiles them: a second fresh interpreter compiles each
kernel to PTX for sm_90 with numba-cuda and NVVM, which needs no GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import import_extra_or_skip

ROOT = Path(__file__).resolve().parents[1]
SIMULATED_TESTS = ROOT / "tests" / "cuda_kernels"


@pytest.fixture(scope="module")
def numba_cuda():
    """numba-cuda, installed by the test extra (a failure where that extra is required)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("this run is simulated itself: it collects tests/cuda_kernels in-process")
    return import_extra_or_skip("test", "numba_cuda")


@pytest.mark.slow
def test_cuda_kernels_under_the_simulator(numba_cuda):
    command = [
        sys.executable, "-m", "pytest", str(SIMULATED_TESTS),
        "-q", "-p", "no:cacheprovider", "--durations=5",
    ]  # fmt: skip
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the simulated kernel tests failed:\n{output[-20000:]}"
    summary = output.strip().splitlines()[-1]
    # Nothing may be skipped there: a skip would be a kernel CI no longer runs.
    assert re.fullmatch(r"=* ?\d+ passed in [\d.]+s( \(\S+\))? ?=*", summary), summary


# Each kernel's argument types, as the backend launches it: (array dtype,
# ndim) pairs for arrays, numba scalar type names otherwise. "T" is float32
# or float64, the parameters' and logits' dtype.
KERNEL_SIGNATURES = {
    "_softmax_xent_rows": [
        ("T", 2), ("T", 1), "boolean", ("int64", 1), ("float64", 1), ("T", 2), "boolean",
        "float64",
    ],
    "_sgd_update_two_layer": [
        ("T", 1), ("T", 1), ("T", 1), ("T", 2), ("T", 1), ("T", 1), ("T", 1), ("T", 2),
        "float64",
    ],
    "_numgrad_output_layer": [
        ("float64", 2), ("float64", 2), ("int64", 1), "float64", "float64", ("float64", 2),
    ],
    "_numgrad_hidden_layer": [
        *[("float64", 2)] * 5, ("int64", 1), "float64", "float64", ("float64", 2),
    ],
}  # fmt: skip

# Compiles every kernel for sm_90 and prints, per kernel and dtype, the PTX's
# entry points and barrier count. numba-cuda asks the current device for the
# compute capability of device functions; with no GPU, it is told sm_90.
PTX_SCRIPT = r"""
import json, sys, types
import numba.cuda.dispatcher as dispatcher
from numba import cuda, types as nb
from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from fastgrad.backends.cupy import cuda_kernels

def argument(spec, dtype):
    if isinstance(spec, str):
        return getattr(nb, spec)
    name, ndim = spec
    return nb.Array(getattr(nb, dtype if name == "T" else name), ndim, "C")

report = {}
for name, specs in json.loads(sys.argv[1]).items():
    kernel = getattr(cuda_kernels, name).py_func
    for dtype in ("float32", "float64") if any("T" in str(s) for s in specs) else ("float64",):
        signature = tuple(argument(spec, dtype) for spec in specs)
        try:
            ptx, _ = cuda.compile_ptx(kernel, signature, cc=(9, 0))
        except (CudaSupportError, NvvmSupportError, OSError, RuntimeError) as error:
            if "nvrtc" in str(error).lower() or "nvvm" in str(error).lower():
                print(json.dumps({"skip": str(error).splitlines()[0]}))
                sys.exit(0)
            raise
        report[f"{name}[{dtype}]"] = {
            "entries": ptx.count(".entry"), "barriers": ptx.count("bar.sync"),
            "shuffles": ptx.count("shfl."),
        }
print(json.dumps(report))
"""


@pytest.mark.slow
def test_cuda_kernels_compile_to_ptx(numba_cuda):
    result = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT, json.dumps(KERNEL_SIGNATURES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(
            f"numba-cuda cannot compile to PTX here ({report['skip']}): it needs NVVM and "
            "NVRTC, e.g. pip install 'numba-cuda[cu13]'"
        )
    barriers = {
        "_softmax_xent_rows": 4,  # two warp reductions, two barriers each
        "_sgd_update_two_layer": 0,
        "_numgrad_output_layer": 3,  # the block sum
        "_numgrad_hidden_layer": 2,  # the tile's partial sums, then their reuse
    }
    assert len(report) == 6
    for key, facts in report.items():
        assert facts["entries"] == 1, key
        assert facts["shuffles"] == 0, f"{key}: the simulator has no warp shuffles"
        assert facts["barriers"] == barriers[key.split("[")[0]], key
