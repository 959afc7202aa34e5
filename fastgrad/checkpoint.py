"""Saving and loading the parameters of any MultiLayerNet as ``.npz``, written atomically.

A file holds the net's parameter arrays under the net's own names and, as a
JSON string (never a pickle), its architecture: class, layer sizes,
activation and weight decay. Loading rebuilds that net, or refuses to fill
a net of another architecture; it checks every name, shape and dtype before
anything is copied, so a net is never left half loaded. Files written before
the architecture was recorded hold a TwoLayerNet and still load as one.

A file is written next to its destination and renamed into place, so a crash
mid-write leaves the previous file intact rather than half of a new one.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fastgrad.backends import BackendLike
from fastgrad.backends._base import ACTIVATIONS
from fastgrad.models import MultiLayerNet, TwoLayerNet

__all__ = ["atomic_write_bytes", "load_params", "save_params"]

# The entry of the architecture record; parameter names (W1, b1, ...) never take it.
_RECORD_KEY = "architecture"
_FORMAT = "fastgrad.params"
_FORMAT_VERSION = 2  # version 1: W1, b1, W2, b2 of a TwoLayerNet and nothing else
_CLASSES: dict[str, type[MultiLayerNet]] = {
    "TwoLayerNet": TwoLayerNet,
    "MultiLayerNet": MultiLayerNet,
}


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from fastgrad.checkpoint import atomic_write_bytes
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_bytes(target, b"hello").read_bytes()
    b'hello'
    """
    target = Path(path)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part", dir=target.parent
    )
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp makes owner-only files; results should have ordinary permissions.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def save_params(net: MultiLayerNet, path: str | os.PathLike[str]) -> Path:
    """Save ``net.params`` (host copies) and ``net.architecture`` to the ``.npz`` file ``path``.

    The file can be loaded on any backend, with or without a net to load into.

    Examples
    --------
    >>> import tempfile, pathlib, fastgrad
    >>> from fastgrad.checkpoint import load_params, save_params
    >>> net = fastgrad.MultiLayerNet(4, [3, 3], 2, activation="tanh", seed=0)
    >>> path = save_params(net, pathlib.Path(tempfile.mkdtemp()) / "params.npz")
    >>> load_params(path).architecture == net.architecture
    True
    """
    record = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "class": "TwoLayerNet" if isinstance(net, TwoLayerNet) else "MultiLayerNet",
        **net.architecture,
    }
    arrays: dict[str, Any] = {
        name: net.backend.to_numpy(array) for name, array in net.params.items()
    }
    # A 0-d unicode array: np.load reads it back with allow_pickle=False.
    arrays[_RECORD_KEY] = np.array(json.dumps(record))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_params(
    path: str | os.PathLike[str], net: MultiLayerNet | None = None, *, backend: BackendLike = None
) -> MultiLayerNet:
    """Load parameters saved by :func:`save_params`.

    Parameters
    ----------
    path
        The ``.npz`` file.
    net
        A network to load into; its architecture (layer sizes, activation,
        weight decay) and dtype must be the file's. A TwoLayerNet file loads
        into the equal ``MultiLayerNet(D, [H], C, "sigmoid")`` and back. When
        omitted, a new net of the file's class, architecture and dtype is
        made on ``backend``.
    backend
        Where a new network lives (ignored when ``net`` is given).

    Returns
    -------
    The network holding the loaded parameters.

    Raises
    ------
    ValueError
        The file is damaged or lacks a parameter, its arrays do not fit its
        architecture, or ``net`` has another architecture or dtype. ``net``
        is unchanged then.

    Examples
    --------
    >>> import tempfile, pathlib, fastgrad
    >>> from fastgrad.checkpoint import load_params, save_params
    >>> trained = fastgrad.TwoLayerNet(4, 3, 2, seed=1)
    >>> path = save_params(trained, pathlib.Path(tempfile.mkdtemp()) / "params.npz")
    >>> fresh = load_params(path, fastgrad.TwoLayerNet(4, 3, 2, seed=2))
    >>> bool((fresh.params["W2"] == trained.params["W2"]).all())
    True
    >>> try:
    ...     load_params(path, fastgrad.TwoLayerNet(4, 5, 2))
    ... except ValueError as error:
    ...     print(str(error).split(": ", 1)[1].split(";")[0])
    the file's net has hidden layers [3] but this one has [5]
    """
    path = Path(path)
    arrays, record = _read(path)
    dtype = next(iter(arrays.values())).dtype
    if net is None:
        net = _build(record, dtype, backend)
    else:
        _check_fits(path, record, dtype, net)
    _check_arrays(path, arrays, net, record)
    # Convert everything first, so a failure cannot leave the net half loaded.
    converted = {name: net.backend.asarray(arrays[name]).copy() for name in net.params}
    net.params.update(converted)
    return net


