"""CUDA C sources of the CuPy backend, and their lazy, cached compilation.

Every kernel is a module-level string here so that it can be read, compiled by
``nvcc`` in the test suite on machines without a GPU, and transliterated to
NumPy for CPU tests of its index arithmetic. Importing this module does not
import CuPy; the first call of :func:`elementwise_kernel` or
:func:`raw_kernel` does, and compiles (with NVRTC, through CuPy) only the
kernel asked for, once per process.

Conventions shared by all sources: arrays are C-contiguous, sizes and indices
are ``long long`` (an index never overflows at 2**31 elements), loops are
grid-stride so any launch size covers any problem size, and no source includes
a header (NVRTC has no host headers; CUDA's math functions are builtins).

Examples
--------
>>> from fastgrad.backends import _cupy_kernels
>>> sorted(_cupy_kernels.cuda_sources())[:2]
['bias_sigmoid', 'numgrad_hidden_layer']
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ELEMENTWISE_KERNELS",
    "HIDDEN_TILE",
    "RAW_KERNELS",
    "ElementwiseSpec",
    "RawSpec",
    "cuda_sources",
    "elementwise_kernel",
    "grid_size",
    "raw_kernel",
]

# Threads per block of the one-dimensional kernels: 8 warps, enough to hide
# latency on any GPU since Kepler while leaving room for many resident blocks.
BLOCK = 256
# Threads per block of the per-parameter reduction over samples.
REDUCE_BLOCK = 128
# (x, y) block of the hidden-layer numerical gradient: x runs over hidden units
# and is one warp wide, so every warp shares one sample and one input pixel
# (see NUMGRAD_HIDDEN_LAYER for why that matters).
HIDDEN_TILE = (32, 8)
# Largest grid launched; grid-stride loops cover anything larger. Well under
# the 2**31 - 1 limit of gridDim.x, and thousands of blocks per SM already.
MAX_GRID = 65535


def grid_size(work_items: int, per_block: int) -> int:
    """Blocks for ``work_items`` items at ``per_block`` items per block, capped.

    Examples
    --------
    >>> grid_size(1000, 256), grid_size(0, 256), grid_size(10**9, 256)
    (4, 1, 65535)
    """
    return max(1, min(MAX_GRID, -(-work_items // per_block)))


# --------------------------------------------------------------------- preamble
# Shared device helpers. Templates over the floating type so that float32 and
# float64 use one source; the sigmoid is the overflow-safe form of the NumPy
# reference (exp(-|x|) never overflows), so both backends round alike.
DEVICE_HELPERS = r"""
template <typename T>
__device__ __forceinline__ T fg_sigmoid(T x) {
    const T e = exp(-fabs(x));
    const T positive = T(1) / (T(1) + e);
    return x >= T(0) ? positive : e * positive;
}

// Butterfly reductions over one full warp: every lane ends with the result, so
// no lane has to broadcast it. Callers keep all 32 lanes converged.
__device__ __forceinline__ double fg_warp_sum(double value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    return value;
}

__device__ __forceinline__ double fg_warp_max(double value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double other = __shfl_xor_sync(0xffffffffu, value, offset);
        value = other > value ? other : value;
    }
    return value;
}

// Sum of one value per thread of a 1-D block; the result is valid in thread 0.
// `warp_sums` is shared memory for blockDim.x / 32 doubles. A fixed tree, not
// atomics, so the sum (and every gradient built from it) is bit-reproducible.
// Ends with a barrier, so the caller may reuse `warp_sums` at once.
__device__ __forceinline__ double fg_block_sum(double value, double* warp_sums) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    value = fg_warp_sum(value);
    if (lane == 0) {
        warp_sums[warp] = value;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        value = lane < warps ? warp_sums[lane] : 0.0;
        value = fg_warp_sum(value);
    }
    __syncthreads();
    return value;
}
"""


# ------------------------------------------------------------ elementwise bodies
@dataclass(frozen=True)
class ElementwiseSpec:
    """An ``ElementwiseKernel``: CuPy parameter lists and the per-element body."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str = ""


