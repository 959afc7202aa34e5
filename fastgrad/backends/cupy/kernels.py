"""CUDA C sources of the CuPy backend's elementwise kernels, and their lazy compilation.

Each body is a plain elementwise expression that CuPy compiles (with NVRTC)
into an ``ElementwiseKernel`` and fuses the indexing for; the kernels with
blocks, shared memory or reductions are Python in
:mod:`fastgrad.backends.cupy.cuda_kernels`, which also run under a simulator.
Every source here is a module-level string so that it can be read and
compiled by ``nvcc`` in the test suite on machines without a GPU. Importing
this module imports neither CuPy nor Numba; the first call of
:func:`elementwise_kernel` imports CuPy and compiles only the kernel asked
for, once per process.

Conventions: no source includes a header (NVRTC has no host headers; CUDA's
math functions are builtins), and type placeholders (``T``) bind float32 or
float64 as CuPy does.

Examples
--------
>>> from fastgrad.backends.cupy import kernels
>>> sorted(kernels.cuda_sources())[:2]
['bias_sigmoid', 'perturbed_stack']
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ELEMENTWISE_KERNELS",
    "ElementwiseSpec",
    "cuda_sources",
    "elementwise_kernel",
]

# --------------------------------------------------------------------- preamble
# The sigmoid of the elementwise bodies, templated over the floating type so
# that float32 and float64 use one source; the overflow-safe form of the NumPy
# reference (exp(-|x|) never overflows), so both backends round alike.
DEVICE_HELPERS = r"""
template <typename T>
__device__ __forceinline__ T fg_sigmoid(T x) {
    const T e = exp(-fabs(x));
    const T positive = T(1) / (T(1) + e);
    return x >= T(0) ? positive : e * positive;
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

# Backward through the activations, one pass each instead of the reference's
# two or three (each reading and writing N x H). Argument names as in
# Backend.activation_backward (dY in, dX out; X the pre-activation, Y the
# output); the products run in the reference's order, so the values agree.
# Passing dY itself as dX works in place (CuPy copies an input only when it
# overlaps an output without being the same array).
SIGMOID_BACKWARD = ElementwiseSpec(
    "sigmoid_backward", "T dY, T Y", "T dX", "dX = dY * (T(1) - Y) * Y;"
)

# The mask as a factor (not a select), so NaN and -0.0 in dY pass as in the reference.
RELU_BACKWARD = ElementwiseSpec(
    "relu_backward", "T dY, T X", "T dX", "dX = dY * (X > T(0) ? T(1) : T(0));"
)

# The compiler may contract 1 - Y * Y into one FMA: a last-bit difference at most.
TANH_BACKWARD = ElementwiseSpec("tanh_backward", "T dY, T Y", "T dX", "dX = dY * (T(1) - Y * Y);")

# One SGD update in place: param -= lr * grad in one pass, where the reference
# writes lr * grad to a temporary first (the compiler may make it one FMA).
# lr comes rounded to T, as the reference's Python float meets a T array.
SGD_UPDATE = ElementwiseSpec("sgd_update", "T grad, T lr", "T param", "param -= lr * grad;")

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
    for spec in (
        SIGMOID,
        SIGMOID_GRAD,
        BIAS_SIGMOID,
        SIGMOID_BACKWARD,
        RELU_BACKWARD,
        TANH_BACKWARD,
        SGD_UPDATE,
        PERTURBED_STACK,
    )
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


def cuda_sources() -> dict[str, str]:
    """Every CUDA C source of the backend as a complete translation unit, by name.

    Each elementwise body comes wrapped in a generated ``__global__`` function
    (see :func:`elementwise_translation_unit`) and compiles on its own with
    ``nvcc -arch=sm_90 -cubin``.
    """
    return {
        name: elementwise_translation_unit(ELEMENTWISE_KERNELS[name])
        for name in sorted(ELEMENTWISE_KERNELS)
    }


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
