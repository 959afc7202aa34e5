"""MNIST for the chapter: find, download, verify and parse it, or use the embedded subset.

Files are looked for in the ``data_dir`` argument, then ``$FASTGRAD_DATA_DIR``,
then the user cache, and downloaded into the cache as a last resort. Every
file's decompressed bytes are checked against the known SHA-256 before use: a
file that fails is reported, never used. No pickle is read or written.

Downloads come from :data:`MIRRORS`, or from ``$FASTGRAD_MNIST_URL`` (a mirror
of one's own); ``$FASTGRAD_DOWNLOAD_TIMEOUT`` bounds each wait. A failed
download, whatever the cause, is one :class:`MNISTUnavailableError` and leaves
no partial file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIRRORS",
    "MNISTCorruptError",
    "MNISTError",
    "MNISTUnavailableError",
    "build_mini_subset",
    "cache_dir",
    "download",
    "find_mnist_dir",
    "load_mnist",
    "parse_idx",
    "read_idx",
]

ENV_DATA_DIR = "FASTGRAD_DATA_DIR"
#: One or more base URLs (space-separated) to download MNIST from instead of :data:`MIRRORS`.
ENV_MNIST_URL = "FASTGRAD_MNIST_URL"
#: Seconds a download waits for a connection or for more bytes (default 30).
ENV_DOWNLOAD_TIMEOUT = "FASTGRAD_DOWNLOAD_TIMEOUT"

#: Public mirrors serving the four ``.gz`` files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# SHA-256 of the *decompressed* files. The mirrors recompress, so the .gz bytes
# differ between copies while the IDX content does not.
CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# (images, labels, expected count) for each split.
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MINI_RESOURCE = "mnist-mini.npz"
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_TIMEOUT_S = 30.0

Splits = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class MNISTError(RuntimeError):
    """Base class of the MNIST errors below."""


class MNISTUnavailableError(MNISTError):
    """No copy of MNIST could be found or downloaded; the message says where it looked.

    :attr:`brief` is a shorter reason for one-line reports.
    """

    def __init__(self, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief if brief is not None else message


class MNISTCorruptError(MNISTError):
    """An MNIST file is truncated, malformed or fails its checksum; the message names it."""


# ---------------------------------------------------------------- IDX format
def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one (decompressed) IDX file into an array.

    The header is checked completely: two zero bytes, a known type code, the
    number of dimensions, and a payload of exactly the size the dimensions
    promise (a truncated or padded file is an error, not a shorter array).

    Parameters
    ----------
    data
        The file's content, already decompressed.
    name
        What to call the file in error messages.

    Returns
    -------
    A native-endian array of the shape the header gives.

    Raises
    ------
    MNISTCorruptError
        The header or the size is wrong.

    Examples
    --------
    >>> from fastgrad.data import parse_idx
    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])).tolist()
    [7, 2, 1]
    """
    if len(data) < 4:
        raise MNISTCorruptError(f"{name}: only {len(data)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise MNISTCorruptError(
            f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 + type code + "
            "dimension count); this is not an IDX file"
        )
    if not 1 <= ndim <= 4:
        raise MNISTCorruptError(f"{name}: IDX header says {ndim} dimensions; expected 1 to 4")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise MNISTCorruptError(f"{name}: truncated inside the IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise MNISTCorruptError(
            f"{name}: {problem}: {len(data)} bytes for shape {shape}, expected {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], sha256: str | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, optionally checking its checksum.

    Compression is recognised from the content (the gzip magic), not the name.

    Parameters
    ----------
    path
        The file.
    sha256
        Expected SHA-256 of the decompressed bytes; not checked when None.

    Raises
    ------
    MNISTCorruptError
        The gzip stream is broken, the checksum differs, or the IDX content is
        malformed. The message names the file and says how to fix it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from fastgrad.data import read_idx
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 5, 0]))
    >>> read_idx(path).tolist()
    [5, 0]
    """
    path = Path(path)
    data = _read_decompressed(path)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise MNISTCorruptError(
                f"{path}: checksum mismatch (sha256 of the decompressed content is {actual}, "
                f"expected {sha256}); the file is damaged or not the MNIST file it is named "
                f"after: delete it so that it can be fetched again"
            )
    return parse_idx(data, str(path))


def _read_decompressed(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        raise MNISTCorruptError(
            f"{path}: broken gzip data ({error}); the file is truncated or damaged: "
            "delete it so that it can be fetched again"
        ) from None


# ------------------------------------------------------------- where the files are
def cache_dir() -> Path:
    """The user cache for downloaded MNIST: ``$XDG_CACHE_HOME/fastgrad/mnist``.

    Falls back to ``~/.cache/fastgrad/mnist`` when ``XDG_CACHE_HOME`` is unset.

    Examples
    --------
    >>> from fastgrad.data import cache_dir
    >>> cache_dir().parts[-2:]
    ('fastgrad', 'mnist')
    """
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "fastgrad" / "mnist"


def find_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder :func:`load_mnist` would read the four files from, or None.

    Looks where :func:`load_mnist` looks (``data_dir``, ``$FASTGRAD_DATA_DIR``,
    the cache) without reading, verifying or downloading anything.

    Examples
    --------
    >>> from fastgrad.data import find_mnist_dir
    >>> find_mnist_dir("/no/such/folder") is None
    True
    """
    from_env = os.environ.get(ENV_DATA_DIR, "").strip()
    chosen = data_dir if data_dir is not None else (from_env or None)
    directory = Path(chosen).expanduser() if chosen is not None else cache_dir()
    if directory.is_dir() and not _missing_files(directory):
        return directory
    return None


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(directory: Path) -> list[str]:
    return [name for name in CHECKSUMS if _find_file(directory, name) is None]


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name, count = _SPLITS[split]
    images_path = _find_file(directory, images_name)
    labels_path = _find_file(directory, labels_name)
    assert images_path is not None and labels_path is not None  # checked by the caller
    images = read_idx(images_path, CHECKSUMS[images_name])
    labels = read_idx(labels_path, CHECKSUMS[labels_name])
    # The checksums already pin the content; this guards the table above.
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise MNISTCorruptError(
            f"{images_path}: unexpected shapes {images.shape} / {labels.shape} for MNIST {split}"
        )
    return images, labels


