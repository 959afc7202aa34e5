"""Saving and loading TwoLayerNet parameters as ``.npz``, written atomically.

A file is written next to its destination and renamed into place, so a crash
mid-write leaves the previous file intact rather than half of a new one.
Loading never unpickles and checks every shape and dtype before anything is
copied into a network.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fastgrad.backends import BackendLike
from fastgrad.backends._base import PARAM_NAMES
from fastgrad.models import TwoLayerNet

__all__ = ["atomic_write_bytes", "load_params", "save_params"]

_EXPECTED_NDIM = {"W1": 2, "b1": 1, "W2": 2, "b2": 1}


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


def save_params(net: TwoLayerNet, path: str | os.PathLike[str]) -> Path:
    """Save ``net.params`` (host copies) to the ``.npz`` file ``path``.

    The file holds exactly ``W1``, ``b1``, ``W2``, ``b2``; it can be loaded on
    any backend.

    Examples
    --------
    >>> import tempfile, pathlib, fastgrad
    >>> from fastgrad.checkpoint import load_params, save_params
    >>> net = fastgrad.TwoLayerNet(4, 3, 2, seed=0)
    >>> path = save_params(net, pathlib.Path(tempfile.mkdtemp()) / "params.npz")
    >>> load_params(path).params["W1"].shape
    (4, 3)
    """
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {name: net.backend.to_numpy(net.params[name]) for name in PARAM_NAMES}
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_params(
    path: str | os.PathLike[str], net: TwoLayerNet | None = None, *, backend: BackendLike = None
) -> TwoLayerNet:
    """Load parameters saved by :func:`save_params`.

    Parameters
    ----------
    path
        The ``.npz`` file.
    net
        A network to load into; its shapes and dtype must match the file's.
        When omitted, a new :class:`~fastgrad.TwoLayerNet` of the file's sizes
        and dtype is made on ``backend``.
    backend
        Where a new network lives (ignored when ``net`` is given).

    Returns
    -------
    The network holding the loaded parameters.

    Raises
    ------
    ValueError
        The file lacks a parameter, or shapes or dtypes do not fit each other
        or ``net``.

    Examples
    --------
    >>> import tempfile, pathlib, fastgrad
    >>> from fastgrad.checkpoint import load_params, save_params
    >>> trained = fastgrad.TwoLayerNet(4, 3, 2, seed=1)
    >>> path = save_params(trained, pathlib.Path(tempfile.mkdtemp()) / "params.npz")
    >>> fresh = load_params(path, fastgrad.TwoLayerNet(4, 3, 2, seed=2))
    >>> bool((fresh.params["W2"] == trained.params["W2"]).all())
    True
    """
    arrays = _read_arrays(Path(path))
    W1, W2 = arrays["W1"], arrays["W2"]
    if net is None:
        net = TwoLayerNet(W1.shape[0], W1.shape[1], W2.shape[1], dtype=W1.dtype, backend=backend)
    for name in PARAM_NAMES:
        expected_shape = tuple(net.params[name].shape)
        if arrays[name].shape != expected_shape or arrays[name].dtype != net.dtype:
            raise ValueError(
                f"{path}: {name} is {arrays[name].dtype}{list(arrays[name].shape)} but the network "
                f"needs {net.dtype}{list(expected_shape)}; build the network with the file's sizes "
                "and dtype, or load without net= to get one"
            )
    # Convert everything first, so a failure cannot leave the net half loaded.
    converted = {name: net.backend.asarray(arrays[name]).copy() for name in PARAM_NAMES}
    net.params.update(converted)
    return net


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored: dict[str, Any] = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz parameter file ({error})") from None
    missing = [name for name in PARAM_NAMES if name not in stored]
    if missing:
        raise ValueError(f"{path}: not a fastgrad parameter file (missing {', '.join(missing)})")
    arrays = {name: np.asarray(stored[name]) for name in PARAM_NAMES}
    for name, array in arrays.items():
        if array.ndim != _EXPECTED_NDIM[name] or array.dtype not in (np.float32, np.float64):
            raise ValueError(
                f"{path}: {name} has shape {array.shape} and dtype {array.dtype}; expected a "
                f"{_EXPECTED_NDIM[name]}-D float32 or float64 array"
            )
    dtypes = {array.dtype for array in arrays.values()}
    W1, b1, W2, b2 = (arrays[name] for name in PARAM_NAMES)
    if (
        len(dtypes) > 1
        or b1.shape != (W1.shape[1],)
        or W2.shape[0] != W1.shape[1]
        or (b2.shape != (W2.shape[1],))
    ):
        raise ValueError(
            f"{path}: parameters do not fit together: W1 {W1.shape}, b1 {b1.shape}, "
            f"W2 {W2.shape}, b2 {b2.shape}, dtypes {sorted(str(d) for d in dtypes)}"
        )
    return arrays