SIGMOID = ElementwiseSpec("sigmoid", "T x", "T y", "y = fg_sigmoid(x);", DEVICE_HELPERS)

SIGMOID_GRAD = ElementwiseSpec(
    "sigmoid_grad",
    "T x",
    "T y",
    "const T s = fg_sigmoid(x); y = (T(1) - s) * s;",
    DEVICE_HELPERS,
)

# The hidden layer of the forward pass, written into the matrix product's own
# buffer (z is read and overwritten): one pass over N x H instead of an add
# and a sigmoid that each read and write it.
BIAS_SIGMOID = ElementwiseSpec(
    "bias_sigmoid", "T b", "T z", "z = fg_sigmoid(z + b);", DEVICE_HELPERS
)

# Backward through the sigmoid, in place on the incoming gradient: d *= h (1 - h).
SIGMOID_BACKWARD = ElementwiseSpec(
    "sigmoid_backward", "T hidden", "T grad", "grad = grad * (hidden * (T(1) - hidden));"
)

# Row r of the stack is `flat` moved by `step` at element start + r. The sum is
# formed exactly as the reference's `flat[c] + h`, so the values are identical.
PERTURBED_STACK = ElementwiseSpec(
    "perturbed_stack",
    "raw T flat, int64 width, int64 start, T step",
    "T stack",
    "const long long row = i / width;"
    " const long long column = i - row * width;"
    " stack = column == start + row ? flat[column] + step : flat[column];",
)

ELEMENTWISE_KERNELS: dict[str, ElementwiseSpec] = {
    spec.name: spec
    for spec in (SIGMOID, SIGMOID_GRAD, BIAS_SIGMOID, SIGMOID_BACKWARD, PERTURBED_STACK)
}


# ----------------------------------------------------------------- raw kernels
@dataclass(frozen=True)
class RawSpec:
    """A ``RawModule`` source and the kernel instantiations compiled from it."""

    name: str
    source: str
    #: C++ names of the kernels to compile, e.g. ``"softmax_xent_rows<double>"``.
    instantiations: tuple[str, ...]
    #: The kernel's full parameter list, for explicit instantiation under nvcc.
    signature: str


SOFTMAX_XENT_ROWS = r"""
// Fused softmax cross-entropy, forward and (optionally) backward.
//
// One warp per row, rows grid-strided over all warps of the grid: the 32 lanes
// stride over the columns, then max and sum meet in warp shuffles, with no
// shared memory and no barrier. Every lane of a warp walks the same rows, so
// the shuffles always see all 32 lanes converged. The row's loss goes to
// row_loss[row] (summed afterwards by a deterministic reduction) rather than
// to one atomicAdd target, which would make the loss depend on timing.
//
// Arithmetic is double for both float32 and float64 logits: a row holds few
// values, the kernel is bound by its memory traffic and launch, and a float64
// log-sum-exp keeps the float32 loss within rounding of the reference.
// `bias` (added to every row) may be null; so may `dlogits`, for the forward
// pass alone. dlogits = (softmax - onehot) / grad_divisor, the reference's
// formula, with p taken as exp(log p) as the reference does.
template <typename T>
__global__ void softmax_xent_rows(const T* __restrict__ logits,
                                  const T* __restrict__ bias,
                                  const long long* __restrict__ labels,
                                  const long long rows,
                                  const long long cols,
                                  double* __restrict__ row_loss,
                                  T* __restrict__ dlogits,
                                  const double grad_divisor) {
    const int lane = threadIdx.x & 31;
    const long long warps_per_block = blockDim.x >> 5;
    const long long first_row = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    const long long row_stride = (long long)gridDim.x * warps_per_block;
    const double negative_infinity = __longlong_as_double((long long)0xfff0000000000000ULL);
    for (long long row = first_row; row < rows; row += row_stride) {
        const T* z = logits + row * cols;
        double top = negative_infinity;
        for (long long c = lane; c < cols; c += 32) {
            const double value = (double)z[c] + (bias ? (double)bias[c] : 0.0);
            top = value > top ? value : top;
        }
        top = fg_warp_max(top);
        double total = 0.0;
        for (long long c = lane; c < cols; c += 32) {
            total += exp((double)z[c] + (bias ? (double)bias[c] : 0.0) - top);
        }
        total = fg_warp_sum(total);
        const double log_total = log(total);
        const long long label = labels[row];
        if (lane == 0) {
            const double picked = (double)z[label] + (bias ? (double)bias[label] : 0.0);
            row_loss[row] = log_total - (picked - top);
        }
        if (dlogits != nullptr) {
            T* d = dlogits + row * cols;
            for (long long c = lane; c < cols; c += 32) {
                const double shifted = (double)z[c] + (bias ? (double)bias[c] : 0.0) - top;
                const double p = exp(shifted - log_total);
                d[c] = (T)((c == label ? p - 1.0 : p) / grad_divisor);
            }
        }
    }
}
"""