def _load_directory(directory: Path, origin: str) -> Splits:
    if not directory.is_dir():
        raise MNISTUnavailableError(f"{origin} {directory} is not a directory")
    missing = _missing_files(directory)
    if missing:
        raise MNISTUnavailableError(
            f"{origin} {directory} lacks {', '.join(missing)} (.gz or not); put the four MNIST "
            "files there or point to the folder that has them"
        )
    return _read_split(directory, "train"), _read_split(directory, "test")


def _locate_and_read(data_dir: str | os.PathLike[str] | None) -> Splits:
    # An explicit location is the user's choice: if it is wrong, say so rather
    # than quietly reading (or downloading) something else.
    if data_dir is not None:
        return _load_directory(Path(data_dir).expanduser(), "data_dir")
    from_env = os.environ.get(ENV_DATA_DIR, "").strip()
    if from_env:
        return _load_directory(Path(from_env).expanduser(), f"${ENV_DATA_DIR}")
    cache = cache_dir()
    missing = _missing_files(cache) if cache.is_dir() else list(CHECKSUMS)
    if missing:
        download(missing, cache)
    return _load_directory(cache, "the cache")


# ------------------------------------------------------------------ download
def download(
    names: Sequence[str] = tuple(CHECKSUMS),
    directory: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] | None = None,
    timeout: float | None = None,
) -> None:
    """Download MNIST files into ``directory`` (the cache), verified, or not at all.

    Each file is streamed to a temporary file next to its destination, checked
    against the known SHA-256 of its decompressed content and only then renamed
    into place. Whatever goes wrong (no network, a refused or cut connection, a
    server that does not speak HTTP, an HTTP error, a damaged copy, a timeout,
    an interrupt), the temporary file is removed: no partial file is left, and
    the next mirror is tried.

    Parameters
    ----------
    names
        Which of the four files, named without ``.gz``.
    directory
        Where to put them; :func:`cache_dir` by default.
    mirrors
        Base URLs tried in order, each followed by ``<name>.gz`` (``http``,
        ``https`` or ``file``). Default: ``$FASTGRAD_MNIST_URL`` when set (one
        or more base URLs separated by spaces), else :data:`MIRRORS`.
    timeout
        Seconds to wait for a connection, or for the next bytes of a file,
        before giving up on a mirror. Default: ``$FASTGRAD_DOWNLOAD_TIMEOUT``
        when set, else 30.

    Raises
    ------
    MNISTUnavailableError
        No mirror delivered a good copy of some file, or ``directory`` cannot
        be written; the message says why for each mirror.
    MNISTError
        ``$FASTGRAD_MNIST_URL`` or ``$FASTGRAD_DOWNLOAD_TIMEOUT`` is malformed.
    ValueError
        A name is not an MNIST file, or ``mirrors`` or ``timeout`` is malformed.
    TypeError
        ``timeout`` is not a number.

    Examples
    --------
    >>> from fastgrad.data import download
    >>> download([], "/tmp")  # nothing asked, nothing fetched
    """
    target = Path(directory) if directory is not None else cache_dir()
    for name in names:
        if name not in CHECKSUMS:
            raise ValueError(f"{name!r} is not an MNIST file; choose from {sorted(CHECKSUMS)}")
    bases = _mirror_bases(mirrors)
    seconds = _timeout_seconds(timeout)
    if not names:
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(target, error) from None
    for name in names:
        _download_one(name, target, bases, seconds)


