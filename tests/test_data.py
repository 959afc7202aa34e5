"""MNIST loading: the IDX parser, checksums, the search order, the embedded subset.

No test touches the network: downloads are either refused by a patched
fetcher or served from ``file://`` URLs of files the test wrote.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from fastgrad import data
from fastgrad.data import (
    MNISTCorruptError,
    MNISTUnavailableError,
    load_mnist,
    parse_idx,
    read_idx,
)

SHARED_MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
MNIST_NAMES = tuple(data.CHECKSUMS)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim)
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No data dir from the environment, an empty cache, and no network."""
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, out, label, timeout):
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(data, "_fetch", offline)
    return tmp_path


def fake_mnist(directory: Path, compress: bool, train: int = 6, test: int = 4) -> dict[str, str]:
    """Write four small IDX files shaped like MNIST; returns their checksums."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, array in contents.items():
        raw = idx_bytes(array)
        checksums[name] = hashlib.sha256(raw).hexdigest()
        target = directory / (f"{name}.gz" if compress else name)
        target.write_bytes(gzip.compress(raw) if compress else raw)
    return checksums


def use_fake_checksums(monkeypatch, checksums, train=6, test=4):
    monkeypatch.setattr(data, "CHECKSUMS", checksums)
    monkeypatch.setattr(
        data,
        "_SPLITS",
        {
            "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test),
        },
    )


# ------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    "array, code",
    [
        (np.arange(12, dtype=np.uint8).reshape(3, 2, 2), 0x08),
        (np.array([5, 0, 4], dtype=np.uint8), 0x08),
        (np.array([[1, -2], [300, 4]], dtype=np.int32), 0x0C),
        (np.array([0.5, -1.25], dtype=np.float32), 0x0D),
    ],
)
def test_parse_valid_idx(array, code):
    parsed = parse_idx(idx_bytes(array, code))
    assert parsed.shape == array.shape
    assert parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda raw: b"\x01" + raw[1:], "magic"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "magic"),
        (lambda raw: raw[:3] + b"\x00" + raw[4:], "dimensions"),
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw[:6], "header"),
        (lambda raw: raw + b"\x00", "longer"),
        (lambda raw: raw[:2], "too short"),
    ],
    ids=["first-bytes", "type-code", "zero-dims", "truncated", "cut-header", "padded", "tiny"],
)
def test_parse_rejects_malformed_idx(mangle, message):
    raw = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(MNISTCorruptError, match=message):
        parse_idx(mangle(raw), "sample")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_plain_and_gzipped(tmp_path, compress):
    array = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    raw = idx_bytes(array)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path, hashlib.sha256(raw).hexdigest()), array)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))[:-12])
    with pytest.raises(MNISTCorruptError, match=r"train-labels-idx1-ubyte\.gz.*delete it"):
        read_idx(path)


def test_read_idx_checksum_mismatch(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8)))
    with pytest.raises(MNISTCorruptError, match=r"t10k-labels-idx1-ubyte: checksum mismatch"):
        read_idx(path, "0" * 64)


# ------------------------------------------------------------- search order
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_load_from_data_dir(isolated, monkeypatch, compress):
    use_fake_checksums(monkeypatch, fake_mnist(isolated / "mnist", compress))
    (x_train, t_train), (x_test, _) = load_mnist(data_dir=isolated / "mnist")
    assert x_train.shape == (6, 784) and x_train.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert t_train.tolist() == [0, 1, 2, 3, 4, 5] and x_test.shape == (4, 784)


def test_environment_variable_then_cache(isolated, monkeypatch):
    use_fake_checksums(monkeypatch, fake_mnist(data.cache_dir(), compress=True))
    assert load_mnist()[0][0].shape == (6, 784)  # from the cache
    monkeypatch.setenv(data.ENV_DATA_DIR, str(isolated / "elsewhere"))
    with pytest.raises(MNISTUnavailableError, match="FASTGRAD_DATA_DIR"):
        load_mnist()  # a named folder is used alone, even if the cache has data


def test_corrupt_cached_file_is_never_used(isolated, monkeypatch):
    checksums = fake_mnist(data.cache_dir(), compress=False)
    use_fake_checksums(monkeypatch, checksums)
    target = data.cache_dir() / "t10k-images-idx3-ubyte"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(MNISTCorruptError, match=r"t10k-images-idx3-ubyte: checksum mismatch"):
        load_mnist()


def test_missing_data_dir_is_an_error(isolated):
    with pytest.raises(MNISTUnavailableError, match="not a directory"):
        load_mnist(data_dir=isolated / "nowhere")
    (isolated / "empty").mkdir()
    with pytest.raises(MNISTUnavailableError, match="lacks train-images-idx3-ubyte"):
        load_mnist(data_dir=isolated / "empty")


def test_offline_without_cache_raises_unavailable(isolated):
    with pytest.raises(MNISTUnavailableError, match="network disabled") as caught:
        load_mnist()
    assert "download failed" in caught.value.brief
    assert not any(data.cache_dir().iterdir())  # nothing half-written left behind


def test_download_verifies_and_writes_atomically(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    use_fake_checksums(monkeypatch, fake_mnist(mirror, compress=True))
    # The first mirror serves damaged copies of some files: they must be skipped.
    bad_mirror = tmp_path / "bad-mirror"
    fake_mnist(bad_mirror, compress=True, train=5)
    monkeypatch.setattr(data, "MIRRORS", (bad_mirror.as_uri() + "/", mirror.as_uri() + "/"))
    (x_train, t_train), _ = load_mnist(normalize=False)
    assert x_train.dtype == np.uint8 and t_train.tolist() == [0, 1, 2, 3, 4, 5]
    stored = sorted(path.name for path in data.cache_dir().iterdir())
    assert stored == sorted(f"{name}.gz" for name in MNIST_NAMES)  # no .part files left


# ----------------------------------------------------------- the embedded subset
def test_embedded_subset_shapes_and_labels():
    (x_train, t_train), (x_test, t_test) = load_mnist(subset="mini")
    assert x_train.shape == (10_000, 784) and x_test.shape == (2_000, 784)
    assert x_train.dtype == np.float32 and t_train.dtype == np.uint8
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert t_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first labels
    assert t_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(t_train, minlength=10).min() > 800


def test_embedded_subset_book_options():
    (x_train, t_train), (x_test, _) = load_mnist(
        normalize=False, flatten=False, one_hot_label=True, subset="mini", dtype=np.float64
    )
    assert x_train.shape == (10_000, 1, 28, 28) and x_train.dtype == np.uint8
    assert t_train.shape == (10_000, 10) and t_train.dtype == np.float64
    np.testing.assert_array_equal(t_train.sum(axis=1), 1.0)
    assert x_test.max() == 255


def test_embedded_subset_is_small():
    path = Path(data.__file__).parent / "_data" / "mnist-mini.npz"
    assert path.stat().st_size < 2.5 * 2**20


def test_bad_arguments():
    with pytest.raises(ValueError, match="subset"):
        load_mnist(subset="tiny")
    with pytest.raises(TypeError, match="float32 or float64"):
        load_mnist(subset="mini", dtype=np.int32)


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "fastgrad" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path.home() / ".cache" / "fastgrad" / "mnist"


# ------------------------------------------------------------------ full MNIST
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"full MNIST not at {SHARED_MNIST}")
def test_full_mnist_from_shared_folder(isolated):
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=SHARED_MNIST)
    assert x_train.shape == (60_000, 784) and x_test.shape == (10_000, 784)
    assert x_train.dtype == np.float32 and t_train.dtype == np.uint8
    assert np.bincount(t_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(t_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mini = load_mnist(subset="mini")
    np.testing.assert_array_equal(mini[0][0], x_train[:10_000])
    np.testing.assert_array_equal(mini[1][1], t_test[:2_000])


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"full MNIST not at {SHARED_MNIST}")
def test_full_mnist_checksums_match_the_known_values():
    for name, expected in data.CHECKSUMS.items():
        raw = gzip.decompress((SHARED_MNIST / f"{name}.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == expected
