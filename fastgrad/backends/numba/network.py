"""Networks of any depth as the Numba kernels take them: every layer in two flat arrays.

Rule of this module: one packed form, :class:`Layers`, for every depth, so that
a kernel compiles once per dtype (not once per depth) and loads from Numba's
on-disk cache for any net. Kernels reach layer ``l`` only through
:func:`weight_matrix` and :func:`bias_vector`, and the activation through
:func:`activate`, :func:`activate_moved` and :func:`multiply_by_slope`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.extending import overload

from fastgrad.backends._base import ACTIVATIONS, Network
from fastgrad.backends.numba._jit import serial as _serial
from fastgrad.backends.numba.vector_math import sigmoid_in_own_precision

# The activation a kernel applies, as an integer (a string argument would
# compile a kernel per activation): its index in ACTIVATIONS.
SIGMOID, RELU, TANH, IDENTITY = (ACTIVATIONS.index(name) for name in ACTIVATIONS)


class Layers(NamedTuple):
    """The arrays of a net, layer after layer: ``W_l`` row-major, then ``W_{l+1}``.

    ``sizes`` is ``[inputs, hidden..., classes]``; ``W_l`` (0-based ``l``) is
    ``weights[weight_starts[l]:weight_starts[l + 1]]`` reshaped to
    ``(sizes[l], sizes[l + 1])`` and ``b_l`` is
    ``biases[unit_starts[l]:unit_starts[l + 1]]``. ``unit_starts`` also
    places layer ``l``'s units in the kernels' per-sample rows of
    activations.
    """

    sizes: np.ndarray
    weight_starts: np.ndarray
    unit_starts: np.ndarray
    weights: np.ndarray
    biases: np.ndarray


def activation_code(activation: str) -> int:
    """The integer the kernels take for ``activation`` (one of ``ACTIVATIONS``)."""
    return ACTIVATIONS.index(activation)


def pack(network: Network, dtype: np.dtype) -> Layers:
    """Copies of ``network``'s arrays in ``dtype``, packed into :class:`Layers`.

    Example:
        >>> W1, W2 = np.ones((3, 2)), np.full((2, 4), 2.0)
        >>> layers = pack(Network((W1, W2), (np.zeros(2), np.zeros(4)), "relu"), np.float64)
        >>> layers.sizes.tolist(), layers.weight_starts.tolist(), layers.unit_starts.tolist()
        ([3, 2, 4], [0, 6, 14], [0, 2, 6])
    """
    sizes = [int(network.weights[0].shape[0])] + [int(W.shape[1]) for W in network.weights]
    fan_ins, fan_outs = np.array(sizes[:-1]), np.array(sizes[1:])
    weight_starts = np.concatenate([[0], np.cumsum(fan_ins * fan_outs)]).astype(np.int64)
    unit_starts = np.concatenate([[0], np.cumsum(fan_outs)]).astype(np.int64)
    return Layers(
        np.array(sizes, dtype=np.int64),
        weight_starts,
        unit_starts,
        np.concatenate([np.ravel(W) for W in network.weights]).astype(dtype, copy=False),
        np.concatenate([np.ravel(b) for b in network.biases]).astype(dtype, copy=False),
    )


def unpacked_weights(layers: Layers, flat: np.ndarray) -> list[np.ndarray]:
    """``flat`` (laid out as ``layers.weights``) cut into ``(fan_in, fan_out)`` views."""
    sizes, starts = layers.sizes.tolist(), layers.weight_starts.tolist()
    return [
        flat[starts[l] : starts[l + 1]].reshape(sizes[l], sizes[l + 1])
        for l in range(len(sizes) - 1)
    ]


def unpacked_biases(layers: Layers, flat: np.ndarray) -> list[np.ndarray]:
    """``flat`` (laid out as ``layers.biases``) cut into one view per layer."""
    starts = layers.unit_starts.tolist()
    return [flat[starts[l] : starts[l + 1]] for l in range(len(starts) - 1)]


def write_back(network: Network, layers: Layers) -> None:
    """Copy the trained values of ``layers`` into the arrays of ``network`` (the model's)."""
    for W, trained in zip(network.weights, unpacked_weights(layers, layers.weights), strict=True):
        W[...] = trained
    for b, trained in zip(network.biases, unpacked_biases(layers, layers.biases), strict=True):
        b[...] = trained


@_serial
def weight_matrix(layers, layer):
    """``W_layer`` as a C-contiguous ``(fan_in, fan_out)`` view of ``layers.weights``."""
    first = layers.weight_starts[layer]
    shape = (layers.sizes[layer], layers.sizes[layer + 1])
    return layers.weights[first : layers.weight_starts[layer + 1]].reshape(shape)


@_serial
def bias_vector(layers, layer):
    return layers.biases[layers.unit_starts[layer] : layers.unit_starts[layer + 1]]


def like(x, value):
    """``value`` as a float of the type of ``x`` (float32 or float64).

    Numba widens ``float32 op int`` to float64, so constants in float32
    kernels go through this to keep their arithmetic (and vectors) float32.
    """
    return type(x)(value)


if not bool(getattr(numba.config, "DISABLE_JIT", 0)):

    @overload(like)
    def _like_typed(x, value):
        if x == types.float32:
            return lambda x, value: np.float32(value)
        return lambda x, value: np.float64(value)


# The activations below loop over a row with the choice of activation made
# once, outside the loop: each loop is then simple enough to vectorise.
@_serial
def activate(code, pre, post):
    """``post = act(pre)`` for the hidden activation ``code``, in the dtype of the rows.

    ReLU keeps NaN (as ``np.maximum`` does): ``NaN < 0`` is false.
    """
    if code == RELU:
        for k in range(pre.shape[0]):
            post[k] = like(pre[k], 0) if pre[k] < 0 else pre[k]
    elif code == SIGMOID:
        for k in range(pre.shape[0]):
            post[k] = sigmoid_in_own_precision(pre[k])
    elif code == TANH:
        for k in range(pre.shape[0]):
            post[k] = math.tanh(pre[k])
    else:
        for k in range(pre.shape[0]):
            post[k] = pre[k]


@_serial
def activate_moved(code, pre, post, shift, out):
    """``out[t] = act(pre + shift[t]) - post`` for scalars ``pre``, ``post = act(pre)``.

    Returns whether any ``out[t]`` is non-zero (a ReLU that stays off moves nothing).
    """
    count = out.shape[0]
    if code == RELU:
        for t in range(count):
            moved = pre + shift[t]
            out[t] = (like(moved, 0) if moved < 0 else moved) - post
    elif code == SIGMOID:
        for t in range(count):
            out[t] = sigmoid_in_own_precision(pre + shift[t]) - post
    elif code == TANH:
        for t in range(count):
            out[t] = math.tanh(pre + shift[t]) - post
    else:
        for t in range(count):
            out[t] = (pre + shift[t]) - post
    moves = False
    for t in range(count):
        moves |= out[t] != 0
    return moves


@_serial
def multiply_by_slope(code, pre, post, d):
    """``d *= act'(pre)``, the slope from ``pre`` and ``post = act(pre)`` (1-D rows).

    As ``Backend.activation_backward``: ReLU's slope is 0 at exactly 0.
    """
    if code == RELU:
        for k in range(d.shape[0]):
            d[k] = d[k] if pre[k] > 0 else like(d[k], 0)
    elif code == SIGMOID:
        for k in range(d.shape[0]):
            d[k] *= (like(post[k], 1) - post[k]) * post[k]
    elif code == TANH:
        for k in range(d.shape[0]):
            d[k] *= like(post[k], 1) - post[k] * post[k]
