#!/usr/bin/env bash
# The GPU half of issue 19, on a machine with an NVIDIA GPU, in about 8 minutes:
# install the cuda extra, run the GPU tests and then the whole suite with the
# numba and cupy backends required, `fastgrad info`, the launch overhead of a
# numba.cuda kernel against the NVRTC RawKernel it replaced, and
# `fastgrad bench --full --peers` in the time left (a complete --full run takes
# longer; what finished is in the log).
#
# Usage: bash bench/gpu_check.sh [output dir]      (default: $OUT, else gpu-check/)
# Environment: PYTHON (python3), FASTGRAD_CUDA_EXTRA (cuda12x or cuda13x; default
# from the driver's CUDA version), FASTGRAD_WHEELHOUSE (a folder of wheels for
# machines without a package index), BUDGET_S (480).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
log="$out/gpu-check.log"
py="${PYTHON:-python3}"
start=$(date +%s)
budget="${BUDGET_S:-480}"
left() { echo $((budget - ($(date +%s) - start))); }
step() { echo; echo "=== $* ($(left) s left)"; }
status() { echo "--- exit $1"; summary+=("$1  $2"); }
summary=()
exec > >(tee -a "$log") 2>&1

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$py" --version

step "install"
extra="${FASTGRAD_CUDA_EXTRA:-}"
if [ -z "$extra" ]; then
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
    if [ "${cuda_major:-12}" -ge 13 ]; then extra=cuda13x; else extra=cuda12x; fi
fi
index=(--retries 0 --timeout 15)
if [ -n "${FASTGRAD_WHEELHOUSE:-}" ]; then index=(--no-index --find-links "$FASTGRAD_WHEELHOUSE"); fi
# No build isolation: an offline machine cannot fetch setuptools for it.
if ! timeout 120 "$py" -m pip install -q --no-build-isolation "${index[@]}" \
    -e ".[numba,$extra,plot,test]"; then
    echo "pip could not install fastgrad[$extra]: running from the source tree on what is installed"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -m pip list 2>/dev/null | grep -iE '^(cupy|numba|numba-cuda|cuda-bindings|cuda-core|llvmlite|numpy|torch|jax) '

export FASTGRAD_REQUIRE_BACKENDS=numba,cupy
xdist=()
if "$py" -c "import xdist" 2>/dev/null; then xdist=(-n 8 --dist loadfile); fi

step "GPU tests (-m gpu: every cupy test, the kernels on CuPy arrays)"
timeout 150 "$py" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests
status $? "GPU tests"

step "launch overhead: numba.cuda kernel vs the NVRTC RawKernel of the same body"
timeout 90 "$py" - "$out/launch_overhead.json" <<'PYTHON'
"""softmax_xent_rows (100 x 10 float64 logits, the chapter's batch) launched 2000 times each way."""
import json
import sys
import time

import cupy
import numpy as np
from numba import cuda

import fastgrad
from fastgrad.backends.cupy import cuda_kernels

# The CUDA C kernel that cuda_kernels.softmax_xent_rows replaced (warp shuffles),
# kept here only to time it.
SOURCE = r"""
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) { double w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}
extern "C" __global__ void softmax_xent_rows(const double* z_all, const double* bias,
        const long long* labels, long long rows, long long cols, double* row_loss,
        double* dlogits, double grad_divisor) {
    const int lane = threadIdx.x & 31;
    const long long wpb = blockDim.x >> 5;
    for (long long row = (long long)blockIdx.x * wpb + (threadIdx.x >> 5); row < rows;
         row += (long long)gridDim.x * wpb) {
        const double* z = z_all + row * cols;
        double top = __longlong_as_double(0xfff0000000000000LL);
        for (long long c = lane; c < cols; c += 32) { double v = z[c] + bias[c]; top = v > top ? v : top; }
        top = warp_max(top);
        double total = 0.0;
        for (long long c = lane; c < cols; c += 32) total += exp(z[c] + bias[c] - top);
        total = warp_sum(total);
        const double log_total = log(total);
        const long long label = labels[row];
        if (lane == 0) row_loss[row] = log_total - (z[label] + bias[label] - top);
        for (long long c = lane; c < cols; c += 32) {
            const double p = exp(z[c] + bias[c] - top - log_total);
            dlogits[row * cols + c] = (c == label ? p - 1.0 : p) / grad_divisor;
        }
    }
}
"""