SGD_UPDATE_TWO_LAYER = r"""
// The SGD update of all four TwoLayerNet parameters in one launch, with the
// bias gradients (column sums of the layer's output gradient) fused in.
//
// The flat index space is W1 | b1 | W2 | b2; each index belongs to exactly one
// thread, so every parameter element is written once and no atomics are
// needed. A bias thread sums its column over the batch rows itself; adjacent
// threads read adjacent columns, so those loads coalesce. The column sum is
// accumulated in double (for float32 too) and the update is done in T, like
// the reference's `param -= lr * grad`.
template <typename T>
__global__ void sgd_update_two_layer(T* __restrict__ W1, const T* __restrict__ grad_W1,
                                     const long long size_W1,
                                     T* __restrict__ b1, const T* __restrict__ grad_hidden,
                                     const long long hidden_size,
                                     T* __restrict__ W2, const T* __restrict__ grad_W2,
                                     const long long size_W2,
                                     T* __restrict__ b2, const T* __restrict__ grad_logits,
                                     const long long classes,
                                     const long long rows,
                                     const double lr) {
    const T step = (T)lr;
    const long long total = size_W1 + hidden_size + size_W2 + classes;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        long long k = t;
        if (k < size_W1) {
            W1[k] -= step * grad_W1[k];
            continue;
        }
        k -= size_W1;
        if (k < hidden_size) {
            double column = 0.0;
            for (long long n = 0; n < rows; ++n) {
                column += (double)grad_hidden[n * hidden_size + k];
            }
            b1[k] -= step * (T)column;
            continue;
        }
        k -= hidden_size;
        if (k < size_W2) {
            W2[k] -= step * grad_W2[k];
            continue;
        }
        k -= size_W2;
        double column = 0.0;
        for (long long n = 0; n < rows; ++n) {
            column += (double)grad_logits[n * classes + k];
        }
        b2[k] -= step * (T)column;
    }
}
"""

NUMGRAD_OUTPUT_LAYER = r"""
// Central differences of the loss for every output-layer parameter at once.
//
// Parameter q = (j, k) is W2[j, k] for j < hidden_size and b2[k] for
// j == hidden_size (its "hidden unit" is the constant 1). Moving it by +-h
// shifts logit k of sample n by +-step_n, step_n = h * hidden[n, j], and the
// sample's loss by log1p(p_nk * expm1(+-step_n)) - (+-step_n if k is n's label),
// formed directly from the small change (no cancellation against the loss).
//
// One block per parameter, grid-strided: the threads stride over samples and
// meet in a fixed shared-memory tree (fg_block_sum), so the result does not
// depend on scheduling. Float64 throughout: with h = 1e-4 the differences are
// ~1e-8 of the loss and float32 would keep about none of their digits.
__global__ void numgrad_output_layer(const double* __restrict__ hidden,
                                     const double* __restrict__ probs,
                                     const long long* __restrict__ labels,
                                     const long long rows,
                                     const long long hidden_size,
                                     const long long classes,
                                     const double h,
                                     const double scale,
                                     double* __restrict__ grad) {
    extern __shared__ double warp_sums[];
    const long long params = (hidden_size + 1) * classes;
    for (long long q = blockIdx.x; q < params; q += gridDim.x) {
        const long long j = q / classes;
        const long long k = q - j * classes;
        double acc = 0.0;
        for (long long n = threadIdx.x; n < rows; n += blockDim.x) {
            const double step = h * (j < hidden_size ? hidden[n * hidden_size + j] : 1.0);
            const double p = probs[n * classes + k];
            double diff = log1p(p * expm1(step)) - log1p(p * expm1(-step));
            if (labels[n] == k) {
                diff -= 2.0 * step;
            }
            acc += diff;
        }
        acc = fg_block_sum(acc, warp_sums);
        if (threadIdx.x == 0) {
            grad[q] = acc * scale;
        }
    }
}
"""