def _mirror_bases(mirrors: Sequence[str] | None) -> tuple[str, ...]:
    """The base URLs to try, each ending in ``/``; checked, so a typo is named at once."""
    from urllib.parse import urlsplit

    if mirrors is not None:
        where, given = "mirrors", list(mirrors)
    elif os.environ.get(ENV_MNIST_URL, "").strip():
        where, given = f"${ENV_MNIST_URL}", os.environ[ENV_MNIST_URL].split()
    else:
        return MIRRORS
    fail: type[Exception] = ValueError if mirrors is not None else MNISTError
    bases = []
    for base in given:
        parts = urlsplit(base) if isinstance(base, str) else None
        if parts is None or not (
            (parts.scheme in ("http", "https") and parts.netloc)
            or (parts.scheme == "file" and parts.path)
        ):
            raise fail(
                f"{where}: {base!r} is not an http://, https:// or file:// base URL; give the "
                "folder that holds the four .gz files, e.g. https://example.org/mnist/"
            )
        bases.append(base if base.endswith("/") else f"{base}/")
    return tuple(bases)


def _timeout_seconds(timeout: float | None) -> float:
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.floating)):
            raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
        where, text = "timeout", repr(timeout)
    elif os.environ.get(ENV_DOWNLOAD_TIMEOUT, "").strip():
        where, text = f"${ENV_DOWNLOAD_TIMEOUT}", repr(os.environ[ENV_DOWNLOAD_TIMEOUT])
    else:
        return _DOWNLOAD_TIMEOUT_S
    try:
        seconds = float(timeout if timeout is not None else os.environ[ENV_DOWNLOAD_TIMEOUT])
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        fail: type[Exception] = ValueError if timeout is not None else MNISTError
        raise fail(f"{where}={text} is not a number of seconds > 0; unset it or give e.g. 30")
    return seconds


def _unwritable(target: Path, error: OSError) -> MNISTUnavailableError:
    reason = error.strerror or str(error)
    return MNISTUnavailableError(
        f"cannot write the MNIST download to {target} ({reason}); make it writable, set "
        f"XDG_CACHE_HOME to a writable folder, or pass data_dir= / set ${ENV_DATA_DIR}",
        brief=f"not in {target}, which cannot be written ({reason})",
    )