# ------------------------------------------------------------------- reading
def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The parameter arrays and the (checked or, for old files, inferred) architecture."""
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except unreadable as error:
        raise ValueError(f"{path}: not a readable .npz parameter file ({error})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        # np.load reads a .npy file as one bare array, whatever the file is called.
        raise ValueError(
            f"{path}: a single .npy array (shape {loaded.shape}, dtype {loaded.dtype}), not a "
            ".npz parameter file; write checkpoints with fastgrad.checkpoint.save_params"
        )
    try:
        with loaded as archive:
            stored: dict[str, np.ndarray] = {name: archive[name] for name in archive.files}
    except unreadable as error:
        raise ValueError(f"{path}: not a readable .npz parameter file ({error})") from None
    text = stored.pop(_RECORD_KEY, None)
    arrays = {name: np.asarray(array) for name, array in stored.items()}
    for name, array in arrays.items():
        if array.dtype not in (np.float32, np.float64):
            raise ValueError(
                f"{path}: {name} has dtype {array.dtype}; expected a float32 or float64 array"
            )
    dtypes = sorted({str(array.dtype) for array in arrays.values()})
    if len(dtypes) > 1:
        raise ValueError(f"{path}: parameters do not fit together: mixed dtypes {dtypes}")
    record = _legacy_record(path, arrays) if text is None else _parse_record(path, text)
    if not arrays:
        raise ValueError(f"{path}: not a fastgrad parameter file (it holds no parameters)")
    return arrays, record


def _parse_record(path: Path, text: np.ndarray) -> dict[str, Any]:
    def damaged(why: str) -> ValueError:
        return ValueError(f"{path}: damaged architecture record ({why})")

    if text.dtype.kind != "U" or text.ndim != 0:
        raise damaged(f"a {text.dtype} array of shape {text.shape}, not a JSON string")
    try:
        record = json.loads(str(text[()]))
    except json.JSONDecodeError as error:
        raise damaged(f"not JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise damaged("not a fastgrad.params record")
    version = record.get("version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise ValueError(
            f"{path}: written by a newer fastgrad (format version {version!r}; this one "
            f"reads up to {_FORMAT_VERSION}); upgrade fastgrad to load it"
        )
    sizes = record.get("layer_sizes")
    if (
        not isinstance(sizes, list)
        or len(sizes) < 2
        or not all(
            isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes
        )
    ):
        raise damaged(f"layer_sizes {sizes!r} is not a list of at least two positive integers")
    if record.get("activation") not in ACTIVATIONS:
        raise damaged(f"activation {record.get('activation')!r} is not one of {ACTIVATIONS}")
    decay = record.get("weight_decay_lambda")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
        raise damaged(f"weight_decay_lambda {decay!r} is not a finite number >= 0")
    kind = record.get("class")
    if kind not in _CLASSES:
        raise damaged(f"class {kind!r} is not one of {sorted(_CLASSES)}")
    if kind == "TwoLayerNet" and (
        len(sizes) != 3 or record["activation"] != "sigmoid" or decay != 0
    ):
        raise damaged("a TwoLayerNet has one sigmoid hidden layer and no weight decay")
    return record


def _legacy_record(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The architecture of a file without a record: a TwoLayerNet, sized by its weights."""
    # TwoLayerNet's parameter names and ranks, read from a 1-1-1 instance:
    # only the models spell out parameter names.
    layout = TwoLayerNet(1, 1, 1, seed=0, backend="numpy")
    missing = [name for name in layout.params if name not in arrays]
    if missing:
        raise ValueError(f"{path}: not a fastgrad parameter file (missing {', '.join(missing)})")
    for name, template in layout.params.items():
        if arrays[name].ndim != template.ndim:
            raise ValueError(
                f"{path}: {name} has shape {arrays[name].shape}; expected a {template.ndim}-D array"
            )
    weights = [arrays[name] for name, template in layout.params.items() if template.ndim == 2]
    sizes = [int(weights[0].shape[0])] + [int(W.shape[1]) for W in weights]
    return {"class": "TwoLayerNet", **layout.architecture, "layer_sizes": sizes}


# ------------------------------------------------------------------ checking
def _build(record: dict[str, Any], dtype: np.dtype, backend: BackendLike) -> MultiLayerNet:
    sizes = record["layer_sizes"]
    if record["class"] == "TwoLayerNet":
        return TwoLayerNet(sizes[0], sizes[1], sizes[2], dtype=dtype, backend=backend)
    return MultiLayerNet(
        sizes[0],
        sizes[1:-1],
        sizes[-1],
        activation=record["activation"],
        weight_decay_lambda=record["weight_decay_lambda"],
        dtype=dtype,
        backend=backend,
    )


def _check_fits(path: Path, record: dict[str, Any], dtype: np.dtype, net: MultiLayerNet) -> None:
    """Refuse, naming every difference, a net whose architecture or dtype is not the file's."""
    sizes = record["layer_sizes"]
    pairs = [
        ("input size", sizes[0], net.input_size),
        ("hidden layers", list(sizes[1:-1]), net.hidden_size_list),
        ("output size", sizes[-1], net.output_size),
        ("activation", record["activation"], net.activation),
        ("weight decay", float(record["weight_decay_lambda"]), net.weight_decay_lambda),
        ("dtype", str(dtype), str(net.dtype)),
    ]
    differences = [
        f"the file's net has {what} {mine!r} but this one has {theirs!r}"
        if isinstance(mine, str)
        else f"the file's net has {what} {mine} but this one has {theirs}"
        for what, mine, theirs in pairs
        if mine != theirs
    ]
    if differences:
        raise ValueError(
            f"{path}: {'; '.join(differences)}; build the net with the file's architecture, "
            "or load without net= to get one"
        )


def _check_arrays(
    path: Path, arrays: dict[str, np.ndarray], net: MultiLayerNet, record: dict[str, Any]
) -> None:
    """Every parameter of ``net`` is in the file with its shape, and nothing else is."""
    missing = [name for name in net.params if name not in arrays]
    if missing:
        raise ValueError(
            f"{path}: the file lacks {', '.join(missing)} of its "
            f"{'-'.join(map(str, record['layer_sizes']))} net"
        )
    extra = [name for name in arrays if name not in net.params]
    if extra:
        raise ValueError(
            f"{path}: holds arrays a {'-'.join(map(str, record['layer_sizes']))} net does not "
            f"have: {', '.join(extra)}"
        )
    for name, target in net.params.items():
        if arrays[name].shape != tuple(target.shape):
            raise ValueError(
                f"{path}: parameters do not fit together: {name} is {arrays[name].shape} but "
                f"layer sizes {record['layer_sizes']} need {tuple(target.shape)}"
            )