NUMGRAD_HIDDEN_LAYER = r"""
// Central differences of the loss for every hidden-layer parameter at once.
//
// Row i < inputs of the output is W1[i, :]; row i == inputs is b1 (its
// "input" is the constant 1). Moving W1[i, j] by +-h moves only hidden unit j,
// and only for samples with X[n, i] != 0; for those, hidden unit j changes by
// delta = sigmoid(pre[n, j] +- h x) - hidden[n, j] and the sample's loss by
// log1p(sum_c p_nc expm1(delta W2[j, c])) - delta W2[j, label_n].
//
// Layout: one block per row i (grid-strided), a 2-D block whose x runs over
// hidden units (tiles of blockDim.x) and y over samples. With blockDim.x == 32
// a warp is one sample and 32 hidden units, so the test X[n, i] == 0 (most
// MNIST pixels are zero) is uniform across the warp: skipped samples cost no
// divergence. Per-thread partial sums meet in shared memory and are added by
// threadIdx.y == 0 in a fixed order (deterministic, no atomics). The barriers
// sit outside every data-dependent branch, and all threads of a block run the
// same i and j0 loops, so they are reached by all threads.
__device__ __forceinline__ double fg_hidden_unit_diff(const double* __restrict__ pre,
                                                      const double* __restrict__ hidden,
                                                      const double* __restrict__ probs,
                                                      const double* __restrict__ W2,
                                                      const long long n,
                                                      const long long j,
                                                      const long long label,
                                                      const long long hidden_size,
                                                      const long long classes,
                                                      const double step) {
    const double base_pre = pre[n * hidden_size + j];
    const double base_hidden = hidden[n * hidden_size + j];
    const double* p = probs + n * classes;
    const double* w = W2 + j * classes;
    double moved[2];
    for (int s = 0; s < 2; ++s) {
        const double sign = s == 0 ? 1.0 : -1.0;
        const double change = fg_sigmoid(base_pre + sign * step) - base_hidden;
        double total = 0.0;
        for (long long c = 0; c < classes; ++c) {
            total += p[c] * expm1(change * w[c]);
        }
        moved[s] = log1p(total) - change * w[label];
    }
    return moved[0] - moved[1];
}

__global__ void numgrad_hidden_layer(const double* __restrict__ X,
                                     const double* __restrict__ pre,
                                     const double* __restrict__ hidden,
                                     const double* __restrict__ probs,
                                     const double* __restrict__ W2,
                                     const long long* __restrict__ labels,
                                     const long long rows,
                                     const long long inputs,
                                     const long long hidden_size,
                                     const long long classes,
                                     const double h,
                                     const double scale,
                                     double* __restrict__ grad) {
    extern __shared__ double partial[];
    const long long tile = blockDim.x;
    for (long long i = blockIdx.x; i <= inputs; i += gridDim.x) {
        for (long long j0 = 0; j0 < hidden_size; j0 += tile) {
            const long long j = j0 + threadIdx.x;
            double acc = 0.0;
            if (j < hidden_size) {
                for (long long n = threadIdx.y; n < rows; n += blockDim.y) {
                    const double x = i < inputs ? X[n * inputs + i] : 1.0;
                    if (x == 0.0) {
                        continue;  // the loss does not move: the difference is exactly 0
                    }
                    acc += fg_hidden_unit_diff(pre, hidden, probs, W2, n, j, labels[n],
                                               hidden_size, classes, h * x);
                }
            }
            partial[threadIdx.y * blockDim.x + threadIdx.x] = acc;
            __syncthreads();
            if (threadIdx.y == 0 && j < hidden_size) {
                double sum = 0.0;
                for (unsigned int y = 0; y < blockDim.y; ++y) {
                    sum += partial[y * blockDim.x + threadIdx.x];
                }
                grad[i * hidden_size + j] = sum * scale;
            }
            // The next tile overwrites `partial`: wait until it has been read.
            __syncthreads();
        }
    }
}
"""