def _download_one(name: str, target: Path, mirrors: tuple[str, ...], timeout: float) -> None:
    import http.client

    # Everything a mirror can do wrong: OSError covers the refused, reset and
    # timed-out connections and urllib's URLError/HTTPError; HTTPException is a
    # reply that is not HTTP; MNISTCorruptError a copy that fails its check.
    failures_of_a_mirror = (OSError, http.client.HTTPException, MNISTCorruptError)
    failures: list[str] = []
    for mirror in mirrors:
        url = f"{mirror}{name}.gz"
        try:
            handle, temp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
        except OSError as error:
            raise _unwritable(target, error) from None
        temp_path = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as out:
                _fetch(url, out, f"{name}.gz", timeout)
            _check_copy(temp_path, name)
            os.replace(temp_path, target / f"{name}.gz")
        except failures_of_a_mirror as error:
            temp_path.unlink(missing_ok=True)
            failures.append(f"{url}: {_describe_failure(error, timeout)}")
            continue
        except BaseException:  # an interrupt, or a bug: still no partial file
            temp_path.unlink(missing_ok=True)
            raise
        return
    first_reason = failures[0].split(": ", 1)[-1] if failures else "no mirror configured"
    raise MNISTUnavailableError(
        f"could not download {name} ({'; '.join(failures)}); get the four MNIST files "
        f"elsewhere and pass data_dir= or set ${ENV_DATA_DIR}",
        brief=f"not in {target}, and the download failed: {first_reason}",
    )


def _fetch(url: str, out: io.BufferedWriter, label: str, timeout: float) -> None:
    """Stream ``url`` into ``out``, with a progress bar when stderr is a terminal."""
    import http.client
    import urllib.request  # imports ssl and http: only worth it when downloading

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = _content_length(response)
        done = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=label, leave=False, disable=None
        ) as bar:
            try:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead:
                pass  # some Python versions raise here, others return b"": checked below
            except TimeoutError:
                raise ConnectionError(
                    f"the download stalled: nothing for {timeout:g} s after {done:,} bytes "
                    f"(${ENV_DOWNLOAD_TIMEOUT} sets the limit)"
                ) from None
        # A connection closed early ends the stream like a finished one.
        if total is not None and done != total:
            raise ConnectionError(
                f"the connection closed after {done:,} of the {total:,} bytes announced"
            )


def _content_length(response: Any) -> int | None:
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def _check_copy(path: Path, name: str) -> None:
    """Refuse a downloaded copy whose decompressed content is not the MNIST file."""
    raw = path.read_bytes()
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise MNISTCorruptError(f"the copy served is not valid gzip data ({error})") from None
    actual = hashlib.sha256(raw).hexdigest()
    if actual != CHECKSUMS[name]:
        raise MNISTCorruptError(
            f"the copy served fails its checksum (sha256 {actual[:16]}..., expected "
            f"{CHECKSUMS[name][:16]}...)"
        )


def _describe_failure(error: BaseException, timeout: float) -> str:
    """One line saying what went wrong with a mirror."""
    import http.client
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s (${ENV_DOWNLOAD_TIMEOUT} sets the limit)"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(reason, http.client.HTTPException):
        said = ascii(str(reason))[:60]
        return f"the server does not speak HTTP ({type(reason).__name__}: {said})"
    lines = str(reason).splitlines()
    return lines[0] if lines else type(reason).__name__


# ----------------------------------------------------------- embedded subset
def _load_mini() -> Splits:
    resource = resources.files("fastgrad") / "_data" / _MINI_RESOURCE
    try:
        with resource.open("rb") as stream, np.load(stream, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("x_train", "t_train", "x_test", "t_test")}
    except (OSError, KeyError, ValueError) as error:
        raise MNISTUnavailableError(
            f"the embedded MNIST subset ({resource}) cannot be read ({error}); reinstall fastgrad"
        ) from None
    return (arrays["x_train"], arrays["t_train"]), (arrays["x_test"], arrays["t_test"])