gpu = fastgrad.get_backend("cupy")
device = cupy.cuda.Device()
rows, cols, threads = 100, 10, 256
rng = np.random.default_rng(0)
logits = cupy.asarray(rng.standard_normal((rows, cols)))
bias = cupy.asarray(rng.standard_normal(cols))
labels = cupy.asarray(rng.integers(0, cols, rows).astype(np.int64))
outputs = {name: (cupy.empty(rows), cupy.empty_like(logits)) for name in ("numba", "raw")}
stream = gpu._kernel_stream()
grid = cuda_kernels.grid_size(rows, threads // 32)
raw = cupy.RawModule(code=SOURCE).get_function("softmax_xent_rows")
kernel = cuda_kernels._softmax_xent_rows
shared = (threads + threads // 32) * 8
row_loss, dlogits = outputs["numba"]
arguments = (logits, bias, True, labels, row_loss, dlogits, True, 100.0)
wrapped = tuple(cuda.as_cuda_array(a, sync=False) if hasattr(a, "shape") else a for a in arguments)
specialized = kernel.specialize(*arguments)

ways = {
    "numba.cuda, CuPy arrays (the backend's call)": lambda: cuda_kernels.softmax_xent_rows(
        logits, bias, labels, *outputs["numba"], 100.0, threads=threads, stream=stream),
    "numba.cuda, arrays wrapped once": lambda: kernel[grid, threads, stream, shared](*wrapped),
    "numba.cuda, specialised, CuPy arrays": lambda: specialized[grid, threads, stream, shared](
        *arguments),
    "NVRTC RawKernel (before)": lambda: raw((grid,), (threads,), (
        logits, bias, labels, np.int64(rows), np.int64(cols), *outputs["raw"], np.float64(100.0))),
}
report = {}
for name, launch in ways.items():
    for _ in range(50):
        launch()
    device.synchronize()
    count = 2000
    begin = time.perf_counter()
    for _ in range(count):
        launch()
    queued = time.perf_counter()
    device.synchronize()
    done = time.perf_counter()
    first, last = cupy.cuda.Event(), cupy.cuda.Event()
    first.record()
    for _ in range(200):
        launch()
    last.record()
    last.synchronize()
    report[name] = {
        "host_us_per_launch": round((queued - begin) / count * 1e6, 2),
        "wall_us_per_launch_with_final_sync": round((done - begin) / count * 1e6, 2),
        "event_us_per_launch": round(cupy.cuda.get_elapsed_time(first, last) * 1e3 / 200, 2),
    }
    print(f"{name:46s} {report[name]}")
for a, b in zip(outputs["numba"], outputs["raw"], strict=True):
    np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(b), rtol=0, atol=1e-13)
print("numba.cuda and RawKernel results agree (1e-13)")
json.dump(report, open(sys.argv[1], "w"), indent=1)
PYTHON
status $? "launch overhead"

step "fastgrad info"
timeout 60 "$py" -m fastgrad info
status $? "fastgrad info"

step "the whole suite, numba and cupy required"
timeout $(( $(left) > 300 ? 240 : $(left) / 2 )) "$py" -m pytest -q -p no:cacheprovider -rfEs "${xdist[@]}"
status $? "whole suite (124: stopped at its time limit)"

step "fastgrad bench --full --peers (until the budget ends)"
remaining=$(left)
timeout $(( remaining > 60 ? remaining : 60 )) "$py" -m fastgrad bench --full --peers \
    --out "$out/bench"
status $? "fastgrad bench --full --peers (124: stopped at its time limit)"

step "summary: $(( $(date +%s) - start )) s in all"
printf '%s\n' "${summary[@]}"