RAW_KERNELS: dict[str, RawSpec] = {
    "softmax_xent_rows": RawSpec(
        "softmax_xent_rows",
        DEVICE_HELPERS + SOFTMAX_XENT_ROWS,
        ("softmax_xent_rows<float>", "softmax_xent_rows<double>"),
        "(const T*, const T*, const long long*, const long long, const long long, double*, T*,"
        " const double)",
    ),
    "sgd_update_two_layer": RawSpec(
        "sgd_update_two_layer",
        SGD_UPDATE_TWO_LAYER,
        ("sgd_update_two_layer<float>", "sgd_update_two_layer<double>"),
        "(T*, const T*, const long long, T*, const T*, const long long, T*, const T*,"
        " const long long, T*, const T*, const long long, const long long, const double)",
    ),
    "numgrad_output_layer": RawSpec(
        "numgrad_output_layer",
        DEVICE_HELPERS + NUMGRAD_OUTPUT_LAYER,
        ("numgrad_output_layer",),
        "",
    ),
    "numgrad_hidden_layer": RawSpec(
        "numgrad_hidden_layer",
        DEVICE_HELPERS + NUMGRAD_HIDDEN_LAYER,
        ("numgrad_hidden_layer",),
        "",
    ),
}


# ------------------------------------------------------------ nvcc translation units
_CUPY_TYPES = {
    "float16": "__half",
    "float32": "float",
    "float64": "double",
    "int8": "signed char",
    "int16": "short",
    "int32": "int",
    "int64": "long long",
    "uint8": "unsigned char",
    "uint32": "unsigned int",
    "uint64": "unsigned long long",
    "bool": "bool",
}


def _parse_params(params: str) -> list[tuple[bool, str, str]]:
    """``"raw T x, int64 n"`` -> ``[(True, "T", "x"), (False, "int64", "n")]``."""
    parsed = []
    for part in params.split(","):
        words = part.split()
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        if len(words) != 2:
            raise ValueError(f"cannot parse ElementwiseKernel parameter {part!r}")
        parsed.append((raw, words[0], words[1]))
    return parsed


def _c_type(cupy_type: str) -> str:
    if re.fullmatch(r"[A-Z]", cupy_type):
        return cupy_type
    return _CUPY_TYPES[cupy_type]