def build_mini_subset(
    source_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    train_size: int = 10_000,
    test_size: int = 2_000,
) -> Path:
    """Write the embedded subset: the first images of full MNIST, compressed uint8.

    Run once by maintainers (the result ships as ``fastgrad/_data/mnist-mini.npz``)::

        python -c "import fastgrad.data as d; d.build_mini_subset('../shared/data/mnist')"

    Parameters
    ----------
    source_dir
        A folder with the four verified MNIST files.
    out_path
        Where to write; the package's ``_data/mnist-mini.npz`` by default.
    train_size, test_size
        How many leading images of each split to keep.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> from fastgrad.data import build_mini_subset
    >>> build_mini_subset("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    fastgrad.data.MNISTUnavailableError: ...
    """
    (x_train, t_train), (x_test, t_test) = _load_directory(Path(source_dir), "source_dir")
    target = (
        Path(out_path) if out_path is not None else Path(__file__).parent / "_data" / _MINI_RESOURCE
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".mnist-mini.", suffix=".part", dir=target.parent)
    with os.fdopen(handle, "wb") as out:
        np.savez_compressed(
            out,
            x_train=x_train[:train_size],
            t_train=t_train[:train_size],
            x_test=x_test[:test_size],
            t_test=t_test[:test_size],
        )
    # mkstemp makes owner-only files; the shipped data must be readable by all.
    os.chmod(temp_name, 0o644)
    os.replace(temp_name, target)
    return target


# ----------------------------------------------------------------- public API
def load_mnist(
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    dtype: Any = np.float32,
    subset: str | None = None,
) -> Splits:
    """MNIST as the book's ``load_mnist``: ``((x_train, t_train), (x_test, t_test))``.

    Parameters
    ----------
    normalize
        Pixels as ``dtype`` in [0, 1]; otherwise the raw uint8 values 0..255.
    flatten
        Images as rows of 784 values; otherwise ``(N, 1, 28, 28)``.
    one_hot_label
        Labels as one-hot rows ``(N, 10)`` of ``dtype``; otherwise uint8 labels.
    data_dir
        A folder holding the four IDX files (``.gz`` or not). When omitted:
        ``$FASTGRAD_DATA_DIR``, then :func:`cache_dir`, then a download into
        the cache. A given folder (argument or variable) is used alone.
    dtype
        float32 (default, as the book) or float64.
    subset
        ``None`` for full MNIST (60,000 / 10,000 images) or ``"mini"`` for the
        embedded subset (the first 10,000 / 2,000), which needs no files.

    Raises
    ------
    MNISTUnavailableError
        No copy can be found or downloaded.
    MNISTCorruptError
        A file is damaged or fails its checksum (it is never used).

    Examples
    --------
    >>> from fastgrad.data import load_mnist
    >>> (x_train, t_train), (x_test, t_test) = load_mnist(subset="mini")
    >>> x_train.shape, x_train.dtype, t_train[:5].tolist(), x_test.shape
    ((10000, 784), dtype('float32'), [5, 0, 4, 1, 9], (2000, 784))
    """
    resolved = np.dtype(dtype)
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    if subset not in (None, "mini"):
        raise ValueError(f"subset must be None (full MNIST) or 'mini', got {subset!r}")
    (x_train, t_train), (x_test, t_test) = (
        _load_mini() if subset == "mini" else _locate_and_read(data_dir)
    )
    return (
        (
            _format_images(x_train, normalize, flatten, resolved),
            _format_labels(t_train, one_hot_label, resolved),
        ),
        (
            _format_images(x_test, normalize, flatten, resolved),
            _format_labels(t_test, one_hot_label, resolved),
        ),
    )


def _format_images(
    images: np.ndarray, normalize: bool, flatten: bool, dtype: np.dtype
) -> np.ndarray:
    shape = (images.shape[0], 784) if flatten else (images.shape[0], 1, 28, 28)
    images = images.reshape(shape)
    if not normalize:
        return images
    scaled = images.astype(dtype)
    scaled /= dtype.type(255.0)
    return scaled


def _format_labels(labels: np.ndarray, one_hot: bool, dtype: np.dtype) -> np.ndarray:
    if not one_hot:
        return labels
    encoded = np.zeros((labels.shape[0], 10), dtype=dtype)
    encoded[np.arange(labels.shape[0]), labels] = 1
    return encoded