def elementwise_translation_unit(spec: ElementwiseSpec) -> str:
    """A compilable CUDA file running ``spec.body`` the way ElementwiseKernel does.

    CuPy wraps the body in a loop over ``i`` with each non-raw argument bound
    to its element by reference and raw arguments passed whole; this wrapper
    does the same with plain pointers, so ``nvcc`` checks the body as written.
    Type placeholders (``T``) become template parameters instantiated for
    float and double.
    """
    inputs = _parse_params(spec.in_params)
    outputs = _parse_params(spec.out_params)
    placeholders = sorted({kind for _, kind, _ in inputs + outputs if re.fullmatch(r"[A-Z]", kind)})
    pointer_params = []
    bindings = []
    for raw, kind, name in inputs:
        c_type = _c_type(kind)
        pointer_params.append(f"const {c_type}* __restrict__ {name}_ptr")
        if raw:
            bindings.append(f"const {c_type}* {name} = {name}_ptr;")
        else:
            bindings.append(f"const {c_type} {name} = {name}_ptr[i];")
    for raw, kind, name in outputs:
        c_type = _c_type(kind)
        pointer_params.append(f"{c_type}* __restrict__ {name}_ptr")
        if raw:
            bindings.append(f"{c_type}* {name} = {name}_ptr;")
        else:
            bindings.append(f"{c_type}& {name} = {name}_ptr[i];")
    params = ", ".join([*pointer_params, "const long long fg_size"])
    template = ", ".join(f"typename {p}" for p in placeholders)
    kernel = f"fg_elementwise_{spec.name}"
    lines = [
        spec.preamble,
        f"template <{template}>" if template else "",
        f"__global__ void {kernel}({params}) {{",
        "    const long long stride = (long long)gridDim.x * blockDim.x;",
        "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;"
        " i < fg_size; i += stride) {",
        *(f"        {binding}" for binding in bindings),
        f"        {spec.body}",
        "    }",
        "}",
    ]
    if placeholders:
        for c_type in ("float", "double"):
            arguments = ", ".join(c_type for _ in placeholders)
            signature = params
            for placeholder in placeholders:
                signature = re.sub(rf"\b{placeholder}\b", c_type, signature)
            lines.append(f"template __global__ void {kernel}<{arguments}>({signature});")
    return "\n".join(lines) + "\n"


def raw_translation_unit(spec: RawSpec) -> str:
    """``spec.source`` plus explicit instantiations of its templates, for nvcc.

    NVRTC instantiates the templates named in ``name_expressions``; nvcc needs
    them spelled out, or it would only parse the template bodies.
    """
    lines = [spec.source]
    for expression in spec.instantiations:
        match = re.fullmatch(r"(\w+)<(\w+)>", expression)
        if match is None:
            continue
        kernel, c_type = match.groups()
        signature = re.sub(r"\bT\b", c_type, spec.signature)
        lines.append(f"template __global__ void {kernel}<{c_type}>{signature};")
    return "\n".join(lines) + "\n"


def cuda_sources() -> dict[str, str]:
    """Every CUDA source of the backend as a complete translation unit, by name.

    Elementwise bodies come wrapped in a generated ``__global__`` function; raw
    modules come with their template instantiations. Each string compiles on
    its own with ``nvcc -arch=sm_90 -cubin``.
    """
    sources = {
        name: elementwise_translation_unit(spec) for name, spec in ELEMENTWISE_KERNELS.items()
    }
    sources.update({name: raw_translation_unit(spec) for name, spec in RAW_KERNELS.items()})
    return dict(sorted(sources.items()))


# --------------------------------------------------------------- lazy compilation
@functools.cache
def elementwise_kernel(name: str) -> Any:
    """The ``cupy.ElementwiseKernel`` called ``name``, created once.

    CuPy compiles it per dtype on the first call and caches the binary on disk
    (``~/.cupy/kernel_cache``), so later processes skip NVRTC.
    """
    import cupy

    spec = ELEMENTWISE_KERNELS[name]
    return cupy.ElementwiseKernel(
        spec.in_params,
        spec.out_params,
        spec.body,
        f"fastgrad_{spec.name}",
        preamble=spec.preamble,
    )


@functools.cache
def _raw_module(name: str) -> Any:
    import cupy

    spec = RAW_KERNELS[name]
    return cupy.RawModule(
        code=spec.source,
        options=("--std=c++14",),
        name_expressions=list(spec.instantiations),
    )


@functools.cache
def raw_kernel(name: str, c_type: str | None = None) -> Any:
    """The compiled kernel ``name`` (``name<c_type>`` for templates), cached.

    Examples
    --------
    ``raw_kernel("softmax_xent_rows", "double")`` compiles the softmax module
    (both instantiations) on first use and returns the double kernel.
    """
    expression = name if c_type is None else f"{name}<{c_type}>"
    if expression not in RAW_KERNELS[name].instantiations:
        raise KeyError(f"{expression!r} is not compiled by module {name!r}")
    return _raw_module(name).get_function(expression)
